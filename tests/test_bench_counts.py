"""benchmarks/bench_counts.py (issue 24): its transcription of scvi-tools' loss against
klanneal's reference, its agreement check, a tiny run, and the count targets.

No timing assertions (a shared machine's numbers mean nothing here). torch.compile is
not run in this file (it takes ~20 s); the suite's smoke run (test_bench.py) times it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from klanneal import _count_ref

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _report  # noqa: E402
import _report_counts  # noqa: E402
import _scvi_loss  # noqa: E402
import bench_counts  # noqa: E402

F64 = torch.float64
# In float64, theta + 1e-300 == theta and mu + 1e-300 == mu: scvi-tools' formulas without
# their epsilon, while its masks (x < eps, x > eps) still split the counts at 0.
NO_EPS = 1e-300


def _random(seed: int, batch: int = 6, genes: int = 50):
    """Counts (a third of them 0) and parameters over several orders of magnitude."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.exp(2.0 * torch.randn(batch, genes, generator=gen, dtype=F64))
    theta = torch.exp(torch.randn(genes, generator=gen, dtype=F64))
    zi_logits = 2.0 * torch.randn(batch, genes, generator=gen, dtype=F64)
    counts = torch.poisson(mu, generator=gen)
    counts[torch.rand(batch, genes, generator=gen, dtype=F64) < 0.2] = 0
    assert 0 < float((counts == 0).double().mean()) < 1
    return counts, mu, theta, zi_logits


def _scvi_and_ref(family: str, seed: int, eps: float):
    """(transcription's log p, klanneal's -nll, and their gradients w.r.t. mu, theta, zi)."""
    counts, mu, theta, zi_logits = _random(seed)
    leaves = [t.clone().requires_grad_() for t in (mu, theta, zi_logits)]
    twins = [t.clone().requires_grad_() for t in (mu, theta, zi_logits)]
    if family == "nb":
        ours = _scvi_loss.log_nb_positive(counts, leaves[0], leaves[1], eps=eps)
        ref = -_count_ref.nb_nll(twins[0], twins[1], counts)
        leaves, twins = leaves[:2], twins[:2]
    else:
        ours = _scvi_loss.log_zinb_positive(counts, *leaves, eps=eps)
        ref = -_count_ref.zinb_nll(twins[0], twins[1], twins[2], counts)
    upstream = torch.rand(ours.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    got = torch.autograd.grad((2.5 * upstream * ours).sum(), leaves)
    want = torch.autograd.grad((2.5 * upstream * ref).sum(), twins)
    return ours, ref, got, want


@pytest.mark.parametrize("family", ["nb", "zinb"])
@pytest.mark.parametrize("seed", [0, 1])
def test_scvi_transcription_equals_count_ref_without_eps(family, seed):
    ours, ref, got, want = _scvi_and_ref(family, seed, NO_EPS)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("family", ["nb", "zinb"])
def test_scvi_transcription_with_its_eps_stays_close(family):
    # x * (log(mu + eps) - log(mu)) ~ x eps / mu: at most ~1e-6 for these means.
    ours, ref, _, _ = _scvi_and_ref(family, 2, _scvi_loss.SCVI_EPS)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ours, ref)


def test_handwritten_loss_is_scvi_vae_loss():
    counts, mu, theta, zi_logits = _random(3)
    gen = torch.Generator().manual_seed(4)
    qz_m, qz_logvar = (torch.randn(6, 10, generator=gen, dtype=F64) for _ in range(2))
    loss = _scvi_loss.handwritten_loss(mu, counts, theta, zi_logits, qz_m, qz_logvar, 0.3)
    # scvi-tools' VAE.loss: torch.mean(reconst_loss + kl_weight * kl(qz, N(0, I)).sum(-1)).
    qz = torch.distributions.Normal(qz_m, (0.5 * qz_logvar).exp())
    prior = torch.distributions.Normal(torch.zeros_like(qz_m), torch.ones_like(qz_m))
    kl = torch.distributions.kl_divergence(qz, prior).sum(-1)
    reconst = -_scvi_loss.log_zinb_positive(counts, mu, theta, zi_logits).sum(-1)
    torch.testing.assert_close(loss, torch.mean(reconst + 0.3 * kl))


def _case_inputs():
    return bench_counts.make_inputs(bench_counts.CASES["zinb-2k"], True, torch.device("cpu"))


def test_inputs_are_counts_drawn_with_zeros_and_positive_means():
    inputs = _case_inputs()
    counts = inputs.counts
    assert torch.equal(counts, counts.round()) and bool((counts >= 0).all())
    assert 0.1 < float((counts == 0).float().mean()) < 0.95
    assert bool((inputs.rate_base > 0).all()) and inputs.px_r.requires_grad
    assert inputs.zi_base is not None and inputs.zi_base.shape == counts.shape


def test_assert_agrees_names_a_wrong_gradient():
    inputs = _case_inputs()
    eager, rounding = bench_counts.eager_reference(inputs)
    assert set(rounding) == {"loss", "px_rate", "theta", "zi_logits", "mu", "logvar"}
    assert 0 < rounding["theta"] < 1e-5
    klanneal = bench_counts.loss_and_gradients(bench_counts.klanneal_loss, inputs)
    bench_counts.assert_agrees(klanneal, eager, rounding)
    wrong = dict(klanneal[1], theta=klanneal[1]["theta"] * 1.01)
    with pytest.raises(AssertionError, match="gradient of theta"):
        bench_counts.assert_agrees((klanneal[0], wrong), eager, rounding)


def _quiet_run(**kwargs):
    failures: list[str] = []
    rows = bench_counts.run(
        providers=["eager", "klanneal"], quick=True, repeats=2, warmup=0, memory=False,
        log=lambda message: None, failures=failures, **kwargs,
    )  # fmt: skip
    return rows, failures


def test_quick_run_of_a_loss_case_and_the_step():
    rows, failures = _quiet_run(cases=["nb-2k", bench_counts.STEP_CASE])
    assert failures == []
    assert [(r["case"], r["mode"], r["provider"]) for r in rows] == [
        ("nb-2k", "full", "eager"),
        ("nb-2k", "full", "klanneal"),
        ("scvi-step", "step", "eager"),
        ("scvi-step", "step", "klanneal"),
    ]
    for row in rows:
        assert row["family"] == "counts" and row["median_ms"] > 0
        assert row["loss_rel_diff_vs_eager"] < 1e-5
        assert row["recon_shape"][1] == 401 and 0 < row["zero_fraction"] < 1


def test_a_provider_that_disagrees_is_reported_and_left_out(monkeypatch):
    real = bench_counts.loss_function

    def off_by_one_percent(provider, compiled):
        loss_fn = real(provider, compiled)
        if provider != "klanneal":
            return loss_fn
        return lambda *args: 1.01 * loss_fn(*args)

    monkeypatch.setattr(bench_counts, "loss_function", off_by_one_percent)
    rows, failures = _quiet_run(cases=["zinb-2k"])
    assert {r["provider"] for r in rows} == {"eager"}
    assert len(failures) == 1
    assert "zinb-2k cpu float32 full: klanneal failed: AssertionError: loss" in failures[0]


def _row(case, provider, median_ms, device="cpu", mode="full", peak=None):
    return {
        "case": case, "family": "counts", "device": device, "dtype": "float32",
        "mode": mode, "provider": provider, "median_ms": median_ms, "p20_ms": median_ms,
        "p80_ms": median_ms, "repeats": 10, "logits_bytes": 1000, "peak_extra_bytes": peak,
        "zero_fraction": 0.9, "loss_rel_diff_vs_eager": 0.0, "klanneal_native": False,
    }  # fmt: skip


def test_count_targets_are_judged_from_the_measured_ratios():
    rows = [
        _row("zinb-20k", "eager", 50.0, peak=4000),
        _row("zinb-20k", "compile", 24.0, peak=3000),
        _row("zinb-20k", "klanneal", 10.0, peak=1000),
        _row("scvi-step", "eager", 12.0, mode="step"),
        _row("scvi-step", "klanneal", 10.0, mode="step"),
        _row("zinb-20k", "eager", 6.0, device="cuda"),
        _row("zinb-20k", "klanneal", 1.0, device="cuda"),
    ]
    judged = [t for t in _report.evaluate_targets(rows) if t["source"] == "issue 24"]
    targets = {(t["case"], t["target"]): t for t in judged}
    assert len(targets) == 6
    over_eager = targets[("zinb-20k", "klanneal: speed-up over eager")]
    assert over_eager["measured"] == pytest.approx(5.0) and over_eager["met"] is True
    over_compile = targets[("zinb-20k", "klanneal: speed-up over compile")]
    assert over_compile["measured"] == pytest.approx(2.4) and over_compile["met"] is False
    step = targets[("scvi-step", "klanneal: training-step speed-up over eager")]
    assert step["measured"] == pytest.approx(1.2) and step["met"] is False
    assert targets[("zinb-20k (cuda)", "klanneal: speed-up over eager")]["met"] is True
    assert targets[("zinb-20k (cuda)", "klanneal: speed-up over compile")]["met"] is None
    step_cuda = targets[("scvi-step (cuda)", "klanneal: training-step speed-up over eager")]
    assert step_cuda["met"] is None


def test_count_targets_are_listed_when_the_counts_did_not_run():
    targets = [t for t in _report.evaluate_targets([]) if t["source"] == "issue 24"]
    assert [t["case"] for t in targets] == ["zinb-20k", "zinb-20k", "scvi-step"]
    assert all(t["met"] is None for t in targets)


def test_counts_section_renders_ratios_memory_and_the_reference_note():
    rows = [
        _row("zinb-20k", "eager", 50.0, peak=4 * 2**20),
        _row("zinb-20k", "compile", 25.0),
        _row("zinb-20k", "klanneal", 100.0, peak=2**20),
    ]
    text = "\n".join(_report_counts.counts_section(rows))
    assert "| zinb-20k | cpu | klanneal | 100.0 | 100.0-100.0 | 0.50x | 0.25x | 1.00 |" in text
    assert "| zinb-20k | cpu | eager | 50.0 | 50.0-50.0 | 1.00x | 0.50x | 4.00 |" in text
    assert "reference path" in text and "medians of 10 round-robin calls" in text
    assert _report_counts.counts_section([]) == []
