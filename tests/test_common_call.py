"""klanneal._common_call: the common elbo_loss call, recognised without an
ElboCall, gives what elbo_call gives, bit for bit, and leaves every other call
(valid or not) to elbo_call."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch

import klanneal
from klanneal._call import elbo_call
from klanneal._common_call import common_call

pytestmark = pytest.mark.skipif(not klanneal.HAS_NATIVE, reason="needs the native extension")

OPTIONS = ("batchmean", 0.0, "batch", -100, 1.0, True)  # reduction ... validate


def _inputs(likelihood="bernoulli", dtype=torch.float32, latent_dtype=None, requires=(1, 1, 1)):
    gen = torch.Generator().manual_seed(3)
    latent_dtype = latent_dtype or dtype
    x = torch.randn(3, 5, 7, generator=gen, dtype=dtype)
    target = torch.rand(3, 5, 7, generator=gen, dtype=dtype)
    if likelihood != "bernoulli":
        target = torch.randn(3, 5, 7, generator=gen, dtype=dtype)
    mu = torch.randn(3, 4, generator=gen, dtype=latent_dtype)
    logvar = torch.randn(3, 4, generator=gen, dtype=latent_dtype)
    for t, r in zip((x, mu, logvar), requires):
        t.requires_grad_(bool(r))
    return x, target, mu, logvar


def _run_both(x, target, mu, logvar, beta, likelihood, options):
    """(common_call's outputs and gradients, elbo_call's), on fresh leaves."""
    results = []
    for path in ("common", "general"):
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in (x, mu, logvar)]
        a, m, lv = leaves
        if path == "common":
            out = common_call(a, target, m, lv, beta, likelihood, *options)
            assert out is not None, "a common call was not recognised"
        else:
            out = elbo_call(
                a, target, m, lv, beta, None, likelihood, *options[:5], None, None, None,
                None, False, options[5],
            ).run()  # fmt: skip
        grads = []
        if out.loss.requires_grad:
            upstream = torch.ones_like(out.loss)  # 1: the saved gradients as they are
            if options[0] == "none":
                upstream = torch.linspace(0.5, 2, 3, dtype=out.loss.dtype)
            tracked = [t for t in leaves if t.requires_grad]
            grads = torch.autograd.grad(out.loss, tracked, upstream)
        results.append((tuple(out), tuple(grads)))
    return results


CASES = list(
    itertools.product(
        ("bernoulli", "gaussian", "mse"),
        ((torch.float32, None), (torch.float64, None), (torch.float32, torch.float64)),
        ("float", "fp32 tensor", "fp64 tensor"),
        ("batchmean", "sum", "none"),
        ((1, 1, 1), (0, 1, 1), (1, 0, 0), (0, 0, 0)),
    )
)


@pytest.mark.parametrize("likelihood,dtypes,beta_kind,reduction,requires", CASES)
def test_a_common_call_is_elbo_calls_result_bit_for_bit(
    likelihood, dtypes, beta_kind, reduction, requires
):
    x, target, mu, logvar = _inputs(likelihood, *dtypes, requires=requires)
    beta = {
        "float": 0.7,
        "fp32 tensor": torch.tensor(0.7),
        "fp64 tensor": torch.tensor(0.7, dtype=torch.float64),
    }[beta_kind]
    free_bits = 0.0 if reduction == "none" else 0.2
    options = (reduction, free_bits, "batch", -100, 1.0, True)
    (common, common_grads), (general, general_grads) = _run_both(
        x, target, mu, logvar, beta, likelihood, options
    )
    for got, want in zip(common + common_grads, general + general_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


def test_a_common_call_without_grad_mode_tracks_nothing():
    x, target, mu, logvar = _inputs()
    with torch.no_grad():
        out = common_call(x, target, mu, logvar, 0.5, "bernoulli", *OPTIONS)
    assert out is not None and not out.loss.requires_grad


def _not_common():
    """Calls common_call must leave to elbo_call: (name, arguments)."""
    x, target, mu, logvar = _inputs()
    half = [t.detach().half() for t in (x, target, mu, logvar)]
    cases = {
        "categorical": (x, torch.zeros(3, 5, dtype=torch.int64), mu, logvar, 1.0, "categorical"),
        "a likelihood object": (x, target, mu, logvar, 1.0, klanneal.likelihoods.Bernoulli()),
        "a Parameter": (torch.nn.Parameter(x.detach()), target, mu, logvar, 1.0, "bernoulli"),
        "fp16": (*half, 1.0, "bernoulli"),
        "a target of another dtype": (x, target.double(), mu, logvar, 1.0, "bernoulli"),
        "logvar of another dtype": (x, target, mu, logvar.double(), 1.0, "bernoulli"),
        "a target that requires grad": (x, target.clone().requires_grad_(), mu, logvar, 1.0, "mse"),
        "a beta that requires grad": (
            x, target, mu, logvar, torch.tensor(0.5, requires_grad=True), "bernoulli"
        ),
        "a negative beta": (x, target, mu, logvar, -1.0, "bernoulli"),
        "a NaN beta tensor": (x, target, mu, logvar, torch.tensor(float("nan")), "bernoulli"),
        "an infinite beta": (x, target, mu, logvar, float("inf"), "bernoulli"),
        "a [1] beta": (x, target, mu, logvar, torch.tensor([0.5]), "bernoulli"),
        "an int beta": (x, target, mu, logvar, 1, "bernoulli"),
        "an integer beta tensor": (x, target, mu, logvar, torch.tensor(1), "bernoulli"),
        "a list beta": (x, target, mu, logvar, [0.1, 0.2], "bernoulli"),
        "a schedule": (
            x, target, mu, logvar, klanneal.schedules.Cyclical(total_steps=10), "bernoulli"
        ),
        "3-D mu": (x, target, mu[None], logvar[None], 1.0, "bernoulli"),
        "logvar of another shape": (x, target, mu, logvar[:, :3], 1.0, "bernoulli"),
        "a target of another shape": (x, target[:, :4], mu, logvar, 1.0, "bernoulli"),
        "another batch size": (x[:2], target[:2], mu, logvar, 1.0, "bernoulli"),
        "an empty batch": (x[:0], target[:0], mu[:0], logvar[:0], 1.0, "bernoulli"),
        "a 0-d recon_input": (x[0, 0, 0], target[0, 0, 0], mu, logvar, 1.0, "bernoulli"),
        "a sparse target": (x, target.detach().to_sparse(), mu, logvar, 1.0, "bernoulli"),
        "a list recon_input": ([1.0], target, mu, logvar, 1.0, "bernoulli"),
        "meta tensors": (
            *[t.detach().to("meta") for t in (x, target, mu, logvar)], 1.0, "bernoulli"
        ),
    }  # fmt: skip
    return list(cases.items())


@pytest.mark.parametrize("name,args", _not_common(), ids=[name for name, _ in _not_common()])
def test_any_other_call_is_left_to_elbo_call(name, args):
    assert common_call(*args, *OPTIONS) is None


def test_calls_under_a_torch_func_transform_are_left_to_elbo_call():
    x, target, mu, logvar = (t.detach() for t in _inputs())
    seen = []

    def loss(x):
        seen.append(common_call(x, target, mu, logvar, torch.tensor(0.5), "bernoulli", *OPTIONS))
        return klanneal.elbo_loss(x, target, mu, logvar, 0.5, likelihood="bernoulli").loss

    torch.func.grad(loss)(x)
    assert seen == [None]


def test_a_disabled_native_kernel_is_left_to_elbo_call(monkeypatch):
    monkeypatch.setenv("KLANNEAL_DISABLE_NATIVE", "1")
    assert common_call(*_inputs(), 0.5, "bernoulli", *OPTIONS) is None


@pytest.mark.parametrize(
    "options,message",
    [
        (("mean", 0.0, "batch", -100, 1.0, True), "reduction"),
        (("batchmean", -1.0, "batch", -100, 1.0, True), "free_bits"),
        (("batchmean", 0.0, "batch", -100, 1.0, "yes"), "validate"),
        (("batchmean", [0.1], "batch", -100, 1.0, True), "free_bits"),  # unhashable
    ],
)
def test_bad_options_raise_elbo_calls_error(options, message):
    x, target, mu, logvar = _inputs()
    with pytest.raises((ValueError, TypeError), match=message) as common:
        common_call(x, target, mu, logvar, 0.5, "bernoulli", *options)
    with pytest.raises((ValueError, TypeError)) as general:
        klanneal.elbo_loss(
            x, target, mu, logvar, 0.5, likelihood="bernoulli", reduction=options[0],
            free_bits=options[1], validate=options[5],
        )  # fmt: skip
    assert str(common.value) == str(general.value)


def test_a_default_device_at_import_does_not_move_the_outputs():
    # The 0-d CPU tensors that the eager outputs are empty_like of are made
    # at import: under a default device they must still be CPU tensors.
    script = (
        "import torch\n"
        "torch.set_default_device('meta')\n"
        "import klanneal\n"
        "torch.set_default_device(None)\n"
        "x, t = torch.randn(2, 5, requires_grad=True), torch.rand(2, 5)\n"
        "mu, lv = torch.randn(2, 3), torch.randn(2, 3)\n"
        "out = klanneal.elbo_loss(x, t, mu, lv, 0.5, likelihood='bernoulli')\n"
        "out.loss.backward()\n"
        "want = klanneal.elbo_loss_ref(x, t, mu, lv, 0.5, likelihood='bernoulli').loss\n"
        "assert all(v.device.type == 'cpu' for v in out), [v.device for v in out]\n"
        "torch.testing.assert_close(out.loss, want)\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_small_gradients_are_kept_on_ctx_and_large_ones_saved():
    # ElboFunction keeps a small call's gradients as a ctx attribute (cheaper
    # per call than saved tensors) and saves a large call's, which autograd
    # frees right after a backward without retain_graph.
    loss = common_call(*_sized((3, 5, 7)), 0.5, "bernoulli", *OPTIONS).loss
    assert loss.grad_fn.kept is not None and loss.grad_fn.saved_tensors == ()
    loss = common_call(*_sized((64, 512)), 0.5, "bernoulli", *OPTIONS).loss  # 128 KiB
    assert loss.grad_fn.kept is None and len(loss.grad_fn.saved_tensors) == 3


def _sized(size):
    """Bernoulli inputs: recon_input of `size` (size[0] examples), 4 latents."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*size, generator=gen, requires_grad=True)
    target = torch.rand(*size, generator=gen)
    mu, logvar = (torch.randn(size[0], 4, generator=gen, requires_grad=True) for _ in range(2))
    return x, target, mu, logvar


@pytest.mark.parametrize("size", [(3, 5, 7), (64, 512)], ids=["kept", "saved"])
def test_a_second_backward_through_a_freed_graph_raises_torchs_error(size):
    x, target, mu, logvar = _sized(size)
    loss = common_call(x, target, mu, logvar, 0.5, "bernoulli", *OPTIONS).loss
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.parametrize("size", [(3, 5, 7), (64, 512)], ids=["kept", "saved"])
def test_a_handed_out_gradient_modified_in_place_is_not_handed_out_again(size):
    # A unit backward hands the saved gradients out as they are (here to a
    # hook that keeps recon_input's). Unmodified, a backward through the
    # retained graph hands them out again; modified in place, it must not
    # (as for torch's saved tensors).
    x, target, mu, logvar = _sized(size)
    y = x * 1.0
    seen: list[torch.Tensor] = []
    y.register_hook(seen.append)
    loss = common_call(y, target, mu, logvar, 0.5, "bernoulli", *OPTIONS).loss
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 2 * seen[0])
    assert seen[1] is seen[0]
    seen[0].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_tensor_that_escaped_a_finished_transform_is_used_as_the_tensor_it_wraps():
    # Regression: such a tensor (a dead functorch wrapper) has no storage;
    # both the common call and the general path failed reading its data
    # pointer ("Cannot access data pointer of Tensor that doesn't have storage").
    x, target, mu, logvar = (t.detach() for t in _inputs())
    escaped = {}

    def keep(a):
        escaped["x"] = a
        return (a * 2).sum()

    torch.func.grad(keep)(x)
    assert common_call(escaped["x"], target, mu, logvar, 0.5, "bernoulli", *OPTIONS) is None
    got = klanneal.elbo_loss(escaped["x"], target, mu, logvar, 0.5, likelihood="bernoulli")
    want = klanneal.elbo_loss(x, target, mu, logvar, 0.5, likelihood="bernoulli")
    for a, b in zip(got, want):
        assert torch.equal(a, b)
