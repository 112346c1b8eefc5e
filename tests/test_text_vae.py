"""The text-VAE demo (examples/text_vae.py, `make demo`): end to end on few steps."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import klanneal.recipes

pytest.importorskip("matplotlib", reason="the demo's figures need matplotlib (bench extra)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import text_vae  # noqa: E402  (examples/text_vae/, not part of the package)

REPO = Path(__file__).resolve().parents[1]
PTB = REPO.parent / "shared" / "data" / "ptb"
SHORT = ["--steps", "12", "--eval-samples", "2", "--mi-samples", "4", "--quiet"]


def _finite_metrics(entry: dict) -> None:
    for key in ("recon", "kl", "elbo", "perplexity", "mutual_info"):
        assert math.isfinite(entry[key]), (key, entry[key])
    assert entry["recon"] > 0 and entry["kl"] >= 0
    assert entry["elbo"] == pytest.approx(entry["recon"] + entry["kl"])
    assert 0 <= entry["active_units"] <= entry["latent_dim"]


def test_script_runs_the_three_schedules_and_writes_outputs(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "text_vae.py"), *SHORT, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["schedules"]) == {"constant", "monotonic", "cyclical"}
    for entry in summary["schedules"].values():
        _finite_metrics(entry)
        assert entry["mutual_info"] <= math.log(10) + 1e-9
        assert set(entry["paper"]) == {"kl", "elbo"}
    assert summary["optimum_elbo"] == pytest.approx(math.log(10))
    assert isinstance(summary["kl_order_cyclical_gt_monotonic_gt_constant"], bool)
    for png in ("learning_curves.png", "latent_space.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "summary.md").read_text()
    assert "| cyclical |" in md and "KL ordering" in md
    # The table and the verdict are printed too.
    assert "| monotonic |" in proc.stdout and "KL ordering" in proc.stdout


def _train(flags: list[str], name: str) -> text_vae.RunResult:
    args = text_vae.parse_args([*SHORT, *flags])
    train, evals, _, vocab_size = text_vae.load_data(args)
    return text_vae.train_one(name, train, evals, vocab_size, args, quiet=True)


def _numbers(result: text_vae.RunResult) -> tuple:
    f = result.final
    return (result.curves, f.recon, f.kl, f.mutual_info, f.active_units, f.mu.tolist())


def test_same_seed_same_numbers_other_seed_different():
    first = _train(["--steps", "12"], "cyclical")
    second = _train(["--steps", "12"], "cyclical")
    other = _train(["--steps", "12", "--seed", "1"], "cyclical")
    assert _numbers(first) == _numbers(second)
    assert first.final.kl != other.final.kl
    assert first.curves["recon"] != other.curves["recon"]


def test_schedules_follow_the_flags():
    flags = ["--steps", "16", "--n-cycles", "2", "--ratio", "0.25", "--warmup-fraction", "0.5"]
    monotonic = _train(flags, "monotonic").curves["beta"]
    cyclical = _train(flags, "cyclical").curves["beta"]
    # Monotonic: ramp over the first 8 steps, then 1.
    assert monotonic[0] == 0.0
    assert monotonic[4] == pytest.approx(0.5)
    assert monotonic[8:] == [1.0] * 8
    # Cyclical: two periods of 8 steps, each ramping over 2 steps.
    assert cyclical[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert cyclical[8:11] == pytest.approx([0.0, 0.5, 1.0])
    assert (
        _train(["--steps", "4", "--beta", "0.3"], "constant").curves["beta"]
        == [pytest.approx(0.3)] * 4
    )


def test_toy_data_is_fixed_by_the_seed_and_distinct():
    a = text_vae.make_toy_sequences(10, 10, 100, seed=3)
    assert torch.equal(a, text_vae.make_toy_sequences(10, 10, 100, seed=3))
    assert not torch.equal(a, text_vae.make_toy_sequences(10, 10, 100, seed=4))
    assert len({tuple(r) for r in a.tolist()}) == 10
    assert int(a.min()) >= len(text_vae.SPECIALS)
    with pytest.raises(ValueError, match="n_sequences"):
        text_vae.make_toy_sequences(5, 1, 4)


def test_batches_pad_and_ignore_padding():
    batch = text_vae.make_batch([[5, 6, 7], [8]])
    assert batch.dec_input.tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    assert batch.target.tolist() == [[5, 6, 7, 2], [8, 2, -100, -100]]
    assert batch.n_tokens == 6
    stream = text_vae.BatchStream([[i] * (i % 5 + 1) for i in range(40)], 8, seed=0, bucket=5)
    seen = sorted(int(x) for _ in range(5) for x in stream.next().enc_input[:, 0])
    assert seen == list(range(40))  # one epoch visits every sequence once


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--ratio", "0"], "ratio"),
        (["--ratio", "0.8", "--zero-ratio", "0.5"], "ratio + zero_ratio"),
        (["--shape", "square"], "invalid choice"),
        (["--warmup-fraction", "0"], "--warmup-fraction"),
        (["--clip", "-1"], "--clip must be >= 0"),
        (["--word-dropout", "1.5"], "--word-dropout"),
        # These crashed in training (a negative beta) or in evaluation (inf).
        (["--beta", "-1"], "--beta must be finite and >= 0"),
        (["--beta-stop", "-1"], "--beta-stop must be finite and >= 0"),
        (["--lr", "inf"], "--lr must be finite and > 0"),
        (["--init-range", "inf"], "--init-range must be finite and > 0"),
        (["--schedules", "controller"], "controller schedule: the controller needs --target-kl"),
        (["--schedules", "controller", "--target-kl", "-1"], "target_kl must be finite and >= 0"),
        (["--schedules", "controller", "--target-kl", "1", "--ki", "-1"], "ki must be finite"),
    ],
)
def test_bad_flags_are_rejected_with_a_message(flags, fragment, capsys):
    with pytest.raises(SystemExit):
        text_vae.parse_args(flags)
    assert fragment in capsys.readouterr().err


def test_missing_corpus_files_name_the_fix(tmp_path):
    (tmp_path / "valid.txt").write_text("a b c\n")
    with pytest.raises(FileNotFoundError, match="--train-split valid"):
        text_vae.main(["--data", str(tmp_path), "--quiet", "--out", str(tmp_path / "o")])


@pytest.mark.skipif(not PTB.is_dir(), reason=f"Penn Treebank slice not found at {PTB}")
def test_corpus_mode_on_a_ptb_slice(tmp_path):
    summary = text_vae.main(
        ["--data", str(PTB), "--train-split", "valid", "--max-sentences", "64",
         "--max-eval-sentences", "32", "--max-vocab", "500", "--steps", "4",
         "--batch-size", "8", "--embed-dim", "16", "--hidden-dim", "16", "--latent-dim", "4",
         "--schedules", "monotonic", "cyclical", "--quiet", "--out", str(tmp_path)]
    )  # fmt: skip
    assert summary["mode"] == "corpus"
    assert set(summary["schedules"]) == {"monotonic", "cyclical"}
    for entry in summary["schedules"].values():
        _finite_metrics(entry)
        # An untrained model on a 500-word vocabulary: perplexity near 500.
        assert 50 < entry["perplexity"] < 5000
    assert (tmp_path / "learning_curves.png").is_file()
    assert "PPL" in (tmp_path / "summary.md").read_text()


def test_word_dropout_replaces_only_words():
    batch = text_vae.make_batch([[5, 6, 7, 8, 9, 10], [11]])
    gen = torch.Generator().manual_seed(0)
    assert text_vae.word_dropout(batch, 0.0, gen) is batch
    all_dropped = text_vae.word_dropout(batch, 1.0, gen).dec_input
    assert all_dropped.tolist() == [[1, 3, 3, 3, 3, 3, 3], [1, 3, 0, 0, 0, 0, 0]]
    half = text_vae.word_dropout(batch, 0.5, gen)
    assert torch.equal(half.target, batch.target)
    kept = half.dec_input == batch.dec_input
    assert bool(((half.dec_input == text_vae.UNK_ID) | kept).all())


FU2019_SLICE = [
    "--data", str(PTB), "--recipe", "fu2019", "--max-sentences", "96",
    "--max-eval-sentences", "24", "--batch-size", "8", "--embed-dim", "16",
    "--hidden-dim", "16", "--latent-dim", "4", "--valid-points", "2",
    "--eval-batch-size", "32", "--quiet",
]  # fmt: skip


@pytest.mark.skipif(not PTB.is_dir(), reason=f"Penn Treebank slice not found at {PTB}")
def test_recipe_fu2019_sets_the_papers_recipe_and_runs(tmp_path):
    args = text_vae.parse_args(["--data", str(PTB), "--recipe", "fu2019"])
    assert (args.embed_dim, args.hidden_dim, args.latent_dim) == (256, 256, 32)
    assert (args.dropout, args.enc_dropout, args.init_range) == (0.5, 0.0, 0.1)
    assert (args.lr, args.clip, args.batch_size, args.drop_longer) == (1e-3, 5.0, 32, 200)
    # The schedules are klanneal.recipes.fu2019's: the flags that would change
    # them are refused.
    with pytest.raises(SystemExit):
        text_vae.parse_args(["--data", str(PTB), "--recipe", "fu2019", "--ratio", "0.3"])
    with pytest.raises(SystemExit):
        text_vae.parse_args(["--data", str(PTB), "--recipe", "fu2019", "--lr-schedule",
                             "cyclical-cosine", "--schedules", "cyclical"])  # fmt: skip
    assert (args.epochs, args.train_split, args.eval_split, args.valid_split) == (
        40.0, "train", "test", "valid"
    )  # fmt: skip
    # Each piece is still a flag.
    assert text_vae.parse_args(["--data", str(PTB), "--recipe", "fu2019", "--dropout", "0.2"]
                               ).dropout == 0.2  # fmt: skip

    # 1.5 epochs of 96 sentences in batches of 8: 18 steps, 4 cycles over them.
    summary = text_vae.main([*FU2019_SLICE, "--epochs", "1.5", "--out", str(tmp_path)])
    assert summary["recipe"] == "fu2019"
    assert (summary["train_split"], summary["eval_split"]) == ("train", "test")
    assert summary["git_sha"] is None or len(summary["git_sha"]) >= 40
    for name, entry in summary["schedules"].items():
        for key in ("rec", "kl", "nelbo", "ppl", "au", "mi", "epochs", "steps", "seconds", "seed"):
            assert key in entry, (name, key)
        assert entry["steps"] == 18 and entry["epochs"] == 1.5
        assert entry["nelbo"] == pytest.approx(entry["rec"] + entry["kl"])
    curves = json.loads((tmp_path / "curves.json").read_text())
    mono, cyc = curves["monotonic"], curves["cyclical"]
    # Monotonic: beta from 0.1 by 0.9 over 22.5% of the run (4.05 steps),
    # incremented before use; constant learning rate.
    expected = klanneal.recipes.fu2019(18, 1, "monotonic").beta.values(18).tolist()
    assert mono["beta"] == pytest.approx(expected, rel=1e-7)  # out.beta: the inputs' float32
    assert mono["beta"][0] == pytest.approx(0.1 + 0.9 / 4.05) and mono["beta"][-1] == 1.0
    assert set(mono["lr"]) == {1e-3}
    # Cyclical: 4 cycles of 4.5 steps; the learning rate restarts (jumps up)
    # exactly where beta restarts (drops), and is one of the authors' ten
    # per-epoch levels 0.5 * (1 + cos(pi k / 10)).
    b, lr = cyc["beta"], cyc["lr"]
    restarts = [i for i in range(1, 18) if b[i] < b[i - 1]]
    assert restarts == [5, 9, 14]
    assert [i for i in range(1, 18) if lr[i] > lr[i - 1]] == restarts
    assert b[0] == pytest.approx(0.1 + 0.9 / (0.45 * 4.5)) and lr[0] == 1e-3 and lr[9] == 1e-3
    levels = {1e-3 * 0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(10)}
    assert all(min(abs(v - level) for level in levels) < 1e-18 for v in lr)
    assert min(lr) < 2e-4
    # Validation learning curves: 2 points, the last at the end of training.
    assert mono["valid"]["step"] == [9, 18]
    assert all(math.isfinite(v) for v in mono["valid"]["elbo"])
    assert (tmp_path / "valid_curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(not PTB.is_dir(), reason=f"Penn Treebank slice not found at {PTB}")
def test_a_stopped_run_resumes_to_the_same_numbers(tmp_path):
    flags = [*FU2019_SLICE, "--epochs", "1", "--schedules", "cyclical"]
    straight = text_vae.main([*flags, "--out", str(tmp_path / "a")])
    assert text_vae.main([*flags, "--out", str(tmp_path / "b"), "--stop-after", "5"]) is None
    assert (tmp_path / "b" / "runs" / "cyclical" / "checkpoint.pt").is_file()
    resumed = text_vae.main([*flags, "--out", str(tmp_path / "b"), "--resume"])
    a = json.loads((tmp_path / "a" / "curves.json").read_text())
    b = json.loads((tmp_path / "b" / "curves.json").read_text())
    assert a == b
    assert straight["schedules"]["cyclical"]["nelbo"] == resumed["schedules"]["cyclical"]["nelbo"]
    # A checkpoint of other flags is not resumed silently.
    with pytest.raises(ValueError, match="other flags"):
        text_vae.main([*flags, "--out", str(tmp_path / "b"), "--resume", "--stop-after", "1",
                       "--lr", "2e-3"])  # fmt: skip


@pytest.mark.skipif(not PTB.is_dir(), reason=f"Penn Treebank slice not found at {PTB}")
def test_parallel_jobs_give_the_numbers_of_one_process(tmp_path):
    # --jobs 2: each schedule in its own worker process, the parent collects
    # the workers' results (it must not train again) and writes the outputs.
    flags = [*FU2019_SLICE, "--epochs", "0.5", "--schedules", "monotonic", "cyclical"]
    one = text_vae.main([*flags, "--out", str(tmp_path / "one")])
    two = text_vae.main([*flags, "--out", str(tmp_path / "two"), "--jobs", "2"])
    for name in ("monotonic", "cyclical"):
        assert two["schedules"][name]["nelbo"] == one["schedules"][name]["nelbo"]
    a = json.loads((tmp_path / "one" / "curves.json").read_text())
    b = json.loads((tmp_path / "two" / "curves.json").read_text())
    assert a == b
    assert (tmp_path / "two" / "runs" / "cyclical" / "progress.log").read_text()


@pytest.mark.skipif(not PTB.is_dir(), reason=f"Penn Treebank slice not found at {PTB}")
def test_the_progress_shows_rate_and_eta(tmp_path):
    # tqdm's bar, in each --jobs worker's progress.log: steps, rate and ETA.
    flags = [*FU2019_SLICE, "--epochs", "0.5", "--schedules", "monotonic", "cyclical"]
    flags.remove("--quiet")
    text_vae.main([*flags, "--out", str(tmp_path), "--jobs", "2"])
    log = (tmp_path / "runs" / "cyclical" / "progress.log").read_text()
    assert "6/6" in log and "it/s" in log and "<" in log  # tqdm's "[elapsed<remaining, rate]"


def test_the_example_uses_only_the_public_api():
    # examples/text_vae is not part of the wheel and imports no private module.
    example = Path(text_vae.__file__).parent
    for path in example.glob("*.py"):
        source = path.read_text()
        private = re.findall(r"klanneal\._(?!_)\w+|from klanneal import _\w+", source)
        assert not private, (path, private)
    import klanneal

    assert not (Path(klanneal.__file__).parent / "examples").exists()


def test_fused_head_trains_to_the_same_numbers():
    # --fused-head: the output layer inside klanneal.linear_elbo_loss; the
    # same model, draws and steps as the logits + elbo_loss path, to rounding.
    plain = _train(["--steps", "12"], "cyclical")
    fused = _train(["--steps", "12", "--fused-head"], "cyclical")
    for key in ("recon", "kl", "elbo", "beta"):
        assert fused.curves[key] == pytest.approx(plain.curves[key], rel=1e-4, abs=1e-6), key
    assert fused.final.elbo == pytest.approx(plain.final.elbo, rel=1e-4)


@pytest.mark.skipif(not PTB.is_dir(), reason=f"Penn Treebank slice not found at {PTB}")
def test_an_explicit_steps_overrides_the_recipes_epochs():
    # Regression: the fu2019 recipe's 40 epochs silently overrode --steps.
    args = text_vae.parse_args(["--data", str(PTB), "--recipe", "fu2019", "--steps", "4"])
    assert (args.steps, args.epochs) == (4, None)


@pytest.mark.skipif(not PTB.is_dir(), reason=f"Penn Treebank slice not found at {PTB}")
def test_a_schedule_flag_that_does_not_fit_the_epochs_is_a_usage_error(tmp_path, capsys):
    # Regression: with --epochs the schedule flags were checked only after the
    # data had loaded, and a bad one was a traceback.
    with pytest.raises(SystemExit) as info:
        text_vae.parse_args(["--data", str(PTB), "--epochs", "1", "--ratio", "2"])
    assert info.value.code == 2 and "ratio must be in (0, 1]" in capsys.readouterr().err
    flags = ["--data", str(PTB), "--epochs", "0.5", "--max-sentences", "64", "--quiet"]
    with pytest.raises(SystemExit) as info:  # 4 cycles in 1 step
        text_vae.main([*flags, "--out", str(tmp_path)])
    assert info.value.code == 2 and "n_cycles must be <= 1" in capsys.readouterr().err


def test_a_corpus_file_that_is_not_utf8_names_itself(tmp_path):
    # Regression: an unhandled UnicodeDecodeError that named no file.
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text("a b c\nd e\n")
    (tmp_path / "test.txt").write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(ValueError, match="test.txt: not UTF-8 text \\(a byte 0xe9\\)"):
        text_vae.main(["--data", str(tmp_path), "--quiet", "--out", str(tmp_path / "o")])


@pytest.mark.skipif(not PTB.is_dir(), reason=f"Penn Treebank slice not found at {PTB}")
def test_ptb_report_of_step_counted_runs_and_repeated_labels(tmp_path):
    # Regression: a run trained with --steps (no epochs) crashed the report,
    # and two runs of one schedule kept only the last row in summary.json.
    flags = ["--data", str(PTB), "--max-sentences", "32", "--max-eval-sentences", "16",
             "--steps", "2", "--schedules", "cyclical", "--n-cycles", "1", "--embed-dim", "8",
             "--hidden-dim", "8", "--latent-dim", "2", "--quiet"]  # fmt: skip
    for seed in (0, 1):
        text_vae.main([*flags, "--seed", str(seed), "--out", str(tmp_path / f"run{seed}")])
    script = str(REPO / "examples" / "ptb_report.py")
    run0, run1 = str(tmp_path / "run0"), str(tmp_path / "run1")

    def report(out: str, *runs: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, script, "--out", str(tmp_path / out), *runs],
            capture_output=True, text=True, cwd=REPO / "examples", timeout=300,
        )  # fmt: skip

    done = report("r", run0)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "r" / "valid_curves.png").exists()
    same = report("r2", run0, run1)
    assert same.returncode == 2 and "come from more than one run" in same.stderr
    labelled = report("r3", run0, f"{run1}=cyclical:cyclical-seed1")
    assert labelled.returncode == 0, labelled.stderr[-2000:]
    rows = json.loads((tmp_path / "r3" / "summary.json").read_text())["schedules"]
    assert set(rows) == {"cyclical", "cyclical-seed1"}


def test_without_matplotlib_the_run_warns_first_and_skips_the_figures(tmp_path, monkeypatch):
    # A run of an hour used to fail at its first figure; now the missing
    # optional dependency is named before training and the figures skipped.
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    events = []
    real_train = text_vae.cli.run_schedule

    def record(*args, **kwargs):
        events.append("train")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(text_vae.cli, "run_schedule", record)

    def warn(message, *args, **kwargs):
        events.append(str(message))

    monkeypatch.setattr(text_vae.cli.warnings, "warn", warn)
    flags = ["--steps", "4", "--schedules", "constant", "--quiet", "--mi-samples", "2"]
    summary = text_vae.main([*flags, "--eval-samples", "1", "--out", str(tmp_path)])
    assert "klanneal[demo]" in events[0] and events[1] == "train"
    assert summary["schedules"]["constant"]["steps"] == 4
    assert (tmp_path / "summary.md").is_file() and not list(tmp_path.glob("*.png"))


# ---- --schedules controller (ControlVAE's KL controller) -------------------------------------

CONTROLLER = ["--schedules", "controller", "--target-kl", "1.0", "--kp", "0.5", "--ki", "0.02"]


def test_the_controller_run_feeds_each_batch_kl_and_writes_its_outputs(tmp_path):
    summary = text_vae.main([*SHORT, *CONTROLLER, "--out", str(tmp_path)])
    entry = summary["schedules"]["controller"]
    _finite_metrics(entry)
    assert entry["paper"] is None  # the paper has no controller run
    assert "| controller |" in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / "schedules.png").exists()  # its beta is in the learning curves
    assert (tmp_path / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    # Each step's beta is the controller's after the KLs of the steps before
    # (ControlVAE's Algorithm 1 in klanneal.schedules.KLController).
    curves = json.loads((tmp_path / "curves.json").read_text())["controller"]
    mirror = klanneal.schedules.KLController(1.0, kp=0.5, ki=0.02)
    expected = []
    for kl in curves["kl"]:
        expected.append(float(mirror.beta))
        mirror.update(kl)
    assert curves["beta"] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert max(curves["beta"]) > 0.0


def test_a_stopped_controller_run_resumes_to_the_same_numbers(tmp_path):
    flags = [*SHORT, *CONTROLLER]
    text_vae.main([*flags, "--out", str(tmp_path / "a")])
    assert text_vae.main([*flags, "--out", str(tmp_path / "b"), "--stop-after", "5"]) is None
    text_vae.main([*flags, "--out", str(tmp_path / "b"), "--resume"])
    a = json.loads((tmp_path / "a" / "curves.json").read_text())
    b = json.loads((tmp_path / "b" / "curves.json").read_text())
    assert a == b


@pytest.mark.slow
def test_the_controller_holds_the_toy_tasks_kl_at_its_target():
    # The paper's synthetic task (10 sequences: at most log 10 = 2.30 nats of
    # code), a set point of 1 nat. Faster gains than ControlVAE's defaults
    # (kp 0.01, ki 1e-4), which need thousands of steps, and a smaller model.
    result = _train(
        [*CONTROLLER, "--steps", "200", "--embed-dim", "16", "--hidden-dim", "32"], "controller"
    )
    tail = result.curves["kl"][-50:]  # the training batches' KL per sequence
    assert sum(tail) / len(tail) == pytest.approx(1.0, rel=0.15)
    assert result.final.kl == pytest.approx(1.0, rel=0.2)  # evaluated at the end
    assert 0.1 < result.curves["beta"][-1] < 1.0  # neither bound: beta does the holding
