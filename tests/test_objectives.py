"""The objectives beyond recon + beta * KL(q || N(0, I)): a learned Gaussian
prior, the capacity objective, a learnable beta, mixed precision, and the
ELBOLoss ergonomics that go with them. Each against elbo_loss_ref."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from elbo_cases import make_inputs, tolerances

import klanneal
from klanneal import _ops
from klanneal.nn import ELBOLoss
from klanneal.reference import elbo_loss_ref
from klanneal.schedules import Capacity, Cyclical, Monotonic

LIKELIHOODS = ("categorical", "bernoulli", "gaussian", "mse")
REDUCTIONS = ("batchmean", "sum", "none")
FREE_BITS = [(0.0, "batch"), (0.4, "batch"), (0.4, "sample")]


def _prior(mu: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    prior_mu = 0.5 * torch.randn(mu.shape, generator=gen, dtype=torch.float64)
    prior_logvar = 0.4 * torch.randn(mu.shape, generator=gen, dtype=torch.float64)
    return prior_mu.to(mu.dtype), prior_logvar.to(mu.dtype)


def _run(fn, inputs, prior=None, beta=0.7, upstream=None, **kwargs):
    """Outputs and the gradients of every differentiable input (None where absent)."""
    x, target, mu, logvar = (t.detach().clone().requires_grad_(t.is_floating_point())
                             for t in inputs)  # fmt: skip
    target = target.detach()
    pm = pl = None
    if prior is not None:
        pm, pl = (t.detach().clone().requires_grad_() for t in prior)
    if isinstance(beta, torch.Tensor):
        beta = beta.detach().clone().requires_grad_(beta.requires_grad)
    out = fn(x, target, mu, logvar, beta, prior_mu=pm, prior_logvar=pl, **kwargs)
    if upstream is None:
        upstream = torch.linspace(0.5, 2.5, out.loss.numel()).reshape(out.loss.shape)
    (out.loss * upstream).sum().backward()
    grads = [t.grad for t in (x, mu, logvar)]
    grads += [None if t is None else t.grad for t in (pm, pl)]
    grads.append(beta.grad if isinstance(beta, torch.Tensor) else None)
    return tuple(t.detach() for t in out), grads


def _assert_same(got, want, dtype):
    tol = tolerances(dtype)
    for name, a, b in zip(("loss", "recon", "kl", "kl_per_dim", "beta"), got[0], want[0]):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n}: {m}")
    names = ("recon_input", "mu", "logvar", "prior_mu", "prior_logvar", "beta")
    for name, a, b in zip(names, got[1], want[1]):
        assert (a is None) == (b is None), f"grad {name}: {a} vs {b}"
        if a is not None:
            torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"grad {n}: {m}")


def _valid(reduction, free_bits, mode):
    return not (reduction == "none" and free_bits > 0 and mode == "batch")


# ---- learned prior -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("free_bits,mode", FREE_BITS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_learned_prior_matches_reference(likelihood, reduction, free_bits, mode, dtype):
    if not _valid(reduction, free_bits, mode):
        pytest.skip("reduction='none' with batch free bits is refused")
    inputs = make_inputs(likelihood, dtype=dtype, latent=6)
    prior = _prior(inputs[2])
    kwargs = dict(likelihood=likelihood, reduction=reduction, free_bits=free_bits,
                  free_bits_mode=mode)  # fmt: skip
    got = _run(klanneal.elbo_loss, inputs, prior, **kwargs)
    want = _run(elbo_loss_ref, inputs, prior, **kwargs)
    _assert_same(got, want, dtype)


def test_prior_at_zero_mean_unit_variance_is_the_standard_kl():
    inputs = make_inputs("categorical", dtype=torch.float64)
    mu = inputs[2]
    zeros = (torch.zeros_like(mu), torch.zeros_like(mu))
    with_prior = klanneal.elbo_loss(*inputs, 0.7, prior_mu=zeros[0], prior_logvar=zeros[1])
    plain = klanneal.elbo_loss(*inputs, 0.7)
    torch.testing.assert_close(with_prior.loss, plain.loss, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(with_prior.kl_per_dim, plain.kl_per_dim, rtol=1e-13, atol=1e-13)


def test_prior_kl_is_the_closed_form():
    # KL(N(1, e^0) || N(0.5, e^{log 4})) = 0.5 * (log 4 - 0 + (1 + 0.25) / 4 - 1)
    mu, logvar = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    pm = torch.full((1, 1), 0.5, dtype=torch.float64)
    pl = torch.full((1, 1), math.log(4.0), dtype=torch.float64)
    x = torch.zeros(1, 1, 2, dtype=torch.float64)
    target = torch.zeros(1, 1, dtype=torch.int64)
    out = klanneal.elbo_loss(x, target, mu, logvar, prior_mu=pm, prior_logvar=pl)
    expected = 0.5 * (float(pl) + 1.25 / 4 - 1)
    assert out.kl.item() == pytest.approx(expected, rel=1e-14)


def test_prior_gradcheck_fp64():
    x, target, mu, logvar = make_inputs("bernoulli", dtype=torch.float64, latent=3)
    pm, pl = _prior(mu)
    leaves = [t.clone().requires_grad_() for t in (x, mu, logvar, pm, pl)]

    def f(x_, mu_, lv_, pm_, pl_):
        return klanneal.elbo_loss(x_, target, mu_, lv_, 0.6, likelihood="bernoulli",
                                  prior_mu=pm_, prior_logvar=pl_).loss  # fmt: skip

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(prior_mu=torch.zeros(3, 5)), "prior_logvar is missing"),
        (dict(prior_logvar=torch.zeros(3, 5)), "prior_mu is missing"),
        (dict(prior_mu=torch.zeros(3, 4), prior_logvar=torch.zeros(3, 4)), "shape of mu"),
        (
            dict(
                prior_mu=torch.zeros(3, 5, dtype=torch.float64),
                prior_logvar=torch.zeros(3, 5, dtype=torch.float64),
            ),  # fmt: skip
            "dtype of mu",
        ),
        (dict(prior_mu=[0.0], prior_logvar=torch.zeros(3, 5)), "must be a torch.Tensor"),
    ],
)
def test_prior_errors(bad, match):
    inputs = make_inputs("categorical")
    with pytest.raises((TypeError, ValueError), match=match):
        klanneal.elbo_loss(*inputs, **bad)


# ---- capacity ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("free_bits,mode", FREE_BITS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_capacity_matches_reference(likelihood, reduction, free_bits, mode, dtype):
    if not _valid(reduction, free_bits, mode):
        pytest.skip("reduction='none' with batch free bits is refused")
    inputs = make_inputs(likelihood, dtype=dtype, latent=6)
    # C between the examples' KL terms: some above it, some below (both signs).
    c = float(klanneal.elbo_loss(*inputs, likelihood=likelihood, reduction="none",
                                 free_bits=free_bits if mode == "sample" else 0.0,
                                 free_bits_mode="sample").kl.median())  # fmt: skip
    c += 0.05
    kwargs = dict(likelihood=likelihood, reduction=reduction, free_bits=free_bits,
                  free_bits_mode=mode, capacity=c)  # fmt: skip
    got = _run(klanneal.elbo_loss, inputs, **kwargs)
    want = _run(elbo_loss_ref, inputs, **kwargs)
    _assert_same(got, want, dtype)


def test_capacity_definition():
    inputs = make_inputs("gaussian", dtype=torch.float64)
    plain = klanneal.elbo_loss(*inputs, likelihood="gaussian", reduction="none")
    for c in (0.0, 1.0, 50.0):
        out = klanneal.elbo_loss(*inputs, 4.0, likelihood="gaussian", capacity=c)
        expected = plain.recon.mean() + 4.0 * (plain.kl.mean() - c).abs()
        torch.testing.assert_close(out.loss, expected, rtol=1e-13, atol=1e-13)
        per = klanneal.elbo_loss(*inputs, 4.0, likelihood="gaussian", capacity=c,
                                 reduction="none")  # fmt: skip
        torch.testing.assert_close(per.loss, plain.recon + 4.0 * (plain.kl - c).abs(),
                                   rtol=1e-13, atol=1e-13)  # fmt: skip
        summed = klanneal.elbo_loss(*inputs, 4.0, likelihood="gaussian", capacity=c,
                                    reduction="sum")  # fmt: skip
        torch.testing.assert_close(summed.loss, 3 * expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("step_type", ["int", "tensor"])
def test_capacity_schedule_at_step(step_type):
    inputs = make_inputs("categorical", dtype=torch.float64)
    schedule = Capacity(c_max=25.0, warmup_steps=1000)
    beta = Monotonic(warmup_steps=100)
    for step in (0, 50, 800, 5000):
        s = torch.tensor(step) if step_type == "tensor" else step
        got = klanneal.elbo_loss(*inputs, beta, step=s, capacity=schedule)
        want = elbo_loss_ref(*inputs, float(beta(step)), capacity=float(schedule(step)))
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-12)
        assert got.beta.item() == pytest.approx(float(beta(step)))


def test_capacity_schedule_with_a_float_beta_and_a_step_tensor():
    inputs = make_inputs("categorical", dtype=torch.float64)
    got = klanneal.elbo_loss(*inputs, 2.0, step=torch.tensor(300),
                             capacity=Capacity(c_max=25.0, warmup_steps=1000))  # fmt: skip
    want = elbo_loss_ref(*inputs, 2.0, capacity=7.5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-12)
    assert got.beta.item() == 2.0


def test_capacity_gradcheck_fp64():
    x, target, mu, logvar = make_inputs("gaussian", dtype=torch.float64, latent=3)
    leaves = [t.clone().requires_grad_() for t in (x, mu, logvar)]
    c = float(klanneal.elbo_loss(x, target, mu, logvar, likelihood="gaussian").kl) + 0.3

    def f(x_, mu_, lv_):
        return klanneal.elbo_loss(x_, target, mu_, lv_, 0.6, likelihood="gaussian",
                                  capacity=c).loss  # fmt: skip

    assert torch.autograd.gradcheck(f, leaves)


def test_a_capacity_as_beta_is_a_type_error():
    inputs = make_inputs("categorical")
    with pytest.raises(TypeError, match="capacity="):
        klanneal.elbo_loss(*inputs, Capacity(25, 1000), step=800)
    with pytest.raises(TypeError, match="capacity="):
        ELBOLoss(schedule=Capacity(25, 1000))


@pytest.mark.parametrize(
    "capacity,error,match",
    [
        (-1.0, ValueError, "capacity must be finite and >= 0"),
        (float("nan"), ValueError, "capacity must be finite"),
        (torch.tensor(1.0), TypeError, "tensor capacity"),
        ("5", TypeError, "capacity must be a real number"),
        (Monotonic(10, start=-1.0, stop=1.0), ValueError, "negative"),
    ],
)
def test_capacity_errors(capacity, error, match):
    inputs = make_inputs("categorical")
    step = 3 if isinstance(capacity, Monotonic) else None
    with pytest.raises(error, match=match):
        klanneal.elbo_loss(*inputs, capacity=capacity, step=step)


def test_capacity_schedule_needs_a_step():
    with pytest.raises(ValueError, match="step is required when capacity is a schedule"):
        klanneal.elbo_loss(*make_inputs("categorical"), capacity=Capacity(25, 1000))


def test_elbo_loss_module_steps_beta_and_capacity():
    inputs = make_inputs("categorical", dtype=torch.float64)
    beta, capacity = Cyclical(total_steps=40, n_cycles=2), Capacity(c_max=10.0, warmup_steps=20)
    criterion = ELBOLoss(schedule=beta, capacity=capacity)
    for step in range(6):
        out = criterion(*inputs)
        want = elbo_loss_ref(*inputs, float(beta(step)), capacity=float(capacity(step)))
        torch.testing.assert_close(out.loss, want.loss, rtol=1e-12, atol=1e-12)
        criterion.step()


# ---- learnable beta --------------------------------------------------------------


@pytest.mark.parametrize("capacity", [None, 1.5])
@pytest.mark.parametrize("free_bits,mode", FREE_BITS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_learnable_beta_gets_its_gradient(reduction, free_bits, mode, capacity):
    if not _valid(reduction, free_bits, mode):
        pytest.skip("reduction='none' with batch free bits is refused")
    inputs = make_inputs("categorical", dtype=torch.float64)
    beta = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    kwargs = dict(reduction=reduction, free_bits=free_bits, free_bits_mode=mode,
                  capacity=capacity)  # fmt: skip
    got = _run(klanneal.elbo_loss, inputs, beta=beta, **kwargs)
    want = _run(elbo_loss_ref, inputs, beta=beta, **kwargs)
    assert got[1][-1] is not None
    _assert_same(got, want, torch.float64)


def test_learnable_beta_float32_on_its_own():
    # Only beta requires grad; it is a float32 parameter (as nn.Parameter(torch.tensor(1.))).
    x, target, mu, logvar = make_inputs("categorical")
    beta = torch.nn.Parameter(torch.tensor(1.3))
    out = klanneal.elbo_loss(x, target, mu, logvar, beta)
    out.loss.backward()
    assert beta.grad is not None and beta.grad.dtype == torch.float32
    torch.testing.assert_close(beta.grad, out.kl)  # d (recon/B + beta * KL/B) / d beta = KL/B


def test_learnable_beta_on_the_fallback_path(monkeypatch):
    # The reference fallback reads the beta tensor to check it (validate=True):
    # a beta that requires grad must be read without torch's requires-grad
    # warning (an error under this suite's filterwarnings).
    monkeypatch.setenv("KLANNEAL_DISABLE_NATIVE", "1")
    x, target, mu, logvar = make_inputs("categorical")
    beta = torch.nn.Parameter(torch.tensor(1.3))
    out = klanneal.elbo_loss(x, target, mu, logvar, beta)
    out.loss.backward()
    torch.testing.assert_close(beta.grad, out.kl)


def test_learnable_beta_under_compile_fullgraph():
    inputs = make_inputs("categorical", dtype=torch.float64)
    beta = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(
        lambda *a: klanneal.elbo_loss(*a).loss, fullgraph=True, backend="aot_eager"
    )
    compiled(*inputs, beta).backward()
    grad = beta.grad.clone()
    beta.grad = None
    elbo_loss_ref(*inputs, beta).loss.backward()
    torch.testing.assert_close(grad, beta.grad)


# ---- the op: opcheck and torch.compile with the new inputs --------------------------


def test_opcheck_with_prior_capacity_and_beta_tensor():
    x, target, mu, logvar = make_inputs("categorical", dtype=torch.float64)
    pm, pl = _prior(mu)
    options = _ops.ElboOptions("categorical", "batchmean", 0.2, "sample", -100, 1.0, True)
    floats, ints = options.pack(
        capacity=_ops.constant_schedule(1.0), need_grad_recon=True, need_grad_mu=True,
        need_grad_logvar=True, need_grad_prior_mu=True, need_grad_prior_logvar=True,
    )  # fmt: skip
    args = (x.requires_grad_(), target, mu.requires_grad_(), logvar.requires_grad_(),
            torch.tensor(0.7, dtype=torch.float64, requires_grad=True), None, floats, ints,
            pm.requires_grad_(), pl.requires_grad_(), None)  # fmt: skip
    torch.library.opcheck(torch.ops.klanneal.elbo_loss.default, args)


def test_compile_with_prior_and_capacity_schedule_no_recompiles():
    import torch._dynamo

    torch._dynamo.reset()
    inputs = make_inputs("categorical")
    pm, pl = _prior(inputs[2])
    counts = {"frames": 0}

    def backend(gm, example_inputs):
        counts["frames"] += 1
        return gm.forward

    beta, capacity = Monotonic(100), Capacity(5.0, 50)

    def loss(x, t, mu, lv, pm_, pl_, step):
        return klanneal.elbo_loss(x, t, mu, lv, beta, step=step, prior_mu=pm_,
                                  prior_logvar=pl_, capacity=capacity).loss  # fmt: skip

    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    for step in (0, 7, 60, 300):
        got = compiled(*inputs, pm, pl, torch.tensor(step))
        want = elbo_loss_ref(*inputs, float(Monotonic(100)(step)), prior_mu=pm,
                             prior_logvar=pl, capacity=float(Capacity(5.0, 50)(step)))  # fmt: skip
        torch.testing.assert_close(got, want.loss)
    assert counts["frames"] == 1


@pytest.mark.parametrize("beta", [4.0, 2])
def test_a_number_beta_with_a_capacity_schedule_under_compile(beta):
    # Regression: a float or int beta with a capacity schedule at a step
    # tensor (ELBOLoss(4.0, capacity=Capacity(...)) under torch.compile, or
    # on CUDA) weighted the KL by 0: the kernel took beta from the schedule
    # slots at that step, left at NO_SCHEDULE's constant 0.
    import torch._dynamo

    torch._dynamo.reset()
    inputs = make_inputs("categorical")
    capacity = Capacity(5.0, 50)

    def loss(x, t, mu, lv, step):
        return klanneal.elbo_loss(x, t, mu, lv, beta, step=step, capacity=capacity).loss

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for step in (0, 20, 60):
        want = elbo_loss_ref(*inputs, float(beta), capacity=float(capacity(step))).loss
        torch.testing.assert_close(compiled(*inputs, torch.tensor(step)), want)
    criterion = ELBOLoss(schedule=beta, capacity=capacity)
    criterion.set_step(20)
    got = torch.compile(lambda *a: criterion(*a).loss, backend="aot_eager", fullgraph=True)(*inputs)
    want = elbo_loss_ref(*inputs, float(beta), capacity=float(capacity(20))).loss
    torch.testing.assert_close(got, want)


def test_python_numbers_that_change_between_calls_under_compile_fullgraph():
    # Regression: torch.compile makes a Python number that changes between
    # calls symbolic (automatic dynamic; every number with dynamic=True),
    # and the argument checks (math.isfinite, float()) could not trace one:
    # fullgraph=True failed on the second beta / free_bits / gaussian_var /
    # capacity, and dynamic=True on the first call of ELBOLoss.
    import torch._dynamo

    x, target, mu, logvar = make_inputs("gaussian")
    cases = {
        "beta": lambda v: {"beta": v},
        "free_bits": lambda v: {"beta": 1.0, "free_bits": v, "free_bits_mode": "sample"},
        "gaussian_var": lambda v: {"beta": 1.0, "gaussian_var": v},
        "capacity": lambda v: {"beta": 1.0, "capacity": v},
    }
    for name, kwargs in cases.items():
        torch._dynamo.reset()

        def loss(x, t, mu, lv, v, kwargs=kwargs):
            return klanneal.elbo_loss(x, t, mu, lv, likelihood="gaussian", **kwargs(v)).loss

        # backend="eager": what failed was Dynamo's tracing of the Python side.
        compiled = torch.compile(loss, backend="eager", fullgraph=True)
        for v in (0.5, 0.75, 2.0):
            want = elbo_loss_ref(x, target, mu, logvar, likelihood="gaussian", **kwargs(v))
            torch.testing.assert_close(compiled(x, target, mu, logvar, v), want.loss, msg=name)
        # Still checked once symbolic (a guard on the range): torch reports
        # the ValueError as an "Observed exception" that names it.
        with pytest.raises(Exception, match="must be finite and"):
            compiled(x, target, mu, logvar, -1.0)
    for criterion in (
        ELBOLoss(Cyclical(100), likelihood="gaussian", gaussian_var=0.5, free_bits=0.1),
        ELBOLoss(4.0, capacity=Capacity(5.0, 50), likelihood="gaussian"),
    ):
        torch._dynamo.reset()
        criterion.set_step(30)
        compiled = torch.compile(
            lambda *a, c=criterion: c(*a).loss, backend="aot_eager", fullgraph=True, dynamic=True
        )
        torch.testing.assert_close(
            compiled(x, target, mu, logvar), criterion(x, target, mu, logvar).loss
        )


def test_int_step_under_compile_does_not_recompile_per_step():
    import torch._dynamo

    torch._dynamo.reset()
    inputs = make_inputs("categorical")
    counts = {"frames": 0}

    def backend(gm, example_inputs):
        counts["frames"] += 1
        return gm.forward

    schedule = Cyclical(total_steps=100, n_cycles=4)
    compiled = torch.compile(
        lambda x, t, mu, lv, step: klanneal.elbo_loss(x, t, mu, lv, schedule, step=step).loss,
        backend=backend,
        fullgraph=True,
    )
    for step in range(8):
        got = compiled(*inputs, step * 5)
        want = elbo_loss_ref(*inputs, float(schedule(step * 5)))
        torch.testing.assert_close(got, want.loss)
    # The first call specialises on the int; the second marks it dynamic (one
    # recompile); no further step recompiles.
    assert counts["frames"] <= 2


# ---- mixed precision ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_inputs_return_float32_results(dtype, reduction):
    x, target, mu, logvar = make_inputs("categorical", dtype=dtype)
    pm, pl = _prior(mu)
    out = klanneal.elbo_loss(x.requires_grad_(), target, mu.requires_grad_(),
                             logvar.requires_grad_(), reduction=reduction, prior_mu=pm,
                             prior_logvar=pl, capacity=0.5)  # fmt: skip
    for field in out:
        assert field.dtype == torch.float32
    out.loss.sum().backward()
    assert x.grad.dtype == dtype and mu.grad.dtype == dtype and logvar.grad.dtype == dtype


def test_under_cpu_autocast_bf16_with_a_model():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(20, 2 * 4)
    decoder = torch.nn.Linear(4, 20)
    x = torch.rand(8, 20)
    target = (x > 0.5).float()

    def step(autocast: bool):
        for p in (*encoder.parameters(), *decoder.parameters()):
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h = encoder(x)
            mu, logvar = h.chunk(2, dim=1)
            logits = decoder(mu)
            out = klanneal.elbo_loss(logits, target, mu, logvar, 0.5, likelihood="bernoulli")
        out.loss.backward()
        return out, [p.grad.clone() for p in (*encoder.parameters(), *decoder.parameters())]

    out_amp, grads_amp = step(True)
    assert out_amp.loss.dtype == torch.float32  # the loss of bf16 activations, in fp32
    out_ref, grads_ref = step(False)
    # bf16 activations: an 8-bit mantissa; the loss and gradients agree to ~1e-2.
    torch.testing.assert_close(out_amp.loss, out_ref.loss, rtol=2e-2, atol=2e-2)
    for a, b in zip(grads_amp, grads_ref):
        assert a.dtype == torch.float32  # parameter gradients in the parameters' dtype
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


# ---- ELBOLoss ergonomics ----------------------------------------------------------------


def test_set_step():
    criterion = ELBOLoss(schedule=Monotonic(10))
    criterion.set_step(7)
    assert int(criterion.current_step) == 7 and criterion.beta == pytest.approx(0.7)
    with pytest.raises(ValueError, match="step must be >= 0"):
        criterion.set_step(-1)
    with pytest.raises(TypeError, match="step must be an int"):
        criterion.set_step(1.5)
    # A 0-d integer tensor is a step too; steps beyond the int64 counter
    # raise by name (they raised torch's conversion errors).
    criterion.set_step(torch.tensor(3))
    assert int(criterion.current_step) == 3
    with pytest.raises(TypeError, match="0-d integer tensor"):
        criterion.set_step(torch.tensor([3]))
    for big in (2**63, 2**70):
        with pytest.raises(ValueError, match="step must be >= 0 and < 2\\*\\*63"):
            criterion.set_step(big)
    assert int(criterion.current_step) == 3


def test_a_schedule_that_goes_negative_is_refused_at_construction():
    # Regression: accepted, then training failed at the first negative step.
    with pytest.raises(ValueError, match="schedule: Monotonic"):
        ELBOLoss(schedule=Monotonic(10, start=1.0, stop=-0.5))


def test_numpy_scalars_are_stored_as_floats(tmp_path):
    # Regression: a numpy capacity went into the state_dict as it was, which
    # torch.load (weights_only=True, its default) refuses.
    criterion = ELBOLoss(schedule=np.float32(0.5), capacity=np.float64(5.0))
    assert type(criterion.schedule) is float and type(criterion.capacity) is float
    path = tmp_path / "criterion.pt"
    torch.save(criterion.state_dict(), path)
    loaded = ELBOLoss(schedule=0.5, capacity=5.0)
    loaded.load_state_dict(torch.load(path, weights_only=True))


def test_state_dict_records_the_schedules():
    a = ELBOLoss(schedule=Cyclical(total_steps=100, n_cycles=4), capacity=Capacity(5, 10))
    for _ in range(3):
        a.step()
    state = a.state_dict()
    b = ELBOLoss(schedule=Cyclical(total_steps=100, n_cycles=4), capacity=Capacity(5, 10))
    b.load_state_dict(state)
    assert int(b.current_step) == 3
    other = ELBOLoss(schedule=Cyclical(total_steps=100, n_cycles=2), capacity=Capacity(5, 10))
    with pytest.raises(RuntimeError, match="different schedules"):
        other.load_state_dict(state)
    with pytest.warns(UserWarning, match="different schedules"):
        other.load_state_dict(state, strict=False)
    assert int(other.current_step) == 3


def test_forward_without_step_warns_once():
    inputs = make_inputs("categorical", batch=2, middle=(1,), vocab=3, latent=1)
    criterion = ELBOLoss(schedule=Monotonic(10))
    criterion.STEPLESS_CALLS_WARNING = 5
    with pytest.warns(UserWarning, match="without a step"):
        for _ in range(5):
            criterion(*inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(10):
            criterion(*inputs)  # once only
        fresh = ELBOLoss(schedule=Monotonic(10))
        fresh.STEPLESS_CALLS_WARNING = 5
        for _ in range(20):
            fresh(*inputs)
            fresh.step()  # stepped: no warning
        fresh.eval()
        for _ in range(20):
            fresh(*inputs)  # evaluation: no warning


def test_elbo_loss_module_passes_the_prior():
    inputs = make_inputs("categorical", dtype=torch.float64)
    pm, pl = _prior(inputs[2])
    out = ELBOLoss(schedule=0.5)(*inputs, pm, pl)
    want = elbo_loss_ref(*inputs, 0.5, prior_mu=pm, prior_logvar=pl)
    torch.testing.assert_close(out.loss, want.loss)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_prior_and_capacity_within_the_error_budget(dtype):
    # The half inputs, upcast, through the fp64 reference: the kernel computes
    # in fp32, so the difference is fp32 rounding, not half rounding.
    x, target, mu, logvar = make_inputs("categorical", dtype=dtype, latent=6)
    pm, pl = _prior(mu)
    got = _run(klanneal.elbo_loss, (x, target, mu, logvar), (pm, pl), capacity=0.5,
               free_bits=0.2, free_bits_mode="sample")  # fmt: skip
    wide = tuple(t.double() if t.is_floating_point() else t for t in (x, target, mu, logvar))
    want = _run(elbo_loss_ref, wide, (pm.double(), pl.double()), capacity=0.5, free_bits=0.2,
                free_bits_mode="sample")  # fmt: skip
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    eps = torch.finfo(dtype).eps
    for a, b in zip(got[1][:5], want[1][:5]):
        assert a.dtype == dtype
        # One rounding to the half dtype at the end.
        torch.testing.assert_close(a.double(), b, rtol=eps, atol=eps * b.abs().max().item())


@pytest.mark.parametrize(
    "group,error,match",
    [
        ("everyone", ValueError, "free_bits_group must be None, 'world' or a ProcessGroup"),
        (3, TypeError, "free_bits_group must be None, 'world' or a torch.distributed"),
        ("world", ValueError, "init_process_group"),
    ],
)
def test_free_bits_group_errors(group, error, match):
    with pytest.raises(error, match=match):
        klanneal.elbo_loss(*make_inputs("categorical"), free_bits=0.5, free_bits_group=group)
