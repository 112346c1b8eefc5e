"""The text-VAE demo (examples/text_vae.py, `make demo`): end to end on few steps."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib", reason="the demo's figures need matplotlib (bench extra)")

from klanneal.examples import text_vae  # noqa: E402

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
    train, evals, vocab_size = text_vae.load_data(args)
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


def test_metrics_on_known_posteriors():
    gen = torch.Generator().manual_seed(0)
    # Far-apart, narrow posteriors: the code identifies the point, MI = log N.
    mu = torch.tensor([[-30.0, 0.0], [0.0, 0.0], [30.0, 0.0]])
    logvar = torch.full((3, 2), -4.0)
    assert text_vae.mutual_info(mu, logvar, 50, gen) == pytest.approx(math.log(3), abs=1e-6)
    assert text_vae.active_units(mu) == 1
    # Identical posteriors: no information, no active unit.
    same = torch.zeros(3, 2)
    assert text_vae.mutual_info(same, same, 50, gen) == pytest.approx(0.0, abs=1e-6)
    assert text_vae.active_units(same) == 0


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
