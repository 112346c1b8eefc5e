"""Poisson, negative binomial and ZINB through elbo_loss / ELBOLoss (the
reference-only entries of klanneal.likelihoods), against torch.distributions
and a float64 transcription of the ZINB mixture."""

from __future__ import annotations

import math

import pytest
import torch

import klanneal
from klanneal.likelihoods import NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial

F64 = torch.float64


def _data(batch=5, genes=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rate = torch.rand(batch, genes, generator=gen, dtype=F64) * 20 + 0.05
    counts = torch.poisson(rate, generator=gen)
    mu = torch.randn(batch, 3, generator=gen, dtype=F64)
    logvar = torch.randn(batch, 3, generator=gen, dtype=F64)
    return rate, counts, mu, logvar


def _kl(mu, logvar):
    return 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum()


def test_poisson_equals_torch_distributions_values_and_gradients():
    rate, counts, mu, logvar = _data()
    x = rate.clone().requires_grad_()
    out = klanneal.elbo_loss(x, counts, mu, logvar, 0.3, likelihood=Poisson(), reduction="sum")
    (2.5 * out.loss).backward()
    y = rate.clone().requires_grad_()
    want = -torch.distributions.Poisson(y).log_prob(counts).sum()
    (2.5 * want).backward()
    torch.testing.assert_close(out.recon, want.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss.detach(), want.detach() + 0.3 * _kl(mu, logvar))
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("theta_shape", ["gene", "cell_gene", "float"])
def test_negative_binomial_equals_torch_distributions(theta_shape):
    rate, counts, mu, logvar = _data()
    gen = torch.Generator().manual_seed(1)
    shape = {"gene": (7,), "cell_gene": (5, 7)}.get(theta_shape)
    theta = 2.5 if shape is None else (torch.rand(shape, generator=gen, dtype=F64) * 5 + 0.1)
    theta_a = theta if shape is None else theta.clone().requires_grad_()
    theta_b = theta if shape is None else theta.clone().requires_grad_()
    x = rate.clone().requires_grad_()
    out = klanneal.elbo_loss(
        x, counts, mu, logvar, 0.0, likelihood=NegativeBinomial(theta_a), reduction="sum"
    )
    (2.5 * out.loss).backward()
    y = rate.clone().requires_grad_()
    t = torch.as_tensor(theta_b, dtype=F64)
    nb = torch.distributions.NegativeBinomial(total_count=t, logits=y.log() - t.log())
    want = -nb.log_prob(counts).sum()
    (2.5 * want).backward()
    torch.testing.assert_close(out.recon, want.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-8, atol=1e-10)
    if shape is not None:  # a [G] theta's gradient is summed over the batch
        torch.testing.assert_close(theta_a.grad, theta_b.grad, rtol=1e-8, atol=1e-10)


def _zinb_by_hand(mu, theta, zi, x):
    """The mixture in float64, transcribed:
    p(0) = pi + (1 - pi) NB(0), p(x > 0) = (1 - pi) NB(x)."""
    pi = torch.sigmoid(zi)
    nb = torch.distributions.NegativeBinomial(total_count=theta, logits=mu.log() - theta.log())
    log_nb = nb.log_prob(x)
    zero = torch.log(pi + (1 - pi) * log_nb.exp())
    return -torch.where(x == 0, zero, torch.log1p(-pi) + log_nb)


def test_zinb_equals_the_mixture_transcribed():
    rate, counts, mu, logvar = _data()
    counts[:, :3] = 0  # plenty of zeros
    gen = torch.Generator().manual_seed(2)
    theta = (torch.rand(7, generator=gen, dtype=F64) * 5 + 0.2).requires_grad_()
    zi = torch.randn(5, 7, generator=gen, dtype=F64).requires_grad_()
    x = rate.clone().requires_grad_()
    likelihood = ZeroInflatedNegativeBinomial(theta, zi)
    out = klanneal.elbo_loss(x, counts, mu, logvar, 0.0, likelihood=likelihood, reduction="none")
    grads = torch.autograd.grad(out.loss.sum(), (x, theta, zi))
    theta2, zi2 = theta.detach().clone().requires_grad_(), zi.detach().clone().requires_grad_()
    y = rate.clone().requires_grad_()
    want = _zinb_by_hand(y, theta2, zi2, counts).sum(dim=1)
    want_grads = torch.autograd.grad(want.sum(), (y, theta2, zi2))
    torch.testing.assert_close(out.recon, want.detach(), rtol=1e-10, atol=1e-12)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)


def test_extremes_stay_finite_without_epsilon():
    # theta 1e-6 .. 1e8, counts up to 1e6, means 1e-10 .. 1e8, zi_logits +-80, fp32.
    theta = torch.tensor([1e-6, 1.0, 1e4, 1e8])
    rate = torch.tensor([[1e-10, 1.0, 1e8, 3.0], [5.0, 1e6, 2.0, 1e-3]])
    counts = torch.tensor([[0.0, 3.0, 1e6, 2.0], [1e6, 0.0, 7.0, 4.0]])
    zi = torch.tensor([-80.0, 80.0, 0.0, -3.0])
    mu = logvar = torch.zeros(2, 1)
    for likelihood in (Poisson(), NegativeBinomial(theta), ZeroInflatedNegativeBinomial(theta, zi)):
        x = rate.clone().requires_grad_()
        out = klanneal.elbo_loss(x, counts, mu, logvar, likelihood=likelihood, reduction="none")
        out.loss.sum().backward()
        assert torch.isfinite(out.loss).all() and torch.isfinite(x.grad).all(), likelihood
    # NB tends to Poisson as theta grows.
    nb = klanneal.elbo_loss(
        rate.double(), counts.double(), mu.double(), logvar.double(),
        likelihood=NegativeBinomial(1e12), reduction="none",
    )  # fmt: skip
    poisson = klanneal.elbo_loss(
        rate.double(), counts.double(), mu.double(), logvar.double(), likelihood=Poisson(),
        reduction="none",
    )  # fmt: skip
    torch.testing.assert_close(nb.recon, poisson.recon, rtol=1e-4, atol=0)


def test_mu_to_zero_with_zero_counts_costs_nothing():
    rate = torch.tensor([[1e-30, 1e-20]], dtype=F64, requires_grad=True)
    counts = torch.zeros(1, 2, dtype=F64)
    z = torch.zeros(1, 1, dtype=F64)
    out = klanneal.elbo_loss(rate, counts, z, z, likelihood=NegativeBinomial(2.0))
    out.loss.backward()
    assert float(out.recon) == pytest.approx(0.0, abs=1e-19)
    assert torch.isfinite(rate.grad).all()


def test_integer_counts_and_elboloss_with_a_learnable_theta():
    rate, counts, mu, logvar = _data()
    theta = torch.nn.Parameter(torch.ones(7, dtype=F64))
    criterion = klanneal.nn.ELBOLoss(
        klanneal.schedules.Monotonic(10), likelihood=NegativeBinomial(theta)
    )
    out = criterion(rate, counts.to(torch.int64), mu, logvar)
    out.loss.backward()
    assert theta.grad is not None and torch.isfinite(theta.grad).all()
    nb = NegativeBinomial(theta)
    float_counts = klanneal.elbo_loss(rate, counts, mu, logvar, 0.0, likelihood=nb)
    torch.testing.assert_close(out.recon, float_counts.recon)
    # A theta the decoder computes per batch: the likelihood set per call.
    criterion.likelihood = NegativeBinomial(theta.detach() * 2)
    per_call = criterion(rate, counts, mu, logvar)
    assert not math.isclose(float(per_call.recon), float(out.recon))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"likelihood": "negative_binomial"}, ValueError, "needs its theta"),
        ({"rate": -1.0}, ValueError, "means must be finite and > 0"),
        ({"rate": float("nan")}, ValueError, "means must be finite and > 0"),
        ({"counts": 0.5}, ValueError, "counts must be whole numbers >= 0"),
        ({"counts": -1.0}, ValueError, "counts must be whole numbers >= 0"),
        ({"theta": torch.zeros(7)}, ValueError, "theta: the inverse dispersion"),
        ({"theta": torch.ones(8)}, ValueError, "does not broadcast"),
        ({"theta": torch.ones(7, dtype=torch.int64)}, TypeError, "floating-point tensor"),
        ({"theta": -2.0}, ValueError, "theta must be finite and > 0"),
    ],
)
def test_bad_count_inputs_are_refused_by_name(kwargs, error, match):
    rate, counts, mu, logvar = (t.float() for t in _data())
    if "rate" in kwargs:
        rate[0, 0] = kwargs["rate"]
    if "counts" in kwargs:
        counts[0, 0] = kwargs["counts"]
    with pytest.raises(error, match=match):
        likelihood = kwargs.get("likelihood") or NegativeBinomial(kwargs.get("theta", 1.0))
        klanneal.elbo_loss(rate, counts, mu, logvar, likelihood=likelihood)
