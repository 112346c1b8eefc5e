"""klanneal.kl_terms: the table of KL families, its objects, and a reference-only family."""

from __future__ import annotations

import math

import pytest
import torch
from elbo_cases import make_inputs
from torch.distributions import Normal, kl_divergence

import klanneal
from klanneal import kl_terms
from klanneal.kl_terms import FAMILIES, DiagonalGaussian, Family, KLTerm, StandardNormal
from klanneal.reference import elbo_loss_ref, kl_per_element, reference_loss

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}
REDUCTIONS = ("batchmean", "sum", "none")
# (reduction, free_bits, free_bits_mode); batch free bits is a batch-level
# objective, refused with reduction="none".
CASES = [
    (reduction, free_bits, mode)
    for reduction in REDUCTIONS
    for free_bits, mode in ((0.0, "batch"), (0.3, "batch"), (0.3, "sample"))
    if not (reduction == "none" and free_bits > 0 and mode == "batch")
]


def _prior_tensors(name: str, mu: torch.Tensor) -> dict[str, torch.Tensor]:
    """Values for a native family's tensors, [B, D] like mu."""
    gen = torch.Generator().manual_seed(1)
    return {
        t: 0.5 * torch.randn(mu.shape, generator=gen, dtype=mu.dtype)
        for t in FAMILIES[name].tensors
    }


def _q_and_p(name: str, mu, logvar, tensors):
    """q = N(mu, exp(logvar)) and the family's prior as torch.distributions."""
    q = Normal(mu, (0.5 * logvar).exp())
    if name == "standard_normal":
        return q, Normal(torch.zeros_like(mu), torch.ones_like(mu))
    return q, Normal(tensors["prior_mu"], (0.5 * tensors["prior_logvar"]).exp())


NATIVE = [name for name, family in FAMILIES.items() if family.native]


def test_the_native_families_are_the_ops_prior_slots():
    assert NATIVE == ["standard_normal", "diagonal_gaussian"]
    for name in NATIVE:  # the op takes prior_mu / prior_logvar, both or neither
        assert FAMILIES[name].tensors in ((), ("prior_mu", "prior_logvar"))


@pytest.mark.parametrize("name", NATIVE)
def test_a_native_family_is_the_kl_of_torch_distributions(name):
    _, _, mu, logvar = make_inputs("gaussian", batch=4, latent=3, dtype=F64)
    tensors = _prior_tensors(name, mu)
    got = KLTerm(name, **tensors).kl(mu, logvar)
    torch.testing.assert_close(got, kl_divergence(*_q_and_p(name, mu, logvar, tensors)), **TOL)


def _run(fn, inputs, tensors, as_object: str = "", **options):
    """fn on fresh leaves, the prior as an object of family `as_object` or as
    keywords; backward of 2.5 * loss. The outputs, then the gradients of
    recon_input, mu, logvar and the prior's tensors."""
    x, y, mu, logvar = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (x, mu, logvar)]
    prior = {k: v.detach().clone().requires_grad_() for k, v in tensors.items()}
    kwargs = {"prior": KLTerm(as_object, **prior)} if as_object else prior
    out = fn(leaves[0], y, leaves[1], leaves[2], 0.7, **kwargs, **options)
    (2.5 * out.loss).sum().backward()
    return list(out) + [t.grad for t in leaves + list(prior.values())]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", NATIVE)
def test_a_native_family_equals_todays_keywords_and_the_kernel(name, reduction):
    inputs = make_inputs("categorical", batch=5, latent=4, dtype=F64)
    tensors = _prior_tensors(name, inputs[2])
    by_object = _run(elbo_loss_ref, inputs, tensors, as_object=name, reduction=reduction)
    # prior_mu= / prior_logvar= (or neither), as before the table: the same
    # formula, bit for bit; and the fused kernel.
    by_keywords = _run(elbo_loss_ref, inputs, tensors, reduction=reduction)
    fused = _run(klanneal.elbo_loss, inputs, tensors, reduction=reduction)
    torch.testing.assert_close(by_object, by_keywords, rtol=0, atol=0)
    torch.testing.assert_close(by_object, fused, **TOL)
    if name == "diagonal_gaussian":
        pmu, plv = (v.detach().requires_grad_() for v in tensors.values())
        out = elbo_loss_ref(*inputs, 0.7, prior=DiagonalGaussian(pmu, plv), reduction=reduction)
        (2.5 * out.loss).sum().backward()
        torch.testing.assert_close([pmu.grad, plv.grad], by_object[-2:], rtol=0, atol=0)


def test_kl_per_element_reads_the_table():
    _, _, mu, logvar = make_inputs("gaussian", batch=3, latent=4, dtype=F64)
    pmu = torch.randn(4, dtype=F64)  # a [D] prior broadcasts (klanneal.metrics passes one)
    torch.testing.assert_close(
        kl_per_element(mu, logvar), FAMILIES["standard_normal"].kl(mu, logvar), rtol=0, atol=0
    )
    # A missing one of the two is 0, as the reference has always taken it.
    want = FAMILIES["diagonal_gaussian"].kl(mu, logvar, pmu, torch.zeros_like(logvar))
    torch.testing.assert_close(kl_per_element(mu, logvar, prior_mu=pmu), want, rtol=0, atol=0)


# ---- a reference-only family, registered in one place ------------------------------

ISOTROPIC = "isotropic_gaussian_test"


def _isotropic_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_var) -> torch.Tensor:
    """KL of N(mu, exp(logvar)) from N(0, s^2), s^2 = prior_var (a float or a [D] tensor)."""
    s2 = torch.as_tensor(prior_var, dtype=mu.dtype, device=mu.device)
    return 0.5 * (s2.log() - logvar + (logvar.exp() + mu.pow(2)) / s2 - 1)


@pytest.fixture
def isotropic(monkeypatch):
    """The family registered in a copy of the table (the module's table is left as it was)."""
    monkeypatch.setattr(kl_terms, "FAMILIES", dict(kl_terms.FAMILIES))
    return kl_terms.register(Family(ISOTROPIC, _isotropic_kl, tensors=("prior_var",)))


def test_a_registered_family_is_reference_only_and_matches_torch_distributions(isotropic):
    assert not isotropic.native and kl_terms.FAMILIES[ISOTROPIC] is isotropic
    assert ISOTROPIC not in FAMILIES  # the fixture's copy
    _, _, mu, logvar = make_inputs("gaussian", batch=4, latent=3, dtype=F64)
    prior = KLTerm(ISOTROPIC, prior_var=0.25)
    assert not prior.native and prior.tensors() == {"prior_var": 0.25}
    want = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), 0.5))
    torch.testing.assert_close(prior.kl(mu, logvar), want, **TOL)


def _as_diagonal(mu: torch.Tensor, prior_var: torch.Tensor) -> dict[str, torch.Tensor]:
    """N(0, s^2 I) as the native family's tensors, [B, D] (the fused kernel's oracle)."""
    return {"prior_mu": torch.zeros_like(mu), "prior_logvar": prior_var.log().expand_as(mu)}


@pytest.mark.parametrize("capacity", [None, 0.4])
@pytest.mark.parametrize(("reduction", "free_bits", "free_bits_mode"), CASES)
def test_a_registered_family_gets_loss_and_gradients_through_the_reference(
    isotropic, reduction, free_bits, free_bits_mode, capacity
):
    x, y, mu, logvar = make_inputs("gaussian", batch=6, middle=(5,), latent=4, dtype=F64)
    s2 = torch.tensor([0.25, 1.0, 2.0, 0.6], dtype=F64)  # [D], a learnable prior variance
    options = {"reduction": reduction, "free_bits": free_bits, "free_bits_mode": free_bits_mode,
               "capacity": capacity, "likelihood": "gaussian"}  # fmt: skip
    leaves = [t.clone().requires_grad_() for t in (x, mu, logvar, s2)]
    prior = KLTerm(ISOTROPIC, prior_var=leaves[3])
    out = elbo_loss_ref(*leaves[:1], y, *leaves[1:3], 0.7, prior=prior, **options)
    (2.5 * out.loss).sum().backward()
    # The same prior as the fused kernel's diagonal Gaussian N(0, exp(log s^2)).
    fused_leaves = [t.clone().requires_grad_() for t in (x, mu, logvar)]
    native = _as_diagonal(mu, s2)
    native["prior_logvar"] = native["prior_logvar"].clone().requires_grad_()
    fused = klanneal.elbo_loss(fused_leaves[0], y, *fused_leaves[1:], 0.7, **native, **options)
    (2.5 * fused.loss).sum().backward()
    for a, b in zip(out, fused):
        torch.testing.assert_close(a, b, **TOL)
    for leaf, fused_leaf in zip(leaves[:3], fused_leaves):
        torch.testing.assert_close(leaf.grad, fused_leaf.grad, **TOL)
    # d loss / d s^2_d = sum_b d loss / d log s^2_bd / s^2_d, from autograd.
    want = native["prior_logvar"].grad.sum(dim=0) / s2
    torch.testing.assert_close(leaves[3].grad, want, **TOL)


def test_a_registered_family_takes_the_global_batch_mean(isotropic):
    # Data-parallel batch free bits: the all-reduced mean (given here) sets
    # the clamp's value and mask; the gradient flows through the local batch.
    x, y, mu, logvar = make_inputs("gaussian", batch=4, middle=(3,), latent=4, dtype=F64)
    s2 = torch.tensor(0.5, dtype=F64)
    global_mean = torch.tensor([2.0, 0.1, 0.9, 0.05], dtype=F64)
    common = {"step": None, "likelihood": "gaussian", "reduction": "batchmean",
              "free_bits": 0.5, "free_bits_mode": "batch", "ignore_index": -100,
              "gaussian_var": 1.0, "capacity": None,
              "global_mean": lambda _: global_mean}  # fmt: skip
    runs = []
    for prior in (KLTerm(ISOTROPIC, prior_var=s2), DiagonalGaussian(**_as_diagonal(mu, s2))):
        m = mu.clone().requires_grad_()
        out = reference_loss(
            x, y, m, logvar, 0.7, prior_mu=None, prior_logvar=None, prior=prior, **common
        )
        out.loss.backward()
        runs.append((out.loss, m.grad))
    torch.testing.assert_close(runs[0], runs[1], **TOL)
    assert bool((runs[0][1][:, [1, 3]] == 0).all())  # below lambda globally: clamped


def test_a_registered_family_in_half_precision_is_computed_in_float32(isotropic):
    # The prior's tensors are widened with the latents, as prior_mu and prior_logvar are.
    inputs = make_inputs("gaussian", batch=3, latent=4, dtype=torch.bfloat16)
    s2 = torch.full((4,), 0.6, dtype=torch.bfloat16)
    out = elbo_loss_ref(*inputs, prior=KLTerm(ISOTROPIC, prior_var=s2), likelihood="mse")
    wide = [t.float() for t in inputs]
    want = elbo_loss_ref(*wide, prior=KLTerm(ISOTROPIC, prior_var=s2.float()), likelihood="mse")
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_the_default_check_of_a_registered_family(isotropic):
    mu = torch.zeros(3, 4)
    KLTerm(ISOTROPIC, prior_var=0.5).check(mu)
    KLTerm(ISOTROPIC, prior_var=torch.ones(4)).check(mu)
    cases = [
        ("a", TypeError, "prior_var must be a float or a tensor"),
        (True, TypeError, "prior_var must be a float or a tensor"),
        (torch.ones(4, dtype=torch.int64), TypeError, "prior_var must be a floating-point"),
        (torch.ones(5), ValueError, r"prior_var does not broadcast: \(5,\) to mu's \(3, 4\)"),
        (torch.ones(2, 3, 4), ValueError, "prior_var does not broadcast"),
        (torch.ones(4, device="meta"), ValueError, "prior_var is on meta but mu is on cpu"),
    ]
    for value, error, match in cases:
        with pytest.raises(error, match=match):
            KLTerm(ISOTROPIC, prior_var=value).check(mu)


# ---- errors ---------------------------------------------------------------------------


def test_resolve():
    pmu, plv = torch.zeros(2, 3), torch.zeros(2, 3)
    assert type(kl_terms.resolve(None)) is StandardNormal
    term = kl_terms.resolve(None, pmu, plv)
    assert isinstance(term, DiagonalGaussian) and term.prior_mu is pmu and term.prior_logvar is plv
    assert term.tensors() == {"prior_mu": pmu, "prior_logvar": plv} and term.native
    prior = StandardNormal()
    assert kl_terms.resolve(prior) is prior and prior.tensors() == {}
    assert repr(prior) == "StandardNormal()"
    assert repr(term) == (
        "DiagonalGaussian(prior_mu=<tensor (2, 3) torch.float32>, "
        "prior_logvar=<tensor (2, 3) torch.float32>)"
    )
    assert repr(KLTerm("standard_normal")) == "KLTerm('standard_normal')"


def _native():
    return kl_terms.register(Family("laplace", FAMILIES["standard_normal"].kl, native=True))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: kl_terms.resolve(StandardNormal(), torch.zeros(1)), TypeError,
         "prior= and prior_mu= both describe the prior"),
        (lambda: kl_terms.resolve(StandardNormal(), None, torch.zeros(1)), TypeError,
         "prior= and prior_logvar="),
        (lambda: kl_terms.resolve("standard_normal"), TypeError,
         "prior must be a klanneal.kl_terms object .* got str"),
        (lambda: kl_terms.register("isotropic"), TypeError, "takes a klanneal.kl_terms.Family"),
        (_native, ValueError, "register: family 'laplace' has native=True"),
        (lambda: KLTerm("laplace"), ValueError, "unknown KL family 'laplace'"),
        (lambda: KLTerm("diagonal_gaussian", prior_mu=1.0), TypeError,
         r"takes prior_mu, prior_logvar: missing \['prior_logvar'\], unknown \[\]"),
        (lambda: KLTerm("standard_normal", scale=2.0), TypeError,
         r"takes no tensors: missing \[\], unknown \['scale'\]"),
        (lambda: DiagonalGaussian(torch.zeros(2, 3), None).check(torch.zeros(2, 3)), ValueError,
         "prior_mu and prior_logvar go together: prior_logvar is missing"),
        (lambda: DiagonalGaussian(torch.zeros(2, 4), torch.zeros(2, 4)).check(torch.zeros(2, 3)),
         ValueError, "prior_mu must have the shape of mu"),
        (lambda: DiagonalGaussian(torch.zeros(2, 3), torch.zeros(2, 3, dtype=F64))
         .check(torch.zeros(2, 3)), TypeError, "prior_logvar must have the dtype of mu"),
        (lambda: elbo_loss_ref(*make_inputs("mse"), prior=StandardNormal(),
                               prior_mu=torch.zeros(3, 5)), TypeError, "both describe the prior"),
        (lambda: elbo_loss_ref(*make_inputs("mse"), prior=object()), TypeError,
         "prior must be a klanneal.kl_terms object"),
    ],
)  # fmt: skip
def test_kl_term_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("name", [*FAMILIES, ISOTROPIC])
def test_a_registered_name_is_refused(isotropic, name):
    with pytest.raises(ValueError, match=f"'{name}' is already registered"):
        kl_terms.register(Family(name, _isotropic_kl, tensors=("prior_var",)))


def test_the_isotropic_formula_at_a_float_variance_is_its_closed_form(isotropic):
    mu, logvar = torch.tensor([[0.3]], dtype=F64), torch.tensor([[-0.2]], dtype=F64)
    s2 = 1.7
    want = 0.5 * (math.log(s2) + 0.2 + (math.exp(-0.2) + 0.09) / s2 - 1)
    assert float(KLTerm(ISOTROPIC, prior_var=s2).kl(mu, logvar)) == pytest.approx(want, rel=1e-14)


# ---- prior= through the public entry points (klanneal._call) ------------------------


def test_elbo_loss_takes_prior_objects_like_the_keywords():
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 9, generator=gen), torch.rand(4, 9, generator=gen)
    mu, logvar, pmu, plv = (torch.randn(4, 3, generator=gen) for _ in range(4))
    by_keywords = klanneal.elbo_loss(x, y, mu, logvar, 0.5, likelihood="bernoulli",
                                     prior_mu=pmu, prior_logvar=plv)  # fmt: skip
    by_object = klanneal.elbo_loss(x, y, mu, logvar, 0.5, likelihood="bernoulli",
                                   prior=DiagonalGaussian(pmu, plv))  # fmt: skip
    assert torch.equal(by_keywords.loss, by_object.loss)
    standard = klanneal.elbo_loss(x, y, mu, logvar, 0.5, likelihood="bernoulli")
    explicit = klanneal.elbo_loss(x, y, mu, logvar, 0.5, likelihood="bernoulli",
                                  prior=kl_terms.StandardNormal())  # fmt: skip
    assert torch.equal(standard.loss, explicit.loss)
    with pytest.raises(TypeError, match="prior"):
        klanneal.elbo_loss(
            x, y, mu, logvar, likelihood="bernoulli", prior=DiagonalGaussian(pmu, plv), prior_mu=pmu
        )
    with pytest.raises(TypeError, match="prior"):
        klanneal.elbo_loss(x, y, mu, logvar, likelihood="bernoulli", prior="normal")


@pytest.mark.parametrize("entry", ["elbo_loss", "ELBOLoss", "linear_elbo_loss"])
def test_a_registered_family_works_through_every_entry_point(isotropic, entry):
    # Registered in one place (the fixture): elbo_loss, ELBOLoss and
    # linear_elbo_loss route it to the reference, with gradients for its tensor.
    gen = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(3, 5, 6, generator=gen), torch.randn(11, 6, generator=gen)
    target = torch.randint(0, 11, (3, 5), generator=gen)
    mu, logvar = torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen)
    results = []
    for as_diagonal in (False, True):
        s2 = torch.tensor(0.3, requires_grad=True)
        leaves = [t.clone().requires_grad_() for t in (hidden, mu, logvar)]
        if as_diagonal:  # the same prior in the native family: the reference values
            kw = _as_diagonal(leaves[1], s2)
            prior = DiagonalGaussian(kw["prior_mu"], kw["prior_logvar"])
        else:
            prior = KLTerm(ISOTROPIC, prior_var=s2)
        logits = torch.nn.functional.linear(leaves[0], weight)
        if entry == "elbo_loss":
            out = klanneal.elbo_loss(logits, target, *leaves[1:], 0.7, prior=prior)
        elif entry == "ELBOLoss":
            out = klanneal.nn.ELBOLoss(0.7)(logits, target, *leaves[1:], prior=prior)
        else:
            out = klanneal.linear_elbo_loss(
                leaves[0], weight, target, *leaves[1:], 0.7, prior=prior
            )
        out.loss.backward()
        results.append((out.loss.detach(), [t.grad for t in leaves], s2.grad))
    (loss_a, grads_a, s2_a), (loss_b, grads_b, s2_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(s2_a, s2_b)
