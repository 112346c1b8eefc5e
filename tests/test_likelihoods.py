"""klanneal.likelihoods: the table of likelihood families and the parameterised objects."""

from __future__ import annotations

import pytest
import torch

import klanneal
from klanneal import _ops, likelihoods
from klanneal.likelihoods import FAMILIES, MSE, Bernoulli, Categorical, Gaussian


def test_the_native_families_are_the_cpp_enum_in_order():
    native = [name for name, family in FAMILIES.items() if family.native]
    assert tuple(native) == _ops.LIKELIHOODS  # _C.elbo_layout()["likelihood"]
    assert all(f.target in likelihoods.TARGET_KINDS for f in FAMILIES.values())


def _inputs(likelihood: str):
    gen = torch.Generator().manual_seed(0)
    if likelihood == "categorical":
        x, y = torch.randn(3, 4, 7, generator=gen), torch.randint(0, 7, (3, 4), generator=gen)
    else:
        x, y = torch.randn(3, 10, generator=gen), torch.rand(3, 10, generator=gen)
    return x.requires_grad_(), y, torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen)


@pytest.mark.parametrize(
    ("obj", "name", "options"),
    [
        (Categorical(), "categorical", {}),
        (Bernoulli(), "bernoulli", {}),
        (Gaussian(var=0.5), "gaussian", {"gaussian_var": 0.5}),
        (MSE(), "mse", {}),
    ],
)
def test_an_object_is_its_family_with_its_parameters(obj, name, options):
    x, y, mu, logvar = _inputs(name)
    want = klanneal.elbo_loss(x, y, mu, logvar, 0.7, likelihood=name, **options)
    got = klanneal.elbo_loss(x, y, mu, logvar, 0.7, likelihood=obj)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    ref = klanneal.elbo_loss_ref(x, y, mu, logvar, 0.7, likelihood=obj)
    torch.testing.assert_close(ref.loss, want.loss, rtol=1e-6, atol=1e-6)
    module = klanneal.nn.ELBOLoss(0.7, likelihood=obj)
    torch.testing.assert_close(module(x, y, mu, logvar).loss, want.loss, rtol=0, atol=0)
    assert (module.likelihood, module.gaussian_var) == (name, options.get("gaussian_var", 1.0))


def test_the_reference_reads_the_table():
    # The table's formula is what elbo_loss_ref sums: a gaussian by hand.
    x, y, mu, logvar = _inputs("gaussian")
    out = klanneal.elbo_loss_ref(x, y, mu, logvar, 0.0, likelihood=Gaussian(var=2.0))
    by_hand = (0.5 * ((x - y) ** 2 / 2.0 + torch.log(torch.tensor(2 * torch.pi * 2.0)))).sum() / 3
    torch.testing.assert_close(out.recon, by_hand.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: Gaussian(var=0.0), ValueError, "var must be finite and > 0"),
        (lambda: Gaussian(var="1"), TypeError, "var must be a float"),
        (lambda: likelihoods.resolve(3, 1.0), TypeError, "likelihood must be one of"),
        (lambda: likelihoods.resolve(Gaussian(0.5), 2.0), ValueError, "contradicts"),
        (
            lambda: klanneal.elbo_loss(*_inputs("bernoulli"), likelihood=object()),
            TypeError,
            "klanneal.likelihoods object",
        ),
        (
            lambda: klanneal.nn.ELBOLoss(likelihood=Gaussian(0.5), gaussian_var=3.0),
            ValueError,
            "contradicts",
        ),
    ],
)
def test_likelihood_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
