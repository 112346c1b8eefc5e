"""Regression tests of issue 9: inputs that used to give a wrong number or a hang silently.

Each test here failed on the code before the fix: inplace on views of a
parameter, fp16 gradients under a loss scaler, the precision of large
logits, accepted-but-mishandled inputs, and the thread pool's growth. The
fork-safety stress test and the guard-page test are in test_fork.py and
test_guard_pages.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from elbo_cases import check_retained_backwards, make_inputs, run

import klanneal
from klanneal import _ops, elbo_loss, elbo_loss_ref
from klanneal.schedules import Constant, Cyclical, Monotonic

pytestmark = pytest.mark.skipif(not klanneal.HAS_NATIVE, reason="needs the native extension")
HERE = os.path.dirname(__file__)


def _latents(batch: int, dim: int = 4, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(dtype)
    logvar = (0.3 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)).to(dtype)
    return mu, logvar


# ---- 1. inplace on a view of a leaf -----------------------------------------------


@pytest.mark.parametrize(
    "make_view",
    [
        lambda p: p.view(2, 3, 5),
        lambda p: p[:].view(2, 3, 5),
        lambda p: p.reshape(2, 3, 5),
        lambda p: p.view(6, 5).view(2, 3, 5),  # a view of a view
    ],
    ids=["view", "slice", "reshape", "view-of-view"],
)
def test_inplace_refuses_a_view_of_a_parameter(make_view):
    p = torch.nn.Parameter(torch.randn(30))
    before = p.detach().clone()
    target = torch.randint(0, 5, (2, 3))
    mu, logvar = _latents(2)
    with pytest.raises(ValueError, match="view of one"):
        elbo_loss(make_view(p), target, mu, logvar, inplace=True)
    assert torch.equal(p.detach(), before)  # the parameter was not overwritten
    # Not inplace, the same view is fine and its gradient reaches the parameter.
    elbo_loss(make_view(p), target, mu, logvar).loss.backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()


def test_inplace_on_a_view_of_a_non_leaf_still_works():
    base = torch.randn(30, requires_grad=True)
    logits = (base * 1.0).view(2, 3, 5)  # a decoder output, viewed
    target = torch.randint(0, 5, (2, 3))
    mu, logvar = _latents(2)
    out = elbo_loss(logits, target, mu, logvar, inplace=True)
    out.loss.backward()
    want = run(elbo_loss_ref, (base.detach().view(2, 3, 5), target, mu, logvar), torch.tensor(1.0))
    torch.testing.assert_close(base.grad.view(2, 3, 5), want[1][0])


# ---- 2. fp16/bf16 gradients under a loss scaler ------------------------------------

SCALE = 2.0**16  # GradScaler's default initial scale


def _exact_grad(x, target, mu, logvar, upstream, **kwargs):
    """d (upstream * loss) / d x in float64."""
    x64 = x.detach().double().requires_grad_()
    out = elbo_loss_ref(x64, target, mu.double(), logvar.double(), **kwargs)
    (upstream * out.loss).backward()
    return x64.grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradients_survive_a_gradscaler_scale(dtype):
    gen = torch.Generator().manual_seed(0)
    batch, steps, vocab = 64, 32, 2000
    x = (2 * torch.randn(batch, steps, vocab, generator=gen)).to(dtype)
    target = torch.randint(0, vocab, (batch, steps), generator=gen)
    mu, logvar = _latents(batch, 8, dtype)
    leaf = x.clone().requires_grad_()
    out = elbo_loss(leaf, target, mu, logvar)
    (SCALE * out.loss).backward()
    got = leaf.grad.double()
    want = _exact_grad(x, target, mu, logvar, SCALE)
    # Every gradient the scaled dtype can represent comes back non-zero ...
    tiny = torch.finfo(dtype).tiny
    significant = want.abs() > 2 * tiny
    assert int((got[significant] == 0).sum()) == 0
    # ... and within the dtype's rounding of the scaled value.
    rel = ((got - want).abs() / want.abs())[significant]
    eps = torch.finfo(dtype).eps
    assert float(rel.median()) < eps and float(rel.max()) < 2 * eps
    assert leaf.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradient_that_overflows_before_scaling_is_finite_after(dtype):
    # d/dx of 0.5 (x - y)^2 / var at x = 300, var = 0.004 is 75000 > fp16's
    # 65504; with an upstream 0.25 it is 18750, which fits.
    x = torch.full((1, 8), 300.0, dtype=dtype, requires_grad=True)
    target = torch.zeros(1, 8, dtype=dtype)
    mu, logvar = _latents(1, 2, dtype)
    out = elbo_loss(x, target, mu, logvar, likelihood="gaussian", gaussian_var=0.004)
    (0.25 * out.loss).backward()
    want = torch.full((1, 8), 18750.0, dtype=torch.float64)
    torch.testing.assert_close(x.grad.double(), want, rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_return_float32_results(dtype):
    # Regression: fp16 with reduction="sum" returned inf for a loss computed in fp32.
    x = torch.zeros(64, 784, dtype=dtype)
    target = torch.ones(64, 784, dtype=dtype)
    mu, logvar = _latents(64, 4, dtype)
    out = elbo_loss(x, target, mu, logvar, likelihood="bernoulli", reduction="sum")
    assert all(t.dtype == torch.float32 for t in out)
    assert out.loss.item() == pytest.approx(64 * 784 * math.log(2) + out.kl.item(), rel=1e-5)


# ---- 3. categorical precision at large logits ---------------------------------------


def _two_class(c: float, gap: float, dtype: torch.dtype, vocab: int = 2):
    """Rows [c, c - gap, c - gap - 30, ...] with target 0: loss log(1 + e^-gap + ...)."""
    row = torch.full((vocab,), c - gap - 30.0, dtype=torch.float64)
    row[0], row[1] = c, c - gap
    return row.to(dtype).reshape(1, 1, vocab)


_PRECISION_SCRIPT = """
import math, torch, klanneal
from klanneal import elbo_loss
assert klanneal.build_info()["simd"] == "{level}", klanneal.build_info()
for dtype in (torch.float32, torch.float64):
    eps = torch.finfo(dtype).eps
    for vocab in (2, 7, 40, 203):  # scalar tails and whole vectors
        for c in (0.0, 1e2, 1e4, -1e4):
            for gap in (7.0, 13.0):
                row = torch.full((vocab,), c - gap - 30.0, dtype=torch.float64)
                row[0], row[1] = c, c - gap
                x = row.to(dtype).reshape(1, 1, vocab).requires_grad_()
                mu = torch.zeros(1, 1, dtype=dtype)
                out = elbo_loss(x, torch.zeros(1, 1, dtype=torch.int64), mu, mu)
                out.loss.backward()
                # Exact values from the rounded inputs, in float64.
                xd = x.detach().double().reshape(-1)
                shifted = xd - xd.max()
                lse = math.log(float(shifted.exp().sum()))
                loss = lse - float(shifted[0])
                grad0 = math.exp(float(shifted[0]) - lse) - 1.0
                # A few ulps of log(s) <= log(V), whatever the logits' magnitude
                # (torch's F.cross_entropy has the same bound; forming
                # m + log(s) first cost one ulp of |m|: 1e-3 at |m| = 1e4).
                # The sum s of V terms rounds once per term it adds: V ulps at most
                # (still far below one ulp of |m| = 1e4, the old error).
                tol = (4 + vocab) * eps
                err = abs(out.loss.item() - loss)
                assert err <= tol * max(1.0, loss), (dtype, vocab, c, gap, out.loss.item(), loss)
                g = x.grad.reshape(-1)[0].item()
                assert g != 0.0 and abs(g - grad0) <= tol, (dtype, vocab, c, gap, g, grad0)
print("ok")
"""


def _levels() -> list[str]:
    levels = ["scalar", "avx2"]
    if klanneal.build_info()["simd"] == "avx512":
        levels.append("avx512")
    return levels


@pytest.mark.parametrize("level", _levels())
def test_categorical_loss_keeps_its_digits_at_large_logits(level):
    # Regression: lse = m + log(s) rounded to one ulp of |m|: relative error
    # 3.9e-3 at c = 100 and 7.1e-2 at c = 1e4, and target gradients of -2e-6
    # came back as exactly 0. Now a few ulps of the loss at any offset.
    if level == "avx2" and klanneal.build_info()["simd"] == "scalar":
        pytest.skip("this CPU has no AVX2")
    proc = subprocess.run(
        [sys.executable, "-c", _PRECISION_SCRIPT.format(level=level)],
        env=dict(os.environ, KLANNEAL_SIMD=level),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


_CONFIDENT_SCRIPT = """
import math, torch, klanneal
from klanneal import elbo_loss
assert klanneal.build_info()["simd"] == "{level}", klanneal.build_info()


def rows(c, vocab, gap):
    # Per example one row: the target the unique max at the front and at the
    # end, a tie for the max on the target, and an ordinary row between them.
    far = c - gap - 30.0 - 0.37 * torch.arange(vocab, dtype=torch.float64)
    x = far.repeat(4, 1)
    x[0, 0], x[0, 1], x[0, -1] = c, c - gap, c - gap - 2.0
    x[1, -1], x[1, 0] = c, c - gap
    x[2] = c + 3.0 * torch.sin(torch.arange(vocab, dtype=torch.float64))
    x[3, 1], x[3, 2], x[3, 0] = c, c, c - gap
    return x, torch.tensor([0, vocab - 1, 1, 1])


def exact(x, t):
    # From the rounded inputs, in float64: rest = sum over the row but its
    # first maximal element of exp(x_i - max), summed exactly (fsum).
    x = x.double()
    m = float(x.max())
    first = int((x == m).nonzero()[0])
    e = [math.exp(float(v) - m) for v in x]
    rest = math.fsum(e[:first] + e[first + 1 :])
    loss = math.log1p(rest) - (float(x[t]) - m)
    grad = [v / (1.0 + rest) for v in e]
    grad[t] = -rest / (1.0 + rest) if t == first else grad[t] - 1.0
    return loss, torch.tensor(grad, dtype=torch.float64)


for dtype in (torch.float32, torch.float64, torch.bfloat16):
    eps = torch.finfo(torch.float32 if dtype == torch.bfloat16 else dtype).eps
    grad_eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    for vocab in (3, 40, 203):  # scalar tails and whole vectors
        for c in (0.0, 1e2, 1e4, -1e4):
            if dtype == torch.bfloat16 and abs(c) > 1e2:
                continue  # rounded to multiples of 64: many equal terms, V roundings
            for gap in (8.8, 13.0, 25.0):  # p_t = 0.99985, rest = 2.3e-6, 1.4e-11
                x64, target = rows(c, vocab, gap)
                for mode in ("grad", "inplace", "no_grad"):
                    leaf = x64.to(dtype).reshape(4, 1, vocab).requires_grad_(mode != "no_grad")
                    x = leaf * 1.0 if mode == "inplace" else leaf
                    mu = torch.zeros(4, 1, dtype=dtype)
                    out = elbo_loss(x, target.reshape(4, 1), mu, mu, reduction="none",
                                    inplace=mode == "inplace")
                    if mode != "no_grad":
                        (2.5 * out.loss).sum().backward()
                    for r in range(4):
                        loss, grad = exact(leaf.detach()[r, 0], int(target[r]))
                        got = out.loss[r].item()
                        what = (dtype, vocab, c, gap, mode, r, got, loss)
                        assert abs(got - loss) <= 4 * eps * loss, what
                        if mode == "no_grad":
                            continue
                        g = leaf.grad[r, 0].double() / 2.5
                        # The others are exp((x_i - max) - log(s)): that
                        # difference rounds to an ulp of x_i - max (0 at the
                        # max); the smallest are subnormal.
                        row = leaf.detach()[r, 0].double()
                        tol = (4 + (row.max() - row)) * grad_eps * grad.abs() + tiny
                        assert ((g - grad).abs() <= tol).all(), (what, g, grad)
print("ok")
"""


@pytest.mark.parametrize("level", _levels())
def test_a_confident_row_keeps_its_digits(level):
    # Regression: the loss of a row whose target is its max is log(s) with
    # s = 1 + rest close to 1, which kept the error of an ulp of 1: row
    # [100, 87, 85] gave 2.6226e-06 for 2.5662e-06 in fp32 (2.2%), and the
    # target's gradient p_t - 1 cancelled (4e-4 relative at p_t = 0.99985).
    # Now log1p(rest) and -rest / (1 + rest): a few ulps of each, at every
    # offset and SIMD level, with and without a gradient, inplace or not.
    if level == "avx2" and klanneal.build_info()["simd"] == "scalar":
        pytest.skip("this CPU has no AVX2")
    proc = subprocess.run(
        [sys.executable, "-c", _CONFIDENT_SCRIPT.format(level=level)],
        env=dict(os.environ, KLANNEAL_SIMD=level),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


def test_half_logits_at_large_offsets():
    x = _two_class(1000.0, 7.0, torch.bfloat16, vocab=40).requires_grad_()
    mu = torch.zeros(1, 1, dtype=torch.bfloat16)
    out = elbo_loss(x, torch.zeros(1, 1, dtype=torch.int64), mu, mu)
    # bf16 rounds c - 7 = 993 to 992: the exact loss of the rounded row.
    row = x.detach().double().reshape(-1)
    want = float(torch.logsumexp(row, 0) - row[0])
    assert abs(out.loss.item() - want) <= 4 * torch.finfo(torch.float32).eps


# ---- 5. inputs accepted, then mishandled -----------------------------------------------


@pytest.mark.parametrize("likelihood", ["gaussian", "mse"])
@pytest.mark.parametrize("recon_grad", [True, False])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_a_target_that_requires_grad_gets_its_gradient(likelihood, recon_grad, reduction):
    x, target, mu, logvar = make_inputs(likelihood, 3, (11,))
    results = []
    for fn in (elbo_loss, elbo_loss_ref):
        a = x.clone().requires_grad_(recon_grad)
        b = target.clone().requires_grad_()
        out = fn(a, b, mu, logvar, likelihood=likelihood, reduction=reduction, gaussian_var=0.7)
        upstream = torch.linspace(0.5, 2.0, out.loss.numel()).reshape(out.loss.shape)
        (upstream * out.loss).sum().backward()
        results.append((a.grad, b.grad))
    (ga, gb), (ra, rb) = results
    torch.testing.assert_close(gb, rb)
    if recon_grad:
        torch.testing.assert_close(ga, ra)
    else:
        assert ga is None


def test_a_bernoulli_target_that_requires_grad_is_refused():
    x, target, mu, logvar = make_inputs("bernoulli", 2, (5,))
    with pytest.raises(ValueError, match="target requires grad"):
        elbo_loss(x, target.requires_grad_(), mu, logvar, likelihood="bernoulli")


@pytest.mark.parametrize(("low", "target_value"), [(torch.bfloat16, 0.5004), (torch.float16, 1e5)])
def test_float_targets_are_promoted_not_cast_down(low, target_value):
    # Regression: bf16 predictions vs an fp32 target 0.5004 gave mse 0 (0.5004
    # is 0.5 in bf16); fp16 predictions vs 1e5 gave inf (1e5 > fp16's max).
    x = torch.full((2, 3), 0.5, dtype=low, requires_grad=True)
    target = torch.full((2, 3), target_value, dtype=torch.float32)
    mu, logvar = _latents(2)
    out = elbo_loss(x, target, mu, logvar, likelihood="mse", beta=0.0)
    want = 3 * (0.5 - float(torch.tensor(target_value))) ** 2  # the fp32 target, exactly
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    out.loss.backward()
    assert x.grad.dtype == low
    if low == torch.bfloat16:  # (fp16 cannot hold the gradient -1e5 itself)
        want_grad = torch.full((2, 3), 0.5 - 0.5004)
        torch.testing.assert_close(x.grad.float(), want_grad, rtol=1e-2, atol=0)


@pytest.mark.parametrize("schedule", [Monotonic(10, start=-1.0), Constant(-2.0)], ids=repr)
@pytest.mark.parametrize("step", [3, torch.tensor(3)], ids=["int", "tensor"])
def test_a_schedule_that_gives_a_negative_beta_is_refused(schedule, step):
    x, target, mu, logvar = make_inputs("categorical", 2, (3,))
    with pytest.raises(ValueError, match="beta"):
        elbo_loss(x, target, mu, logvar, beta=schedule, step=step)


def test_a_negative_beta_tensor_is_refused_by_the_kernel_too():
    x, target, mu, logvar = make_inputs("categorical", 2, (3,))
    with pytest.raises(ValueError, match="beta"):
        elbo_loss(x, target, mu, logvar, beta=torch.tensor(-0.5), validate=False)


@pytest.mark.parametrize(
    "bad",
    [
        [1e300, 0, 0, 1, 10, 1, 1, 0],  # a kind far outside int32: was undefined behaviour
        [2.5, 0, 0, 1, 10, 1, 1, 0],  # not a whole number
        [2, 0, 0, 1, 10, 1e300, 1, 0],  # n_cycles out of range
        [1, 0, 0, math.nan, 10, 1, 1, 0],
    ],
)
def test_raw_schedule_parameters_are_checked_on_the_fused_path(bad):
    x, target, mu, logvar = make_inputs("categorical", 2, (3,))
    floats, ints = _ops.ElboOptions().pack(schedule=bad)
    with pytest.raises(ValueError, match="schedule"):
        _ops.elbo_loss_op(x, target, mu, logvar, None, torch.tensor(3), floats, ints)


def test_double_backward_raises_instead_of_a_gradient_without_a_graph():
    x, target, mu, logvar = make_inputs("categorical", 2, (3,))
    x.requires_grad_()
    loss = elbo_loss(x, target, mu, logvar).loss
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    # Without create_graph the same call works.
    loss = elbo_loss(x, target, mu, logvar).loss
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
def test_torch_func_grad_and_vmap_work(likelihood):
    x, target, mu, logvar = make_inputs(likelihood, 3, (4,))

    def loss(x_, mu_):
        return elbo_loss(x_, target, mu_, logvar, likelihood=likelihood).loss

    def ref(x_, mu_):
        return elbo_loss_ref(x_, target, mu_, logvar, likelihood=likelihood).loss

    got = torch.func.grad(loss, argnums=(0, 1))(x, mu)
    want = torch.func.grad(ref, argnums=(0, 1))(x, mu)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # vmap(grad) over a stack of logits.
    stack = torch.stack([x, 2 * x])
    per = torch.func.vmap(torch.func.grad(loss), in_dims=(0, None))(stack, mu)
    torch.testing.assert_close(per[1], torch.func.grad(ref)(2 * x, mu))


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
def test_vmap_over_the_targets_with_the_value_checks(likelihood):
    # Regression: vmapping over the data, targets included (per-example
    # losses and gradients), failed with validate=True: the value checks
    # branched on a batched tensor ("data-dependent control flow"). They
    # now read every example's values under vmap's wrapper.
    x, target, mu, logvar = make_inputs(likelihood, 3, (4,), 5)
    target = target.clamp(min=0)

    def one(x_, t_, mu_, lv_):
        return elbo_loss(x_[None], t_[None], mu_[None], lv_[None], likelihood=likelihood).loss

    got = torch.func.vmap(one)(x, target, mu, logvar)
    want = torch.stack([one(*a) for a in zip(x, target, mu, logvar)])
    torch.testing.assert_close(got, want)
    grads = torch.func.vmap(torch.func.grad(one))(x, target, mu, logvar)
    torch.testing.assert_close(grads[1], torch.func.grad(one)(x[1], target[1], mu[1], logvar[1]))
    bad = target.clone()
    bad[2, 1] = 9 if likelihood == "categorical" else 1.5
    with pytest.raises(ValueError, match="found 9|found 1.5"):
        torch.func.vmap(one)(x, bad, mu, logvar)
    # A vmapped beta tensor: each example's value checked.
    betas = torch.tensor([0.5, -1.0, 1.0])
    with pytest.raises(ValueError, match="beta must be finite and >= 0, got -1.0"):
        torch.func.vmap(
            lambda x_, t_, b: (
                elbo_loss(x_[None], t_[None], mu[:1], logvar[:1], b, likelihood=likelihood).loss
            )
        )(x, target, betas)


def test_an_empty_middle_dimension_gives_the_kl_only_loss():
    mu, logvar = _latents(3)
    cases = [
        (torch.randn(3, 0, 7), torch.zeros(3, 0, dtype=torch.int64), "categorical"),
        (torch.randn(3, 0), torch.rand(3, 0), "bernoulli"),
        (torch.randn(3, 0, 5), torch.rand(3, 0, 5), "gaussian"),
    ]
    for x, target, likelihood in cases:
        x.requires_grad_()
        m = mu.clone().requires_grad_()
        out = elbo_loss(x, target, m, logvar, beta=0.5, likelihood=likelihood)
        want = elbo_loss_ref(x, target, mu, logvar, beta=0.5, likelihood=likelihood)
        torch.testing.assert_close(out.loss.detach(), want.loss.detach())
        assert out.recon.item() == 0.0
        out.loss.backward()
        assert x.grad.shape == x.shape and torch.isfinite(m.grad).all()


def test_ignore_index_must_fit_int64():
    x, target, mu, logvar = make_inputs("categorical", 2, (3,))
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        elbo_loss(x, target, mu, logvar, ignore_index=2**63)
    # numpy integers are ints too.
    elbo_loss(x, target, mu, logvar, ignore_index=np.int64(-100))


def test_numpy_integer_steps_are_accepted():
    x, target, mu, logvar = make_inputs("categorical", 2, (3,))
    schedule = Cyclical(total_steps=20, n_cycles=2)
    got = elbo_loss(x, target, mu, logvar, beta=schedule, step=np.int64(3))
    assert got.beta.item() == pytest.approx(schedule(3))
    with pytest.raises(TypeError, match="step must be an int"):
        elbo_loss(x, target, mu, logvar, beta=schedule, step=3.0)


def test_uint64_class_ids_are_refused_rather_than_wrapped():
    # 2**64 - 100 as int64 is -100, the ignore_index: the row was silently dropped.
    x, target, mu, logvar = make_inputs("categorical", 2, (3,))
    bad = torch.tensor([[0, 1, 2**64 - 100], [0, 1, 2]], dtype=torch.uint64)
    with pytest.raises(TypeError, match="uint64"):
        elbo_loss(x, bad, mu, logvar)


def test_a_huge_gaussian_variance_does_not_overflow():
    x, target, mu, logvar = make_inputs("gaussian", 2, (3,))
    out = elbo_loss(x, target, mu, logvar, likelihood="gaussian", gaussian_var=1e308)
    want = elbo_loss_ref(x.double(), target.double(), mu.double(), logvar.double(),
                         likelihood="gaussian", gaussian_var=1e308)  # fmt: skip
    assert math.isfinite(out.loss.item())
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-6)


_TINY_VAR_SCRIPT = """
import math, torch, klanneal
from klanneal import elbo_loss
assert klanneal.build_info()["simd"] == "{level}", klanneal.build_info()
cases = [(torch.float32, 1e-40, 1e-3), (torch.float32, 1e-300, 1e-3),
         (torch.float16, 1e-40, 2**-6), (torch.bfloat16, 1e-40, 2**-6),
         (torch.float64, 1e-320, 1e-150)]
for dtype, var, delta in cases:
    for shape in ((2, 6), (2, 67)):  # a SIMD tail, whole vectors
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen).to(dtype)
        x[0, 0] = 0.5
        y = x.clone()
        y[0, 0] += delta
        leaf = x.clone().requires_grad_()
        z = torch.zeros(2, 3, dtype=dtype)
        out = elbo_loss(leaf, y, z, z, likelihood="gaussian", gaussian_var=var,
                        reduction="none", beta=0.0)
        (2.5 * out.loss).sum().backward()
        # float64 from the difference as the kernels round it (fp32 for half inputs).
        arith = torch.float64 if dtype == torch.float64 else torch.float32
        d = (x.to(arith) - y.to(arith)).double()
        log_norm = math.log(2 * math.pi) + math.log(var)
        want = (0.5 * (d * d / var + log_norm)).sum(1).to(out.loss.dtype)
        what = (dtype, var, shape, out.loss, want)
        assert not out.loss.isnan().any(), what
        torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=0, msg=str(what))
        # Where x == target the gradient is 0 (it was 0 * inf = NaN); where
        # d / var overflows the gradient's dtype, inf.
        grad = (2.5 * (d / var).to(arith)).to(dtype)
        torch.testing.assert_close(leaf.grad, grad, rtol=1e-6, atol=0, msg=str(what))
print("ok")
"""


@pytest.mark.parametrize("level", _levels())
def test_a_tiny_gaussian_variance_is_finite_at_every_simd_level(level):
    # Regression: inv_var = 1 / var overflowed fp32 below var = 2.9e-39, and
    # every element with x == target gave 0 * inf = NaN, loss and gradient
    # (fp32/fp16/bf16 inputs, and fp64 below 5.6e-309). Such variances divide
    # in float64 instead.
    if level == "avx2" and klanneal.build_info()["simd"] == "scalar":
        pytest.skip("this CPU has no AVX2")
    proc = subprocess.run(
        [sys.executable, "-c", _TINY_VAR_SCRIPT.format(level=level)],
        env=dict(os.environ, KLANNEAL_SIMD=level),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


# ---- 6. the worker pool is capped ------------------------------------------------------

_THREADS_SCRIPT = """
import os, torch, klanneal
torch.set_num_threads(256)
def threads():
    return len(os.listdir("/proc/self/task"))
x = torch.randn(64, 512, 1024)  # 32M logits: enough work for 256 threads
t = torch.randint(0, 1024, (64, 512))
mu = torch.zeros(64, 4)
klanneal.elbo_loss(x[:1], t[:1], mu[:1], mu[:1])  # torch's own pools start
before = threads()
for _ in range(3):
    klanneal.elbo_loss(x, t, mu, mu)
print(threads() - before)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc (Linux)")
def test_the_worker_pool_is_capped_at_the_core_count():
    # Regression: after torch.set_num_threads(256) on 2 cores, 512-767 threads stayed alive.
    proc = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip()) <= (os.cpu_count() or 1)


# torch's make_dual loads jvp decompositions through torch.jit.script, which warns.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_forward_mode_ad_gets_the_reference_tangent(likelihood):
    # Dual tensors (torch.autograd.forward_ad) take the reference path: the
    # fused op has no forward-mode derivative, and a tangent must not be
    # silently dropped.
    import torch.autograd.forward_ad as fwad

    x, target, mu, logvar = make_inputs(likelihood, 3, (4,), 9, 5)
    tangents = [torch.randn_like(t) for t in (x, mu, logvar)]
    got, want = [], []
    for fn, into in ((elbo_loss, got), (elbo_loss_ref, want)):
        with fwad.dual_level():
            duals = [fwad.make_dual(t, d) for t, d in zip((x, mu, logvar), tangents)]
            out = fn(duals[0], target, duals[1], duals[2], 0.7, likelihood=likelihood)
            primal, tangent = fwad.unpack_dual(out.loss)
            assert tangent is not None
            into.extend((primal.clone(), tangent.clone()))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_a_default_device_does_not_redirect_the_cpu_outputs(likelihood, dtype):
    # Regression: under `with torch.device(...)` (or torch.set_default_device)
    # the CPU kernel's outputs were allocated on that device and the kernel
    # wrote through their pointers ("meta": a null-pointer error; a GPU
    # would have been written by CPU code).
    inputs = make_inputs(likelihood, 3, (4,), 9, 5, dtype=dtype)
    want = run(elbo_loss, inputs, likelihood=likelihood)
    with torch.device("meta"):
        got = run(elbo_loss, inputs, likelihood=likelihood)
    for a, b in zip((*got[0], *got[1]), (*want[0], *want[1])):
        assert a.device.type == "cpu" and torch.equal(a, b)


def test_second_backward_after_a_target_only_gradient_raises_clearly():
    # Regression: with only a gaussian target requiring grad, a unit
    # backward negates the saved gradient in place; a second backward
    # (retain_graph=True) hit torch's generic "modified by an inplace
    # operation" error instead of klanneal's.
    x, target, mu, logvar = make_inputs("gaussian", 3, (4,), 1, 5)
    ref_target = target.clone().requires_grad_()
    elbo_loss_ref(x, ref_target, mu, logvar, 0.5, likelihood="gaussian").loss.backward()
    target.requires_grad_()
    loss = elbo_loss(x, target, mu, logvar, 0.5, likelihood="gaussian").loss
    loss.backward(retain_graph=True)
    torch.testing.assert_close(target.grad, ref_target.grad)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_a_later_backward_leaves_the_gradients_already_handed_out_alone(likelihood, reduction):
    # Regression: a unit backward hands out the saved gradients as they are
    # (torch.autograd.grad's result, a hook's argument); a second backward
    # through the retained graph scaled them in place, so the tensor the
    # caller already held silently became the second gradient.
    x, target, mu, logvar = make_inputs(likelihood, 3, (4,), 9, 5)
    x.requires_grad_()
    mu.requires_grad_()
    out = elbo_loss(x, target, mu, logvar, 0.5, likelihood=likelihood, reduction=reduction)
    check_retained_backwards(out.loss.sum(), (x, mu))
    # The same through a hook that keeps the gradient it is given.
    seen: list[torch.Tensor] = []
    x2 = x.detach().clone().requires_grad_()
    y = x2 * 1.0
    y.register_hook(seen.append)
    loss = elbo_loss(y, target, mu, logvar, 0.5, likelihood=likelihood, reduction=reduction)
    loss.loss.sum().backward(retain_graph=True)
    kept_hook = seen[0].clone()
    (0.5 * loss.loss.sum()).backward()
    assert torch.equal(seen[0], kept_hook)
    torch.testing.assert_close(seen[1], 0.5 * kept_hook)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_narrow_class_ids_on_the_reference_paths(dtype):
    # Regression: the fused op takes int32/int16/int8 class ids, but the
    # reference (the fallback of torch.func transforms, forward AD and
    # KLANNEAL_DISABLE_NATIVE=1) passed them to F.cross_entropy, which refused them.
    x, target, mu, logvar = make_inputs("categorical", 2, (3,), 5, 4)
    target = target.clamp(min=0)  # no ignore_index=-100: uint8 cannot hold it
    narrow = target.to(dtype)
    want = elbo_loss(x, target, mu, logvar, 0.5).loss
    torch.testing.assert_close(elbo_loss(x, narrow, mu, logvar, 0.5).loss, want)
    torch.testing.assert_close(elbo_loss_ref(x, narrow, mu, logvar, 0.5).loss, want)
    grad = torch.func.grad(lambda x_: elbo_loss(x_, narrow, mu, logvar, 0.5).loss)(x)
    leaf = x.clone().requires_grad_()
    elbo_loss(leaf, target, mu, logvar, 0.5).loss.backward()
    torch.testing.assert_close(grad, leaf.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_reference_computes_half_inputs_in_float32_as_the_kernels_do(dtype):
    # Regression: the reference (the fallback of torch.func, forward AD and
    # builds without the extension) summed fp16 rows in fp16: inf where the
    # fused op, accumulating in fp32, is finite.
    gen = torch.Generator().manual_seed(0)
    x = (2e3 * torch.randn(2, 784, generator=gen)).to(dtype).requires_grad_()
    target = torch.rand(2, 784, generator=gen).to(dtype)
    mu, logvar = _latents(2, dtype=dtype)
    fused = elbo_loss(x, target, mu, logvar, 0.5, likelihood="bernoulli")
    ref = elbo_loss_ref(x, target, mu, logvar, 0.5, likelihood="bernoulli")
    assert torch.isfinite(ref.loss) and ref.loss.dtype == torch.float32
    torch.testing.assert_close(ref.loss, fused.loss, rtol=1e-5, atol=0)
    (grad,) = torch.autograd.grad(ref.loss, x)
    assert grad.dtype == dtype
