"""The single-cell example (examples/single_cell_vae.py): end to end on tiny settings,
its data generator, its flags, and its loss against scvi-tools' ZINB formula."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import klanneal
from klanneal.likelihoods import ZeroInflatedNegativeBinomial

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import single_cell_vae  # noqa: E402  (examples/single_cell_vae/, not part of the package)
from single_cell_vae.report import has_matplotlib  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = ["--cells", "200", "--genes", "50", "--steps", "30", "--quiet"]


def test_main_on_tiny_settings_writes_finite_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    expect = (
        contextlib.nullcontext()
        if has_matplotlib()
        else pytest.warns(UserWarning, match="matplotlib is not installed")
    )
    with expect:
        summary = single_cell_vae.main([*TINY, "--out", str(out)])
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert set(summary["schedules"]) == {"monotonic", "cyclical"}
    for m in summary["schedules"].values():
        for key in ("recon", "kl", "elbo", "knn_accuracy", "silhouette", "train_seconds"):
            assert math.isfinite(m[key]), (key, m[key])
        assert m["recon"] > 0 and m["kl"] >= 0
        assert m["elbo"] == pytest.approx(m["recon"] + m["kl"])
        assert 0 <= m["active_units"] <= m["latent_dim"] == 10
        assert 0.0 <= m["knn_accuracy"] <= 1.0 and -1.0 <= m["silhouette"] <= 1.0
        assert m["final_beta"] == 1.0  # both schedules end at beta = 1
    assert summary["data"]["held_out_cells"] == 40
    for ref in summary["references"].values():
        assert 0.0 <= ref["knn_accuracy"] <= 1.0
    eps = summary["eps_effect"]
    for key in ("eps_shift_mean", "eps_shift_max_abs", "klanneal_fp32_error_max_abs"):
        assert math.isfinite(eps[key])
    assert eps["eps_shift_max_abs"] < 1e-3  # eps = 1e-8 moves a 50-gene cell by far less
    curves = json.loads((out / "curves.json").read_text())
    assert len(curves["cyclical"]["beta"]) == 30
    md = (out / "summary.md").read_text()
    printed = capsys.readouterr().out
    for text in (md, printed):
        assert "| monotonic |" in text and "| cyclical |" in text and "15-NN accuracy" in text
    if has_matplotlib():
        assert (out / "single_cell_vae.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_script_entry_point_parses_its_flags():
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "single_cell_vae.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for flag in ("--genes", "--cells", "--types", "--steps", "--batch-size", "--schedules"):
        assert flag in proc.stdout


def test_data_generator_is_seeded():
    a = single_cell_vae.make_counts(60, 20, 3, seed=5)
    b = single_cell_vae.make_counts(60, 20, 3, seed=5)
    c = single_cell_vae.make_counts(60, 20, 3, seed=6)
    for field in ("counts", "cell_type", "latent", "library", "theta", "dropout"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.counts, c.counts)
    assert a.counts.shape == (60, 20) and a.latent.shape == (60, 5)
    assert bool((a.counts >= 0).all()) and torch.equal(a.counts, a.counts.round())
    assert bool((a.theta > 0).all()) and bool(((a.dropout > 0) & (a.dropout < 1)).all())
    train, held = single_cell_vae.split_cells(60, 0.25, seed=5)
    assert torch.equal(held, single_cell_vae.split_cells(60, 0.25, seed=5)[1])
    assert held.numel() == 15 and sorted(torch.cat([train, held]).tolist()) == list(range(60))
    with pytest.raises(ValueError, match="n_genes must be >= 1"):
        single_cell_vae.make_counts(10, 0, 2, seed=0)


def test_generated_counts_have_the_zinb_mean():
    # E[x] = (1 - pi_g) * mean_ng: checked per gene over many cells.
    data = single_cell_vae.make_counts(4000, 8, 2, seed=1)
    expected = ((1 - data.dropout) * data.mean).mean(dim=0)
    assert torch.allclose(data.counts.mean(dim=0), expected, rtol=0.1)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--genes", "1"], "--genes must be >= 2"),
        (["--types", "1"], "--types must be >= 2"),
        (["--batch-size", "1"], "--batch-size must be >= 2"),
        (["--holdout", "1.5"], "--holdout must be in (0, 1)"),
        (["--cells", "4", "--holdout", "0.9"], "need >= 1 and >= 2"),
        (["--lr", "nan"], "--lr must be finite and > 0"),
        (["--warmup-fraction", "0"], "--warmup-fraction"),
        (["--ratio", "0"], "cyclical schedule"),
        (["--schedules", "sigmoid"], "invalid choice"),
        (["--schedules", "cyclical", "cyclical"], "each schedule once"),
        (["--genes", "many"], "invalid int value"),
    ],
)
def test_bad_flags_are_usage_errors(flags, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        single_cell_vae.parse_args(flags)
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


def _scvi_zinb_log_prob(x, mu, theta, pi, eps=0.0):
    """scvi-tools' ZeroInflatedNegativeBinomial(mu, theta, zi_logits=pi).log_prob(x)
    (log_zinb_positive), transcribed from its formula; with eps = 0 the masks
    x < eps / x > eps become x == 0 / x > 0."""
    softplus_pi = torch.nn.functional.softplus(-pi)
    log_theta_eps = torch.log(theta + eps)
    log_theta_mu_eps = torch.log(theta + mu + eps)
    pi_theta_log = -pi + theta * (log_theta_eps - log_theta_mu_eps)
    case_zero = torch.nn.functional.softplus(pi_theta_log) - softplus_pi
    case_non_zero = (
        -softplus_pi
        + pi_theta_log
        + x * (torch.log(mu + eps) - log_theta_mu_eps)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    zero = (x <= eps).to(x.dtype)
    return zero * case_zero + (1 - zero) * case_non_zero


def test_example_zinb_loss_equals_scvi_tools_formula():
    torch.manual_seed(0)
    data = single_cell_vae.make_counts(16, 30, 3, seed=2)
    model = single_cell_vae.SingleCellVAE(30).double()
    counts = data.counts.double()
    out = model(counts, torch.Generator().manual_seed(0))
    theta = model.theta()
    # The example's loss call (train.py), in float64: rec per cell.
    ours = klanneal.elbo_loss(
        out.px_rate, counts, out.qz_m, out.qz_logvar, beta=1.0, reduction="none",
        likelihood=ZeroInflatedNegativeBinomial(theta, out.px_dropout),
    )  # fmt: skip
    scvi = -_scvi_zinb_log_prob(counts, out.px_rate, theta, out.px_dropout).sum(-1)
    assert bool((counts == 0).any()) and bool((counts > 0).any())  # both branches used
    torch.testing.assert_close(ours.recon, scvi, rtol=1e-13, atol=0.0)
    # And so are the gradients that train the model (theta's through px_r included);
    # out.recon is detached, out.loss (rec + KL per cell) depends on these through rec only.
    inputs = (out.px_rate, out.px_dropout, model.px_r)
    grads = torch.autograd.grad(2.5 * ours.loss.sum(), inputs, retain_graph=True)
    expected = torch.autograd.grad(2.5 * scvi.sum(), inputs, retain_graph=True)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # Its KL is scvi-tools' kl(Normal(qz_m, qz_v.sqrt()), Normal(0, 1)).sum(-1).
    prior = torch.distributions.Normal(0.0, 1.0)
    q = torch.distributions.Normal(out.qz_m, torch.exp(0.5 * out.qz_logvar))
    kl = torch.distributions.kl_divergence(q, prior).sum(-1)
    torch.testing.assert_close(ours.kl, kl, rtol=1e-12, atol=1e-12)
    # The example's own transcription (which summary.json's eps_effect uses) agrees
    # with this one, with eps = 0 and with scvi-tools' 1e-8.
    for eps in (0.0, single_cell_vae.SCVI_EPS):
        torch.testing.assert_close(
            single_cell_vae.scvi_zinb_nll(counts, out.px_rate, theta, out.px_dropout, eps),
            -_scvi_zinb_log_prob(counts, out.px_rate, theta, out.px_dropout, eps),
            rtol=1e-13,
            atol=1e-13,
        )


def test_separation_metrics_against_direct_loops():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(23, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 2, (23,), generator=g)
    labels[1] = 2  # a cluster of one point: its s is 0
    d = torch.cdist(points, points)
    expected = []
    for i in range(23):
        own = labels == labels[i]
        if own.sum() == 1:
            expected.append(0.0)
            continue
        a = d[i][own].sum() / (own.sum() - 1)
        b = min(d[i][labels == k].mean() for k in labels.unique() if k != labels[i])
        expected.append(float((b - a) / max(a, b)))
    got = single_cell_vae.silhouette_score(points, labels)
    assert got == pytest.approx(sum(expected) / 23, abs=1e-12)
    # k-NN: two far-apart clusters are classified perfectly, a query set's
    # labels flipped gives 0.
    ref = torch.cat([torch.zeros(20, 2), torch.full((20, 2), 10.0)])
    ref_labels = torch.cat([torch.zeros(20), torch.ones(20)]).long()
    query = torch.tensor([[0.5, 0.0], [9.5, 10.0]])
    assert single_cell_vae.knn_accuracy(ref, ref_labels, query, torch.tensor([0, 1])) == 1.0
    assert single_cell_vae.knn_accuracy(ref, ref_labels, query, torch.tensor([1, 0])) == 0.0
    with pytest.raises(ValueError, match="two clusters"):
        single_cell_vae.silhouette_score(points, torch.zeros(23, dtype=torch.long))
