"""The command line of the text-VAE example: flags, the fu2019 recipe, main()."""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import klanneal
import klanneal.schedules

from .data import (
    EXTRA_SCHEDULES,
    SCHEDULE_NAMES,
    SPECIALS,
    Vocab,
    _find_split,
    make_toy_sequences,
    read_corpus,
    toy_vocab,
)
from .report import (
    MISSING_MATPLOTLIB,
    format_table,
    has_matplotlib,
    ordering_sentence,
    write_outputs,
)
from .train import make_schedule, run_schedule

# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (every schedule parameter is one)."""
    p = argparse.ArgumentParser(
        description="Train a text VAE with constant, monotonic and cyclical KL annealing "
        "(klanneal's schedules and fused ELBO loss) and compare them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("run")
    g.add_argument("--out", default="demo_output", help="output directory")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    g.add_argument(
        "--schedules",
        nargs="+",
        default=list(SCHEDULE_NAMES),
        choices=SCHEDULE_NAMES + EXTRA_SCHEDULES,
        help="controller (not run by default): ControlVAE's feedback beta, needs --target-kl",
    )
    g.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per schedule (default: 3000 toy, 2000 corpus)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument(
        "--recipe",
        default="none",
        choices=RECIPES,
        help="fu2019: the paper's language-model recipe (model, optimiser, schedules and "
        "learning-rate restarts; every piece can still be overridden by its flag)",
    )
    g.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="train for this many passes over the training data (fractional allowed; "
        "overrides --steps; the cycle structure scales with it)",
    )
    g.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train this many schedules at once in worker processes (each with --threads "
        "threads; progress in OUT/runs/NAME/progress.log)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoints under --out (finished schedules are reused)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=float,
        default=300.0,
        help="seconds between checkpoints (OUT/runs/NAME/checkpoint.pt)",
    )
    g.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop each schedule after this many steps in this call (checkpoint written; "
        "continue with --resume)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=None,
        help="corpus directory (train/valid/test .txt, "
        "or ptb.*.txt); omitted: the built-in toy data",
    )
    g.add_argument("--train-split", default="train", choices=("train", "valid"))
    g.add_argument("--eval-split", default="test", choices=("valid", "test"))
    g.add_argument(
        "--valid-split",
        default=None,
        choices=("valid", "none"),
        help="split for the validation learning curves (default: valid with --recipe "
        "fu2019 when it is not the training split, else none)",
    )
    g.add_argument(
        "--valid-points",
        type=int,
        default=20,
        help="validation evaluations over training (the learning curves' points)",
    )
    g.add_argument("--max-sentences", type=int, default=None, help="train on the first N")
    g.add_argument("--max-eval-sentences", type=int, default=None, help="evaluate on the first N")
    g.add_argument(
        "--max-vocab",
        type=int,
        default=None,
        help="vocabulary size incl. specials (0: every word; default 10000, fu2019: 0)",
    )
    g.add_argument("--max-len", type=int, default=None, help="truncate longer sentences")
    g.add_argument(
        "--drop-longer",
        type=int,
        default=None,
        help="drop sentences longer than this many tokens (fu2019: 200)",
    )
    g.add_argument("--n-sequences", type=int, default=10, help="toy: number of sequences")
    g.add_argument("--seq-len", type=int, default=10, help="toy: words per sequence")
    g.add_argument("--n-words", type=int, default=100, help="toy: vocabulary (without specials)")
    g = p.add_argument_group("model and optimiser")
    g.add_argument(
        "--embed-dim", type=int, default=None, help="default: 32 toy, 128 corpus, 256 fu2019"
    )
    g.add_argument(
        "--hidden-dim", type=int, default=None, help="default: 64 toy, 128 corpus, 256 fu2019"
    )
    g.add_argument(
        "--latent-dim", type=int, default=None, help="default: 2 toy, 32 corpus and fu2019"
    )
    g.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="dropout on the decoder's input embeddings and before the output layer "
        "(default: 0 toy, 0.3 corpus, 0.5 fu2019)",
    )
    g.add_argument(
        "--enc-dropout",
        type=float,
        default=None,
        help="dropout on the encoder's embeddings (default: --dropout; fu2019: 0)",
    )
    g.add_argument(
        "--init-range",
        type=float,
        default=None,
        help="initialise every parameter U(-r, r) (default: torch's; fu2019: 0.1)",
    )
    g.add_argument(
        "--word-dropout",
        type=float,
        default=0.0,
        help="training only: replace decoder input words by <unk> with this probability",
    )
    g.add_argument("--lr", type=float, default=1e-3, help="(peak) learning rate")
    g.add_argument(
        "--lr-schedule",
        default="auto",
        choices=("auto", "constant", "fu2019", "cyclical-cosine"),
        help="fu2019: the authors' rate, lr * 0.5 * (1 + cos(pi k / 10)) over the k-th tenth "
        "of each cycle (klanneal.recipes); cyclical-cosine: our per-step cosine restarted at "
        "every beta cycle (klanneal.schedules.CyclicalCosineLR); auto: fu2019 for the "
        "cyclical schedule under --recipe fu2019, constant otherwise",
    )
    g.add_argument(
        "--lr-min-factor",
        type=float,
        default=0.0,
        help="cyclical-cosine: learning rate at a cycle's end, as a fraction of the peak",
    )
    g.add_argument("--batch-size", type=int, default=None, help="default: 10 toy, 32 corpus")
    g.add_argument(
        "--bucket",
        type=int,
        default=None,
        help="sort runs of this many batches by length (0: off; default 0 toy, 20 corpus)",
    )
    g.add_argument("--clip", type=float, default=5.0, help="gradient-norm clip (0: off)")
    g.add_argument(
        "--fused-head",
        action="store_true",
        help="the output layer and the loss in one op (klanneal.linear_elbo_loss): the "
        "[batch, length, vocabulary] logits are never built",
    )
    g = p.add_argument_group("schedules (klanneal.schedules)")
    g.add_argument("--beta", type=float, default=1.0, help="constant schedule's beta")
    g.add_argument(
        "--beta-start",
        type=float,
        default=None,
        help="value at a ramp's start (default 0; --recipe fu2019 fixes its own, 0.1)",
    )
    g.add_argument("--beta-stop", type=float, default=1.0, help="value at a ramp's end")
    g.add_argument(
        "--warmup-fraction",
        type=float,
        default=0.25,
        help="monotonic: fraction of the steps spent ramping",
    )
    g.add_argument("--n-cycles", type=int, default=4, help="cyclical: number of cycles M")
    g.add_argument(
        "--ratio", type=float, default=0.5, help="cyclical: fraction R of each cycle spent ramping"
    )
    g.add_argument(
        "--zero-ratio",
        type=float,
        default=0.0,
        help="cyclical: fraction of each cycle held at beta-start first",
    )
    g.add_argument(
        "--shape",
        default="linear",
        choices=("linear", "sigmoid", "cosine"),
        help="cyclical: ramp shape",
    )
    g.add_argument(
        "--target-kl",
        type=float,
        default=None,
        help="controller: the KL set point in nats per sequence (klanneal.schedules."
        "KLController; beta stays in [--beta-start, --beta-stop])",
    )
    g.add_argument(
        "--kp", type=float, default=0.01, help="controller: proportional gain (ControlVAE's)"
    )
    g.add_argument(
        "--ki", type=float, default=1e-4, help="controller: integral gain (ControlVAE's)"
    )
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="z samples per sequence for rec/KL (default: 50 toy, 1 corpus)",
    )
    g.add_argument(
        "--mi-samples",
        type=int,
        default=None,
        help="z samples per sequence for MI (default: 200 toy, 1 corpus)",
    )
    g.add_argument("--eval-batch-size", type=int, default=256)
    return p


TOY_DEFAULTS = {
    "steps": 3000,
    "embed_dim": 32,
    "hidden_dim": 64,
    "latent_dim": 2,
    "dropout": 0.0,
    "batch_size": 10,
    "bucket": 0,
    "eval_samples": 50,
    "mi_samples": 200,
    "beta_start": 0.0,
    "max_vocab": 10000,
}
CORPUS_DEFAULTS = {
    "steps": 2000,
    "embed_dim": 128,
    "hidden_dim": 128,
    "latent_dim": 32,
    "dropout": 0.3,
    "batch_size": 32,
    "bucket": 20,
    "eval_samples": 1,
    "mi_samples": 1,
    "beta_start": 0.0,
    "max_vocab": 10000,
}
RECIPES = ("none", "fu2019")
# Fu et al. (2019)'s language-model recipe, read from their released code.
# Flags given explicitly win over these; the corpus defaults fill the rest.
FU2019 = {
    "embed_dim": 256,
    "hidden_dim": 256,
    "latent_dim": 32,
    "dropout": 0.5,
    "enc_dropout": 0.0,
    "init_range": 0.1,
    "batch_size": 32,
    "bucket": 10**9,  # the whole epoch sorted by length, then its batches shuffled
    "drop_longer": 200,
    "max_vocab": 0,  # PTB's 10k words are already the vocabulary
    "epochs": 40.0,
}
# The schedule flags that klanneal.recipes.fu2019 fixes for the monotonic and
# cyclical runs (name, the parser's default).
FU2019_FIXED = (
    ("beta_start", None),
    ("beta_stop", 1.0),
    ("warmup_fraction", 0.25),
    ("n_cycles", 4),
    ("ratio", 0.5),
    ("zero_ratio", 0.0),
    ("shape", "linear"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and validates flags, filling mode-dependent defaults.

    Raises:
        SystemExit: (argparse's error) on a missing or out-of-range value.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.recipe == "fu2019":
        if args.data is None:
            parser.error("--recipe fu2019 trains on a corpus: pass --data DIR")
        for key, value in FU2019.items():
            if key == "epochs" and args.steps is not None:
                continue  # an explicit --steps overrides the recipe's 40 epochs
            if getattr(args, key) is None:
                setattr(args, key, value)
        for key, default in FU2019_FIXED:
            if getattr(args, key) != default and set(args.schedules) - {"constant"}:
                parser.error(
                    f"--{key.replace('_', '-')}: the monotonic and cyclical schedules of "
                    "--recipe fu2019 are the authors' (klanneal.recipes.fu2019); drop the flag "
                    "or --recipe"
                )
        if args.lr_schedule == "cyclical-cosine":
            parser.error(
                "--lr-schedule cyclical-cosine follows a klanneal.schedules.Cyclical; under "
                "--recipe fu2019 use fu2019 (the authors' rate) or constant"
            )
    elif args.lr_schedule == "fu2019":
        parser.error("--lr-schedule fu2019 needs --recipe fu2019")
    defaults = TOY_DEFAULTS if args.data is None else CORPUS_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.max_vocab == 0:
        args.max_vocab = None
    if args.valid_split is None:
        use_valid = args.recipe == "fu2019" and args.train_split != "valid"
        args.valid_split = "valid" if use_valid else "none"
    if args.valid_split != "none" and args.data is None:
        parser.error("--valid-split needs --data (the toy data has no validation split)")
    if args.epochs is not None:
        if not (math.isfinite(args.epochs) and args.epochs > 0):
            parser.error(f"--epochs must be > 0, got {args.epochs}")
        if args.data is None:
            parser.error("--epochs needs --data (the toy run counts --steps)")
    positive = (
        "steps",
        "embed_dim",
        "hidden_dim",
        "latent_dim",
        "batch_size",
        "threads",
        "eval_samples",
        "mi_samples",
        "eval_batch_size",
        "n_cycles",
        "n_sequences",
        "seq_len",
        "n_words",
        "jobs",
    )
    for key in positive:
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.bucket < 0:
        parser.error(f"--bucket must be >= 0, got {args.bucket}")
    if not args.clip >= 0:
        parser.error(f"--clip must be >= 0 (0: off), got {args.clip}")
    if args.max_vocab is not None and args.max_vocab <= len(SPECIALS):
        parser.error(
            f"--max-vocab must be > {len(SPECIALS)} (the specials) or 0, got {args.max_vocab}"
        )
    if args.valid_points < 0:
        parser.error(f"--valid-points must be >= 0, got {args.valid_points}")
    if not args.checkpoint_every > 0:
        parser.error(f"--checkpoint-every must be > 0 seconds, got {args.checkpoint_every}")
    if args.enc_dropout is not None and not 0.0 <= args.enc_dropout < 1.0:
        parser.error(f"--enc-dropout must be in [0, 1), got {args.enc_dropout}")
    if args.init_range is not None and not 0 < args.init_range < math.inf:
        parser.error(f"--init-range must be finite and > 0, got {args.init_range}")
    if not 0.0 <= args.lr_min_factor <= 1.0:
        parser.error(f"--lr-min-factor must be in [0, 1], got {args.lr_min_factor}")
    if args.lr_schedule == "cyclical-cosine" and args.schedules != ["cyclical"]:
        parser.error(
            "--lr-schedule cyclical-cosine follows the cyclical schedule's cycles: "
            "use it with --schedules cyclical (auto restarts only the cyclical run)"
        )
    for key in ("max_sentences", "max_eval_sentences", "max_len", "stop_after", "drop_longer"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.n_sequences < 2 and args.data is None:
        parser.error("--n-sequences must be >= 2 (active units and MI compare sequences)")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0.0 <= args.word_dropout <= 1.0:
        parser.error(f"--word-dropout must be in [0, 1], got {args.word_dropout}")
    if not 0 < args.lr < math.inf:
        parser.error(f"--lr must be finite and > 0, got {args.lr}")
    for key in ("beta", "beta_start", "beta_stop"):
        # A KL weight: klanneal would refuse it only at the loss call, after
        # the data had loaded (in every worker with --jobs).
        value = getattr(args, key)
        if value is not None and not 0 <= value < math.inf:
            parser.error(f"--{key.replace('_', '-')} must be finite and >= 0, got {value}")
    if not 0.0 < args.warmup_fraction <= 1.0:
        parser.error(f"--warmup-fraction must be in (0, 1], got {args.warmup_fraction}")
    # klanneal.schedules validates the rest (ratio, zero-ratio, shape, ...).
    # With --epochs the exact count needs the data (steps per epoch): a
    # placeholder checks the flags that do not depend on it now, load_data
    # sets the real count and checks again.
    steps = 10**9 if args.epochs is not None else args.steps
    for name in args.schedules:
        if args.recipe == "fu2019" and name != "constant" and args.epochs is not None:
            continue  # a table of the run's length: built once the data gives it
        try:
            make_schedule(name, steps, args)
        except ValueError as err:
            parser.error(f"{name} schedule: {err}")
    if args.epochs is not None:
        args.steps = None
    return args


def _usage_error(message: str) -> None:
    """Exits as argparse's parser.error does (status 2, the message on stderr)."""
    import sys

    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_data(args: argparse.Namespace):
    """(train, eval, valid id sequences, vocabulary size) for the chosen mode.

    ``valid`` is None without a validation split. With ``--epochs`` this also
    sets ``args.steps`` (whole batches per epoch times the epochs, rounded).
    """
    if args.data is None:
        seqs = make_toy_sequences(args.n_sequences, args.seq_len, args.n_words, args.seed)
        rows = [row.tolist() for row in seqs]
        # The toy data set is the whole distribution: train and evaluate on it.
        return rows, rows, None, len(toy_vocab(args.n_words))
    data_dir = Path(args.data)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data {data_dir}: not a directory")

    def read(split: str, limit: int | None):
        return read_corpus(_find_split(data_dir, split), limit, args.max_len, args.drop_longer)

    train = read(args.train_split, args.max_sentences)
    evals = read(args.eval_split, args.max_eval_sentences)
    valid = None if args.valid_split == "none" else read(args.valid_split, args.max_eval_sentences)
    vocab = Vocab.build(train, args.max_vocab)
    if args.epochs is not None:
        per_epoch = len(train) // min(args.batch_size, len(train))
        args.steps = max(1, round(args.epochs * per_epoch))
        for name in args.schedules:
            try:
                make_schedule(name, args.steps, args)
            except ValueError as err:  # a flag that does not fit this many steps
                _usage_error(
                    f"{name} schedule: {err} (--epochs {args.epochs:g} is {args.steps} steps "
                    "on this data)"
                )
    encode = vocab.encode
    return (
        [encode(s) for s in train],
        [encode(s) for s in evals],
        None if valid is None else [encode(s) for s in valid],
        len(vocab),
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Runs the comparison and writes the outputs; returns the summary dict.

    Returns None when ``--stop-after`` stopped the runs early (resume them
    with ``--resume``).
    """
    args = parse_args(argv)
    if not has_matplotlib():  # said now, not after a run of an hour
        warnings.warn(MISSING_MATPLOTLIB, stacklevel=2)
    torch.set_num_threads(args.threads)
    toy = args.data is None
    data = load_data(args)
    train, evals, valid, vocab_size = data
    print(
        f"klanneal {klanneal.__version__} text-VAE demo"
        + (f" (recipe {args.recipe})" if args.recipe != "none" else "")
        + ": "
        + (
            f"toy data, {len(train)} sequences x {args.seq_len} words"
            if toy
            else f"{args.data}: {len(train)} train / {len(evals)} eval"
            + (f" / {len(valid)} valid" if valid else "")
            + f" sentences, vocabulary {vocab_size}"
        )
        + f"; {args.steps} steps per schedule"
        + (f" ({args.epochs:g} epochs)" if args.epochs is not None else "")
        + f", seed {args.seed}, {args.threads} thread(s)",
        flush=True,
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.jobs > 1 and len(args.schedules) > 1:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        jobs = min(args.jobs, len(args.schedules))
        print(
            f"training {len(args.schedules)} schedules in {jobs} processes; "
            f"progress: {out_dir}/runs/*/progress.log",
            flush=True,
        )
        with ctx.Pool(jobs) as pool:
            done = pool.starmap(_worker, [(n, args, str(out_dir)) for n in args.schedules])
        if not all(done):
            print(f"stopped early (--stop-after); continue with --resume --out {out_dir}")
            return None
        results = [
            run_schedule(name, data, args, out_dir, quiet=True, reuse=True)
            for name in args.schedules
        ]
    else:
        results = [
            run_schedule(name, data, args, out_dir, quiet=args.quiet) for name in args.schedules
        ]
        if any(r is None for r in results):
            print(f"stopped early (--stop-after); continue with --resume --out {out_dir}")
            return None
    summary = write_outputs(results, args, toy, out_dir)
    print()
    print(format_table(summary))
    if toy:
        print(
            f"\nbest possible -ELBO = log({args.n_sequences}) = {summary['optimum_elbo']:.3f} nats"
        )
        print(ordering_sentence(summary))
    print(f"\nwrote {out_dir}/summary.md, summary.json, curves.json and the PNG figures")
    return summary


if __name__ == "__main__":  # pragma: no cover
    main()


def _worker(name: str, args: argparse.Namespace, out_dir: str) -> bool:
    """One schedule in a worker process (``--jobs``): loads the data, trains, saves."""
    torch.set_num_threads(args.threads)
    data = load_data(args)
    return run_schedule(name, data, args, Path(out_dir), log_to_file=True) is not None
