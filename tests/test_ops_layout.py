"""The typed seam between Python and the core: one layout, one set of enum codes."""

from __future__ import annotations

import pytest
import torch
from elbo_cases import make_inputs

import klanneal
from klanneal import _ops, schedules
from klanneal._ops import ElboOptions

_C = pytest.importorskip("klanneal._C")


def test_python_and_cpp_agree_on_the_layout_and_the_codes():
    # The C++ X-macro lists (csrc/include/klanneal/elbo_layout.h, elbo.h,
    # schedule.h, common.h) are the definition; Python's copy must match it.
    assert _C.elbo_layout() == _ops.PY_LAYOUT
    assert tuple(_C.elbo_layout()["ramp_shape"]) == schedules.SHAPES
    # The schedules' kind codes are the same enum.
    kinds = _C.elbo_layout()["schedule_kind"]
    for schedule, kind in [
        (schedules.Constant(0.5), "constant"),
        (schedules.Monotonic(10), "monotonic"),
        (schedules.Cyclical(40), "cyclical"),
        (schedules.Capacity(5.0, 10), "capacity"),
    ]:
        assert kinds[int(schedule.to_params()[0])] == kind


def test_options_round_trip_by_name():
    opts = ElboOptions("gaussian", "none", 0.25, "sample", -7, 0.5, False)
    floats, ints = opts.pack(
        beta_value=0.3,
        schedule=(2, 1, 0.1, 1.0, 40, 4, 0.5, 0.0),
        need_grad_mu=True,
        capacity=(3, 0, 0.0, 25.0, 1000, 1, 1, 0),
        need_grad_prior_logvar=True,
    )
    layout = _C.elbo_layout()
    assert len(floats) == len(layout["floats"]) and len(ints) == len(layout["ints"])
    back = ElboOptions.unpack(floats, ints)
    assert back.options == opts
    assert back.beta_value == 0.3 and back.need_grads == (False, True, False, False, True)
    assert back.schedule == (2.0, 1.0, 0.1, 1.0, 40.0, 4.0, 0.5, 0.0)
    assert back.capacity == (3.0, 0.0, 0.0, 25.0, 1000.0, 1.0, 1.0, 0.0)
    assert ElboOptions.unpack(*opts.pack()).capacity is None
    assert ints[layout["ints"].index("reduction")] == layout["reduction"].index("none")


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian", "mse"])
def test_the_default_kernel_matches_the_native_one(likelihood):
    # The pure-PyTorch kernel registered as the op's default (any device).
    x, target, mu, logvar = make_inputs(likelihood, 3, (5,))
    floats, ints = ElboOptions(likelihood, free_bits=0.2).pack(
        beta_value=0.7, need_grad_recon=True, need_grad_mu=True, need_grad_logvar=True
    )
    args = (x, target if likelihood == "categorical" else target, mu, logvar, None, None)
    native = _ops._native_kernel(*args, floats, ints)
    default = _ops._reference_kernel(*args, floats, ints)
    for a, b in zip(native, default):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=5e-5, atol=2e-6)


def test_the_op_is_reachable_through_the_dispatcher():
    x, target, mu, logvar = make_inputs("categorical", 2, (3,))
    floats, ints = ElboOptions().pack(beta_value=1.0)
    outs = torch.ops.klanneal.elbo_loss(x, target, mu, logvar, None, None, floats, ints)
    want = klanneal.elbo_loss_ref(x, target, mu, logvar)
    torch.testing.assert_close(outs[0].float(), want.loss)


def test_the_first_eager_call_imports_nothing_heavy():
    # Regression (issue 10): the first call used to take ~0.8 s, torch's
    # custom-op wrapper importing torch._dynamo lazily on the call path (and
    # a fork during that import could hang a child on the import lock).
    import subprocess
    import sys

    code = (
        "import sys, torch, klanneal\n"
        "x = torch.randn(4, 784, requires_grad=True)\n"
        "mu = torch.zeros(4, 8, requires_grad=True)\n"
        "out = klanneal.elbo_loss(x, torch.rand(4, 784), mu, mu, likelihood='bernoulli')\n"
        "out.loss.backward()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_the_eager_path_uses_the_c_level_function_apply():
    # elbo_loss skips torch.autograd.Function.apply's Python layer
    # (only torch.func transforms need it, and they take the reference path);
    # a torch whose class layout changed falls back to Function.apply.
    import types

    assert isinstance(_ops.APPLY, types.BuiltinMethodType)
    assert _ops.APPLY.__self__ is _ops.ElboFunction


def test_the_unit_gradient_shortcut_and_a_scaled_backward_agree():
    # backward returns the forward pass's gradients as they are when the
    # upstream gradient is exactly 1, and scales them otherwise.
    x, target, mu, logvar = make_inputs("bernoulli", 3, (5,))
    grads = []
    for scale in (1.0, 2.5):
        leaves = [t.detach().clone().requires_grad_() for t in (x, mu, logvar)]
        out = klanneal.elbo_loss(
            leaves[0], target, leaves[1], leaves[2], 0.7, likelihood="bernoulli"
        )
        (out.loss * scale).backward()
        grads.append([t.grad for t in leaves])
    for one, scaled in zip(*grads):
        torch.testing.assert_close(scaled, 2.5 * one)
