"""The count families through elbo_loss's COUNTS path: the op klanneal::count_nll
(reconstruction, gradients in the forward pass) plus the fused KL term."""

import pytest
import torch

import klanneal
from klanneal import _count_op
from klanneal.likelihoods import NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial

B, G, D = 5, 7, 3


def _inputs(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mu_counts = (torch.rand(B, G, generator=gen, dtype=torch.float64) * 4 + 0.05).to(dtype)
    counts = torch.poisson(mu_counts.double(), generator=gen).to(dtype)
    theta = (torch.rand(G, generator=gen, dtype=torch.float64) * 3 + 0.2).to(dtype)
    zi = torch.randn(B, G, generator=gen, dtype=torch.float64).to(dtype)
    mu = torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype)
    logvar = (0.3 * torch.randn(B, D, generator=gen, dtype=torch.float64)).to(dtype)
    return mu_counts, counts, theta, zi, mu, logvar


def _family(name, theta, zi):
    if name == "poisson":
        return Poisson()
    if name == "nb":
        return NegativeBinomial(theta)
    return ZeroInflatedNegativeBinomial(theta, zi)


FAMILIES = ["poisson", "nb", "zinb"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize(
    "kl_options",
    [{}, {"free_bits": 0.2, "free_bits_mode": "sample"}, {"capacity": 0.5}],
    ids=["plain", "free-bits", "capacity"],
)
def test_loss_and_gradients_equal_the_reference(name, reduction, kl_options):
    tensors = _inputs()
    grads = []
    results = []
    for fn in (klanneal.elbo_loss, klanneal.elbo_loss_ref):
        rate, counts, theta, zi, mu, logvar = (t.clone().requires_grad_() for t in tensors)
        counts = counts.detach()
        out = fn(
            rate, counts, mu, logvar, 0.7, likelihood=_family(name, theta, zi),
            reduction=reduction, **kl_options,
        )  # fmt: skip
        weight = torch.arange(1.0, B + 1, dtype=torch.float64) if reduction == "none" else 1.0
        (out.loss * weight).sum().backward()
        results.append(out)
        grads.append([t.grad for t in (rate, theta, zi, mu, logvar)])
    for field in ("loss", "recon", "kl", "kl_per_dim", "beta"):
        torch.testing.assert_close(getattr(results[0], field), getattr(results[1], field))
    for got, want in zip(*grads):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want)


def test_the_fused_path_is_the_count_op():
    # elbo_loss builds a COUNTS call: the op klanneal::count_nll runs.
    rate, counts, theta, zi, mu, logvar = _inputs()
    call = klanneal._call.elbo_call(
        rate, counts, mu, logvar, 1.0, None, ZeroInflatedNegativeBinomial(theta, zi),
        "batchmean", 0.0, "batch", -100, 1.0, None, None, None, None, False, True,
    )  # fmt: skip
    assert call.path == "counts"


@pytest.mark.parametrize("name", FAMILIES)
def test_gradcheck_float64(name):
    rate, counts, theta, zi, mu, logvar = (t.clone() for t in _inputs())

    def loss(rate, theta, zi, mu, logvar):
        return klanneal.elbo_loss(
            rate, counts, mu, logvar, 0.5, likelihood=_family(name, theta, zi)
        ).loss

    args = [t.requires_grad_() for t in (rate, theta, zi, mu, logvar)]
    assert torch.autograd.gradcheck(loss, args)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("theta_shape", ["gene", "cell-gene", "none"])
def test_opcheck(reduction, theta_shape):
    rate, counts, theta, zi, _, _ = _inputs()
    if theta_shape == "cell-gene":
        theta = theta.expand(B, G).contiguous()
    family = "poisson" if theta_shape == "none" else "zero_inflated_negative_binomial"
    has_params = theta_shape != "none"
    opts = _count_op.CountOptions(family, reduction, True, True, has_params, has_params)
    args = (
        rate.requires_grad_(), counts, None if theta_shape == "none" else theta.requires_grad_(),
        None if theta_shape == "none" else zi.requires_grad_(), None, opts.pack(),
    )  # fmt: skip
    torch.library.opcheck(torch.ops.klanneal.count_nll.default, args)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph_without_recompiles():
    torch._dynamo.reset()
    rate, counts, theta, zi, mu, logvar = _inputs(torch.float32)

    def step(rate, theta, zi, mu, logvar, beta):
        likelihood = ZeroInflatedNegativeBinomial(theta, zi)
        return klanneal.elbo_loss(rate, counts, mu, logvar, beta, likelihood=likelihood).loss

    compiled = torch.compile(step, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(3):
            args = [t.clone().requires_grad_() for t in (rate, theta, zi, mu, logvar)]
            beta = torch.tensor(0.1 * (k + 1))
            got = compiled(*args, beta)
            got.backward()
            ref_args = [t.clone().requires_grad_() for t in (rate, theta, zi, mu, logvar)]
            want = step(*ref_args, beta)
            want.backward()
            torch.testing.assert_close(got, want)
            for a, r in zip(args, ref_args):
                torch.testing.assert_close(a.grad, r.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    rate, counts, theta, zi, mu, logvar = _inputs(torch.float32)
    half = [t.to(dtype).requires_grad_() for t in (rate, theta, zi, mu, logvar)]
    out = klanneal.elbo_loss(
        half[0], counts, half[3], half[4], 0.5, likelihood=ZeroInflatedNegativeBinomial(*half[1:3])
    )
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert all(t.grad.dtype == dtype for t in half)
    ref = klanneal.elbo_loss_ref(
        *(t.detach().float() for t in (half[0], counts, half[3], half[4])),
        0.5, likelihood=ZeroInflatedNegativeBinomial(*(t.detach().float() for t in half[1:3])),
    )  # fmt: skip
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)


def test_elbo_loss_module_takes_a_count_likelihood():
    rate, counts, theta, zi, mu, logvar = _inputs()
    theta.requires_grad_()
    criterion = klanneal.nn.ELBOLoss(0.5, likelihood=NegativeBinomial(theta))
    out = criterion(rate, counts, mu, logvar)
    out.loss.backward()
    assert theta.grad is not None and theta.grad.shape == (G,)


@pytest.mark.parametrize("how", ["module", "name"])
def test_poisson_takes_the_module_and_its_name(how):
    # Regression: Poisson has no parameters, so ELBOLoss kept only its name and
    # likelihood="poisson" went on as a name: the count path read the
    # parameters of a string (AttributeError).
    rate, counts, _, _, mu, logvar = _inputs()
    want = klanneal.elbo_loss(rate, counts, mu, logvar, 0.5, likelihood=Poisson())
    if how == "module":
        got = klanneal.nn.ELBOLoss(0.5, likelihood=Poisson())(rate, counts, mu, logvar)
    else:
        got = klanneal.elbo_loss(rate, counts, mu, logvar, 0.5, likelihood="poisson")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.skipif(not _count_op._HAS_NATIVE, reason="needs the native count kernel")
def test_the_family_codes_are_the_kernels():
    # _count_op.COUNT_FAMILIES[code] names the C++ family of that code.
    short = {"poisson": "poisson", "nb": "negative_binomial",
             "zinb": "zero_inflated_negative_binomial"}  # fmt: skip
    layout = klanneal._C.count_recon_layout()["family"]
    assert [short[name] for name in layout] == list(_count_op.COUNT_FAMILIES)
