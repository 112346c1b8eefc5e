"""Schedules, evaluation metrics, and the training loop (checkpoints, resume, --jobs workers)."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import klanneal
import klanneal.metrics
import klanneal.recipes
import klanneal.schedules

from .data import (
    EXTRA_SCHEDULES,
    IGNORE_INDEX,
    SCHEDULE_NAMES,
    BatchStream,
    make_batch,
    word_dropout,
)
from .model import TextVAE

# --------------------------------------------------------------------------- schedules


def make_schedule(name: str, steps: int, args: argparse.Namespace):
    """The klanneal schedule called ``name`` with the flags in ``args``.

    constant: beta = ``args.beta``; monotonic: one ramp from ``beta_start`` to
    ``beta_stop`` over ``warmup_fraction * steps`` steps, then ``beta_stop``;
    cyclical: ``n_cycles`` cycles over ``steps``, each ramping for ``ratio``
    of the period after ``zero_ratio`` of it at ``beta_start``; controller:
    ControlVAE's PI controller (Shao et al. 2020) holding the KL per
    sequence at ``target_kl`` with gains ``kp``, ``ki`` and beta in
    ``[beta_start, beta_stop]`` (a ``klanneal.schedules.KLController``, fed
    each batch's KL by the training loop; the same under ``--recipe``).
    """
    if name == "constant":
        return klanneal.schedules.Constant(args.beta)
    if name == "controller":
        if args.target_kl is None:
            raise ValueError("the controller needs --target-kl K (its KL set point, nats)")
        return klanneal.schedules.KLController(
            args.target_kl,
            kp=args.kp,
            ki=args.ki,
            beta_min=args.beta_start,
            beta_max=args.beta_stop,
        )
    if args.recipe == "fu2019":
        # The authors' beta sequence (klanneal.recipes): from 0.1, incremented
        # before use, over 45% of each of 4 cycles or 22.5% of the run.
        return fu2019_recipe(name, steps).beta
    if name == "monotonic":
        return klanneal.schedules.Monotonic(
            warmup_steps=max(1, round(args.warmup_fraction * steps)),
            start=args.beta_start,
            stop=args.beta_stop,
        )
    if name == "cyclical":
        return klanneal.schedules.Cyclical(
            total_steps=steps,
            n_cycles=args.n_cycles,
            ratio=args.ratio,
            start=args.beta_start,
            stop=args.beta_stop,
            shape=args.shape,
            zero_ratio=args.zero_ratio,
        )
    raise ValueError(
        f"unknown schedule {name!r}; expected one of {SCHEDULE_NAMES + EXTRA_SCHEDULES}"
    )


# --------------------------------------------------------------------------- loss


def model_elbo(
    model: TextVAE,
    batch,
    generator: torch.Generator,
    *,
    fused_head: bool = False,
    **kwargs: Any,
):
    """The negative ELBO of ``batch`` (klanneal.ELBOOutput) and mu, logvar.

    The model's output layer then ``klanneal.elbo_loss``, or with
    ``fused_head`` both in ``klanneal.linear_elbo_loss`` (the [B, L+1, V]
    logits are never built). ``kwargs``: beta, step, reduction.
    """
    if fused_head:
        hidden, mu, logvar = model.features(batch, generator)
        out = klanneal.linear_elbo_loss(
            hidden, model.out.weight, batch.target, mu, logvar, bias=model.out.bias,
            ignore_index=IGNORE_INDEX, **kwargs,
        )  # fmt: skip
    else:
        logits, mu, logvar = model(batch, generator)
        out = klanneal.elbo_loss(
            logits, batch.target, mu, logvar, ignore_index=IGNORE_INDEX, **kwargs
        )
    return out, mu, logvar


# --------------------------------------------------------------------------- metrics


@dataclass
class Evaluation:
    """Per-sequence averages over a data set (nats per sequence)."""

    recon: float
    kl: float
    elbo: float  # recon + kl at beta = 1 (the negative ELBO, lower is better)
    perplexity: float  # exp(elbo * n_sequences / n_tokens), an upper bound on the true one
    active_units: int
    mutual_info: float
    mu: torch.Tensor  # [N, D] posterior means
    logvar: torch.Tensor  # [N, D]


@torch.no_grad()
def evaluate(
    model: TextVAE,
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int,
    z_samples: int,
    mi_samples: int,
    seed: int,
    fused_head: bool = False,
) -> Evaluation:
    """Reconstruction, KL, ELBO, perplexity, active units and MI over ``sequences``.

    The loss terms come from ``klanneal.elbo_loss`` (``linear_elbo_loss`` with
    ``fused_head``) at beta = 1, averaged over ``z_samples`` draws of z per sequence.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    recon = kl = 0.0
    n_tokens = 0
    mus, logvars = [], []
    # Sorted by length: batches of similar lengths waste little on padding.
    sequences = sorted(sequences, key=len)
    for start in range(0, len(sequences), batch_size):
        batch = make_batch(sequences[start : start + batch_size])
        n_tokens += batch.n_tokens
        for sample in range(z_samples):
            out, mu, logvar = model_elbo(
                model, batch, gen, fused_head=fused_head, beta=1.0, reduction="sum"
            )
            recon += float(out.recon) / z_samples
            kl += float(out.kl) / z_samples
            if sample == 0:
                mus.append(mu)
                logvars.append(logvar)
    model.train(was_training)
    n = len(sequences)
    mu_all, logvar_all = torch.cat(mus), torch.cat(logvars)
    return Evaluation(
        recon=recon / n,
        kl=kl / n,
        elbo=(recon + kl) / n,
        perplexity=math.exp((recon + kl) / n_tokens),
        active_units=klanneal.metrics.active_units(mu_all),
        mutual_info=(
            klanneal.metrics.mutual_information(
                mu_all, logvar_all, samples_per_point=mi_samples, generator=gen
            )
            if mi_samples > 0
            else math.nan
        ),
        mu=mu_all,
        logvar=logvar_all,
    )


# --------------------------------------------------------------------------- training


@dataclass
class RunResult:
    """One schedule's training curves and final evaluation."""

    name: str
    curves: dict[str, list[float]]  # step, beta, lr, recon, kl, elbo (training batches)
    final: Evaluation
    seconds: float
    # step, recon, kl, elbo, active_units on the validation sequences (empty without them)
    valid_curves: dict[str, list[float]] = field(default_factory=dict)


def fu2019_recipe(name: str, steps: int):
    """``klanneal.recipes.fu2019`` for a run of ``steps`` steps: the recipe's
    shape depends only on the run's length, so one "epoch" of ``steps``."""
    return klanneal.recipes.fu2019(steps, epochs=1, schedule=name)


def lr_kind(name: str, args: argparse.Namespace) -> str:
    """The learning-rate schedule of run ``name``: ``--lr-schedule``, where
    ``auto`` is the recipe's (fu2019: the authors' per-epoch cosine levels for
    the cyclical run) and constant otherwise."""
    if args.lr_schedule != "auto":
        return args.lr_schedule
    return "fu2019" if args.recipe == "fu2019" and name == "cyclical" else "constant"


def make_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, schedule, args):
    """The learning-rate scheduler of run ``name`` (None: a constant learning rate).

    ``fu2019``: the authors' rate (``klanneal.recipes.fu2019(...).lr_scheduler``:
    ``lr * 0.5 * (1 + cos(pi k / 10))`` over the k-th tenth of each cycle);
    ``cyclical-cosine``: our per-step cosine restarted at every beta cycle
    (``klanneal.schedules.CyclicalCosineLR``, not the authors').
    """
    kind = lr_kind(name, args)
    if kind == "constant":
        return None
    if kind == "fu2019":
        return fu2019_recipe(name, args.steps).lr_scheduler(optimizer)
    if not isinstance(schedule, klanneal.schedules.Cyclical):
        raise ValueError(f"--lr-schedule {kind} needs the cyclical schedule's cycles, not {name}")
    return klanneal.schedules.CyclicalCosineLR(optimizer, schedule, min_factor=args.lr_min_factor)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _eval_points(steps: int, n: int) -> set[int]:
    """The steps after which the validation curve is measured (the last one included)."""
    if n <= 0:
        return set()
    return {max(1, round(steps * (i + 1) / n)) for i in range(n)}


def train_one(
    name: str,
    train_seqs: Sequence[Sequence[int]],
    eval_seqs: Sequence[Sequence[int]],
    vocab_size: int,
    args: argparse.Namespace,
    quiet: bool = False,
    valid_seqs: Sequence[Sequence[int]] | None = None,
    run_dir: Path | None = None,
    stream=None,
) -> RunResult | None:
    """Trains a fresh model (same seed for every schedule) and evaluates it.

    With ``run_dir`` a checkpoint (model, optimizer, schedulers, every random
    generator and the curves so far) is written there every
    ``args.checkpoint_every`` seconds and at the end of training, and with
    ``args.resume`` a run continues from it exactly. ``args.stop_after``
    stops after that many steps in this call (checkpoint written, returns
    None). ``valid_seqs``, when given, are evaluated ``args.valid_points``
    times over training (the validation learning curves).
    """
    torch.manual_seed(args.seed)
    model = TextVAE(
        vocab_size,
        args.embed_dim,
        args.hidden_dim,
        args.latent_dim,
        args.dropout,
        enc_dropout=args.enc_dropout,
        init_range=args.init_range,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = make_schedule(name, args.steps, args)
    # A KLController: fed each batch's KL below; its state is checkpointed.
    controlled = isinstance(schedule, klanneal.schedules.KLController)
    lr_scheduler = make_lr_scheduler(name, optimizer, schedule, args)
    batches = BatchStream(train_seqs, args.batch_size, args.seed, bucket=args.bucket)
    z_gen = torch.Generator().manual_seed(args.seed + 1)
    drop_gen = torch.Generator().manual_seed(args.seed + 3)
    keys = ("step", "beta", "lr", "recon", "kl", "elbo")
    curves: dict[str, list[float]] = {k: [] for k in keys}
    valid_curves: dict[str, list[float]] = {
        k: [] for k in ("step", "recon", "kl", "elbo", "active_units")
    }
    first_step, seconds_before = 0, 0.0
    ckpt = run_dir / "checkpoint.pt" if run_dir is not None else None
    if ckpt is not None and args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state["config"] != _run_config(name, args):
            raise ValueError(
                f"{ckpt} was written by a run with other flags; drop --resume or use another --out"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if lr_scheduler is not None:
            lr_scheduler.load_state_dict(state["lr_scheduler"])
        batches.load_state_dict(state["batches"])
        z_gen.set_state(state["z_gen"])
        drop_gen.set_state(state["drop_gen"])
        torch.set_rng_state(state["torch_rng"])
        curves, valid_curves = state["curves"], state["valid_curves"]
        first_step, seconds_before = state["step"], state["seconds"]
        if state.get("controller") is not None:
            schedule.load_state_dict(state["controller"])

    def checkpoint(step: int, seconds: float) -> None:
        if ckpt is None:
            return
        _save_atomic(
            {
                "config": _run_config(name, args),
                "step": step,
                "seconds": seconds,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
                "controller": schedule.state_dict() if controlled else None,
                "batches": batches.state_dict(),
                "z_gen": z_gen.get_state(),
                "drop_gen": drop_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "curves": curves,
                "valid_curves": valid_curves,
            },
            ckpt,
        )

    points = _eval_points(args.steps, args.valid_points) if valid_seqs else set()
    bar = None
    if not quiet:
        # Rate and ETA from tqdm; off a terminal (a worker's progress.log) a
        # line every 30 s instead of redrawing.
        to_file = stream is not None
        bar = tqdm(
            total=args.steps, initial=first_step, desc=f"{name:>10}", file=stream,
            mininterval=30.0 if to_file else 0.5, ascii=to_file, dynamic_ncols=not to_file,
        )  # fmt: skip
    start = time.perf_counter()
    last_ckpt = start
    stop = args.steps if args.stop_after is None else min(args.steps, first_step + args.stop_after)
    model.train()
    for step in range(first_step, stop):
        batch = word_dropout(batches.next(), args.word_dropout, drop_gen)
        # Before the loss: with --fused-head the forward pass computes the
        # output layer's gradients, and the previous ones are freed first.
        optimizer.zero_grad(set_to_none=True)
        # The fused op evaluates the schedule at `step` itself: no beta is
        # computed by hand anywhere in this loop.
        out, _, _ = model_elbo(
            model, batch, z_gen, fused_head=args.fused_head, beta=schedule, step=step,
            reduction="batchmean",
        )  # fmt: skip
        out.loss.backward()
        if controlled:
            # The batch's KL per sequence moves beta for the next step.
            schedule.update(out.kl)
        if args.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        recon, kl = float(out.recon), float(out.kl)
        for key, value in (
            ("step", step),
            ("beta", float(out.beta)),
            ("lr", lr),
            ("recon", recon),
            ("kl", kl),
            ("elbo", recon + kl),
        ):
            curves[key].append(value)
        if step + 1 in points:
            v = evaluate(
                model,
                valid_seqs,
                batch_size=args.eval_batch_size,
                z_samples=1,
                mi_samples=0,
                seed=args.seed + 4,
                fused_head=args.fused_head,
            )
            for key, value in (
                ("step", step + 1),
                ("recon", v.recon),
                ("kl", v.kl),
                ("elbo", v.elbo),
                ("active_units", v.active_units),
            ):
                valid_curves[key].append(value)
        if bar is not None:
            bar.set_postfix_str(
                f"beta {float(out.beta):.2f} lr {lr:.1e} rec {recon:7.3f} kl {kl:6.3f}",
                refresh=False,
            )
            bar.update(1)
        now = time.perf_counter()
        if ckpt is not None and now - last_ckpt >= args.checkpoint_every:
            checkpoint(step + 1, seconds_before + now - start)
            last_ckpt = now
    if bar is not None:
        bar.close()
    seconds = seconds_before + time.perf_counter() - start
    checkpoint(stop, seconds)
    if stop < args.steps:
        return None
    final = evaluate(
        model,
        eval_seqs,
        batch_size=args.eval_batch_size,
        z_samples=args.eval_samples,
        mi_samples=args.mi_samples,
        seed=args.seed + 2,
        fused_head=args.fused_head,
    )
    return RunResult(name, curves, final, seconds, valid_curves)


def _run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The flags that decide a run's numbers (a checkpoint only resumes the same run)."""
    skip = {"out", "resume", "stop_after", "quiet", "jobs", "schedules", "checkpoint_every"}
    return {"schedule": name, **{k: v for k, v in vars(args).items() if k not in skip}}


def run_schedule(
    name: str,
    data: tuple,
    args: argparse.Namespace,
    out_dir: Path,
    quiet: bool = False,
    log_to_file: bool = False,
    reuse: bool = False,
) -> RunResult | None:
    """Trains one schedule under ``out_dir/runs/NAME/`` (checkpoint, result) and returns it.

    A finished run's ``result.pt`` (of the same flags) is reused when resuming
    or with ``reuse`` (the parent collecting what its ``--jobs`` workers wrote).
    """
    train, evals, valid, vocab_size = data
    run_dir = out_dir / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path = run_dir / "result.pt"
    if (args.resume or reuse) and result_path.is_file():
        saved = torch.load(result_path, weights_only=False)
        if saved["config"] == _run_config(name, args):
            return saved["result"]
    if reuse:
        raise RuntimeError(f"{result_path}: the worker of schedule {name} left no result")
    stream = open(run_dir / "progress.log", "a") if log_to_file else None
    try:
        result = train_one(
            name,
            train,
            evals,
            vocab_size,
            args,
            quiet=quiet,
            valid_seqs=valid,
            run_dir=run_dir,
            stream=stream,
        )
    finally:
        if stream is not None:
            stream.close()
    if result is not None:
        _save_atomic({"config": _run_config(name, args), "result": result}, result_path)
    return result
