"""The benchmark suite runs end to end (`make bench-quick`) and reports what it measured.

No timing assertions: the numbers of a smoke run on a shared machine mean
nothing. These tests check that every case and provider ran and that the
report files are complete and well formed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN = REPO_ROOT / "benchmarks" / "run.py"
ELBO_CASES = ("text", "large-vocab", "image", "continuous")
# liger needs CUDA and liger_kernel: it is checked only where it can run.
ALWAYS_PROVIDERS = ("eager", "compile", "klanneal", "klanneal-inplace", "memcpy")

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import _report  # noqa: E402

# benchmarks/run.py under a name that cannot clash with another module "run".
_spec = importlib.util.spec_from_file_location("klanneal_bench_run", RUN)
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    process = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_quick_run_times_every_case_and_provider(quick_run):
    _, results = quick_run
    rows = results["rows"]
    cases = {row["case"] for row in rows}
    providers = {row["provider"] for row in rows}
    assert set(ELBO_CASES) <= cases
    assert set(ALWAYS_PROVIDERS) <= providers
    if (REPO_ROOT / "benchmarks" / "bench_schedules.py").exists():
        assert "schedules" in cases
    # Per-call overhead and whole training steps (issue 10), with their targets.
    steps = {(r["mode"], r["provider"]) for r in rows if r["case"] == "steps"}
    assert {p for m, p in steps if m.startswith("overhead")} == {
        "klanneal",
        "noop",
        "noop-grads",
        "kernel-floor",
        "hand-written",
    }
    assert {p for m, p in steps if m.startswith("MNIST")} == {"klanneal", "hand-written"}
    assert {p for m, p in steps if m.startswith("text VAE")} == {
        "klanneal",
        "klanneal-fused-head",
        "hand-written",
    }
    step_targets = [t for t in results["targets"] if t["case"] == "steps"]
    assert all(t["met"] is not None for t in step_targets)
    # Issue 10's two (overhead <= 30 us, MNIST step >= 1x) and issue 23's
    # tightened overhead (<= 20 us over the no-op, <= 5 us over kernel-floor).
    assert sorted((t["source"], t["required"]) for t in step_targets) == [
        ("issue 10", "<= 30 us"),
        ("issue 10", ">= 1x"),
        ("issue 23", "<= 20 us"),
        ("issue 23", "<= 5 us"),
    ]
    # Count likelihoods and the scVI-like step (issue 24), with their targets; quick runs
    # torch.compile on the first count case only.
    counts = {(r["case"], r["provider"]) for r in rows if r.get("family") == "counts"}
    assert {c for c, _ in counts} == {"zinb-2k", "zinb-20k", "nb-2k", "nb-20k", "scvi-step"}
    assert {p for c, p in counts if c == "zinb-2k"} == {"eager", "compile", "klanneal"}
    assert {p for c, p in counts if c == "scvi-step"} == {"eager", "klanneal"}
    count_targets = {t["target"]: t["met"] for t in results["targets"] if t["source"] == "issue 24"}
    assert len(count_targets) == 3 and count_targets["klanneal: speed-up over eager"] is not None
    for case in ELBO_CASES:
        for mode in ("forward", "full"):
            in_group = {r["provider"] for r in rows if r["case"] == case and r["mode"] == mode}
            assert {"eager", "klanneal", "memcpy"} <= in_group, (case, mode, in_group)
    for row in rows:
        times = (row["p20_ms"], row["median_ms"], row["p80_ms"])
        assert all(math.isfinite(t) and t > 0 for t in times), row
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
        assert row["repeats"] >= 1, row


@pytest.mark.slow
def test_quick_run_providers_agree_with_the_reference(quick_run):
    _, results = quick_run
    checked = [r for r in results["rows"] if r.get("loss_rel_diff_vs_eager") is not None]
    assert {r["provider"] for r in checked} >= {"compile", "klanneal", "klanneal-inplace"}
    for row in checked:
        assert row["loss_rel_diff_vs_eager"] < 1e-4, row


@pytest.mark.slow
def test_quick_run_measures_memory_in_worker_processes(quick_run):
    _, results = quick_run
    measured = [r for r in results["rows"] if r.get("peak_extra_bytes") is not None]
    if not results["config"]["memory"]:
        assert any("not measured" in note for note in results["notes"])
        pytest.skip("this system cannot reset VmHWM")
    assert {r["provider"] for r in measured} >= {"eager", "klanneal", "klanneal-inplace"}
    for row in measured:
        assert isinstance(row["peak_extra_bytes"], int) and row["peak_extra_bytes"] >= 0
        assert "VmHWM" in row["memory_method"]


@pytest.mark.slow
def test_quick_run_writes_the_machine_description(quick_run):
    _, results = quick_run
    machine = results["machine"]
    for key in ("cpu_model", "cpu_count", "torch_threads", "torch", "klanneal", "git_sha"):
        assert key in machine
    assert machine["torch_threads"] >= 1
    assert "native" in machine["klanneal_build_info"]


@pytest.mark.slow
def test_quick_run_writes_markdown_and_png(quick_run):
    out, results = quick_run
    markdown = (out / "results.md").read_text()
    assert "## Targets" in markdown and "Quick smoke run" in markdown
    for row in results["rows"]:
        assert f"| {row['provider']} |" in markdown
        assert row["case"] in markdown
    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--cases", "text,nope", "nope"),
        ("--providers", "eager,fast", "fast"),
        ("--modes", "backward", "backward"),
        ("--repeats", "0", "at least 1"),
        ("--threads", "0", "at least 1"),
    ],
)
def test_run_rejects_bad_options(option, value, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["--quick", option, value])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert option in stderr and fragment in stderr


def _row(case: str, provider: str, median_ms: float, peak: int | None = None) -> dict:
    return {
        "case": case,
        "device": "cpu",
        "dtype": "float32",
        "mode": "full",
        "provider": provider,
        "median_ms": median_ms,
        "logits_bytes": 1000,
        "peak_extra_bytes": peak,
    }


def test_targets_are_judged_from_the_measured_ratios():
    rows = [
        _row("text", "eager", 70.0, peak=3000),
        _row("text", "compile", 20.0, peak=2500),
        _row("text", "klanneal", 10.0, peak=1050),
        _row("text", "klanneal-inplace", 9.0, peak=200),
        _row("text", "memcpy", 5.0),
        _row("image", "eager", 3.0),
        _row("image", "klanneal", 2.0),
    ]
    targets = {(t["case"], t["target"]): t for t in _report.evaluate_targets(rows)}
    over_eager = targets[("text", "klanneal: speed-up over eager")]
    assert over_eager["measured"] == pytest.approx(7.0) and over_eager["met"] is True
    assert targets[("text", "klanneal: speed-up over compile")]["met"] is False
    assert targets[("text", "klanneal: time / memcpy time")]["met"] is True
    assert targets[("text", "klanneal: peak memory / eager's")]["met"] is True
    assert targets[("text", "klanneal: extra memory / logits size")]["met"] is True
    inplace = targets[("text", "klanneal-inplace: extra memory / logits size")]
    assert inplace["measured"] == pytest.approx(0.2) and inplace["met"] is False
    assert targets[("image", "klanneal: speed-up over eager")]["met"] is False
    assert targets[("large-vocab", "klanneal: speed-up over eager")]["met"] is None


def test_a_failing_provider_is_reported_and_left_out(monkeypatch):
    import bench_elbo

    real_loss_function = bench_elbo.loss_function

    def failing_for_klanneal(provider, likelihood, compiled_ref):
        if provider == "klanneal":
            raise RuntimeError("no kernel here")
        return real_loss_function(provider, likelihood, compiled_ref)

    monkeypatch.setattr(bench_elbo, "loss_function", failing_for_klanneal)
    failures: list[str] = []
    rows = bench_elbo.run(
        cases=["image"],
        providers=["eager", "klanneal"],
        modes=["forward"],
        devices=[torch.device("cpu")],
        repeats=2,
        warmup=0,
        quick=True,
        memory=False,
        log=lambda message: None,
        failures=failures,
    )
    assert {row["provider"] for row in rows} == {"eager", "memcpy"}
    assert len(failures) == 1 and "klanneal failed: RuntimeError: no kernel here" in failures[0]
