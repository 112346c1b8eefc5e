"""Every bad input to klanneal.elbo_loss raises a clear exception naming the argument."""

from __future__ import annotations

import math
import re

import pytest
import torch
from elbo_cases import LinearWarmup, make_inputs, packed_call

from klanneal import _C, elbo_loss, linear_elbo_loss


def _cat():
    return make_inputs("categorical", 2, (3,), 5, 4)


def _gauss():
    return make_inputs("gaussian", 2, (3,), 1, 4)


def _replace(inputs, **changes):
    names = ("recon_input", "target", "mu", "logvar")
    return tuple(changes.get(n, t) for n, t in zip(names, inputs))


CASES = {
    # name: (inputs, kwargs, exception, message fragment)
    "target shape": (
        _replace(_cat(), target=torch.zeros(2, 4, dtype=torch.int64)),
        {},
        ValueError,
        "target must have shape",
    ),
    "target shape non-categorical": (
        _replace(_gauss(), target=torch.zeros(2, 4)),
        {"likelihood": "gaussian"},
        ValueError,
        "target must have the shape of recon_input",
    ),
    "logvar shape": (
        _replace(_cat(), logvar=torch.zeros(2, 3)),
        {},
        ValueError,
        "logvar must have the shape",
    ),
    "mu not 2-D": (
        _replace(_cat(), mu=torch.zeros(2, 4, 1), logvar=torch.zeros(2, 4, 1)),
        {},
        ValueError,
        "mu must be 2-D",
    ),
    "batch mismatch": (
        _replace(_cat(), mu=torch.zeros(3, 4), logvar=torch.zeros(3, 4)),
        {},
        ValueError,
        "batch size 2 but mu has 3",
    ),
    "float categorical target": (
        _replace(_cat(), target=torch.zeros(2, 3)),
        {},
        TypeError,
        "target must be an integer tensor",
    ),
    "integer recon_input": (
        _replace(_cat(), recon_input=torch.zeros(2, 3, 5, dtype=torch.int64)),
        {},
        TypeError,
        "recon_input must be float32",
    ),
    "integer mu": (
        _replace(_cat(), mu=torch.zeros(2, 4, dtype=torch.int32)),
        {},
        TypeError,
        "mu must be float32",
    ),
    "logvar dtype": (
        _replace(_cat(), logvar=torch.zeros(2, 4, dtype=torch.float64)),
        {},
        TypeError,
        "logvar must have the dtype of mu",
    ),
    "integer gaussian target": (
        _replace(_gauss(), target=torch.zeros(2, 3, dtype=torch.int64)),
        {"likelihood": "gaussian"},
        TypeError,
        "target must be a floating-point tensor",
    ),
    "target above V": (
        _replace(_cat(), target=torch.tensor([[0, 1, 5], [0, 0, 0]])),
        {},
        ValueError,
        "class ids must lie in [0, 5)",
    ),
    "negative target": (
        _replace(_cat(), target=torch.tensor([[0, -1, 2], [0, 0, 0]])),
        {},
        ValueError,
        "found -1",
    ),
    "V = 0": (_replace(_cat(), recon_input=torch.zeros(2, 3, 0)), {}, ValueError, "V = 0"),
    "B = 0": (
        (
            torch.zeros(0, 3, 5),
            torch.zeros(0, 3, dtype=torch.int64),
            torch.zeros(0, 4),
            torch.zeros(0, 4),
        ),
        {},
        ValueError,
        "B = 0",
    ),
    "negative free_bits": (
        _cat(),
        {"free_bits": -0.1},
        ValueError,
        "free_bits must be finite and >= 0",
    ),
    "nan free_bits": (_cat(), {"free_bits": math.nan}, ValueError, "free_bits must be finite"),
    "negative beta": (_cat(), {"beta": -1.0}, ValueError, "beta must be finite and >= 0"),
    "inf beta": (_cat(), {"beta": math.inf}, ValueError, "beta must be finite"),
    "negative tensor beta": (
        _cat(),
        {"beta": torch.tensor(-0.5)},
        ValueError,
        "beta must be finite and >= 0",
    ),
    "nan tensor beta": (
        _cat(),
        {"beta": torch.tensor(math.nan)},
        ValueError,
        "beta must be finite",
    ),
    "vector beta": (_cat(), {"beta": torch.ones(2)}, TypeError, "beta must be a float, a 0-d"),
    "string beta": (_cat(), {"beta": "1"}, TypeError, "beta must be a float"),
    "zero gaussian_var": (
        _gauss(),
        {"likelihood": "gaussian", "gaussian_var": 0.0},
        ValueError,
        "gaussian_var must be finite and > 0",
    ),
    "inf gaussian_var": (
        _gauss(),
        {"likelihood": "gaussian", "gaussian_var": math.inf},
        ValueError,
        "gaussian_var must be finite",
    ),
    "schedule without step": (_cat(), {"beta": LinearWarmup()}, ValueError, "step is required"),
    "step without schedule": (_cat(), {"step": 3}, ValueError, "step is only used"),
    "negative step": (
        _cat(),
        {"beta": LinearWarmup(), "step": -1},
        ValueError,
        "step must be >= 0",
    ),
    "negative step tensor": (
        _cat(),
        {"beta": LinearWarmup(), "step": torch.tensor(-2)},
        ValueError,
        "step must be >= 0",
    ),
    "float step tensor": (
        _cat(),
        {"beta": LinearWarmup(), "step": torch.tensor(1.0)},
        TypeError,
        "step must be an int",
    ),
    # Both were accepted: a complex step as its real part, a uint64 one
    # from 2**63 on wrapped to a negative int64 step.
    "complex step tensor": (
        _cat(),
        {"beta": LinearWarmup(), "step": torch.tensor(5 + 0j)},
        TypeError,
        "dtype torch.complex64",
    ),
    "uint64 step tensor": (
        _cat(),
        {"beta": LinearWarmup(), "step": torch.tensor(2**63, dtype=torch.uint64)},
        TypeError,
        "not bool or uint64",
    ),
    "unknown likelihood": (
        _cat(),
        {"likelihood": "gamma"},
        ValueError,
        "likelihood must be one of",
    ),
    "unknown reduction": (_cat(), {"reduction": "mean"}, ValueError, "reduction must be one of"),
    "unknown free_bits_mode": (
        _cat(),
        {"free_bits_mode": "dim"},
        ValueError,
        "free_bits_mode must be one of",
    ),
    "none with batch free bits": (
        _cat(),
        {"reduction": "none", "free_bits": 0.5},
        ValueError,
        "free_bits_mode='batch'",
    ),
    "bernoulli target above 1": (
        _replace(make_inputs("bernoulli", 2, (3,)), target=torch.full((2, 3), 1.5)),
        {"likelihood": "bernoulli"},
        ValueError,
        "bernoulli targets must lie in [0, 1]",
    ),
    "bernoulli target negative": (
        _replace(make_inputs("bernoulli", 2, (3,)), target=torch.full((2, 3), -0.5)),
        {"likelihood": "bernoulli"},
        ValueError,
        "found -0.5",
    ),
    "not a tensor": (
        _replace(_cat(), mu=[[0.0] * 4] * 2),
        {},
        TypeError,
        "mu must be a torch.Tensor",
    ),
    "ignore_index float": (
        _cat(),
        {"ignore_index": -100.0},
        TypeError,
        "ignore_index must be an int",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises(case):
    inputs, kwargs, exc, fragment = CASES[case]
    with pytest.raises(exc, match=_escape(fragment)):
        elbo_loss(*inputs, **kwargs)


def _escape(fragment: str) -> str:
    return re.escape(fragment)


def test_inplace_on_a_leaf_that_requires_grad():
    x, target, mu, logvar = _cat()
    x.requires_grad_()
    with pytest.raises(ValueError, match="inplace=True would overwrite recon_input, a leaf"):
        elbo_loss(x, target, mu, logvar, inplace=True)


def test_tensors_on_different_devices_meta():
    # The meta device stands in for a second device on CPU-only machines.
    x, target, mu, logvar = _cat()
    with pytest.raises(ValueError, match="must be on one device"):
        elbo_loss(x, target, mu.to("meta"), logvar.to("meta"))


def test_native_layer_rejects_inconsistent_params():
    # The last line of defence below the Python checks: a ValueError, no crash.
    x, target, mu, logvar = _cat()
    out = torch.empty(1, dtype=torch.float64)
    params = {
        "batch": 0, "n_rows": 6, "row_len": 5, "latent_dim": 4, "likelihood": 0, "reduction": 0,
        "free_bits_mode": 0, "recon_dtype": 0, "latent_dtype": 0, "free_bits": 0.0,
        "gaussian_var": 1.0, "ignore_index": -100, "beta_ptr": 0, "step_ptr": 0,
        "schedule": [0.0] * 8, "beta_value": 1.0, "recon_input": x.data_ptr(),
        "target": target.data_ptr(), "mu": mu.data_ptr(), "logvar": logvar.data_ptr(),
        "loss": out.data_ptr(), "recon": out.data_ptr(), "kl": out.data_ptr(), "kl_per_dim": 0,
        "beta_out": out.data_ptr(), "grad_recon": 0, "grad_mu": 0, "grad_logvar": 0, "n_threads": 1,
    }  # fmt: skip
    with pytest.raises(ValueError, match="batch must be > 0"):
        _C.elbo_forward_cpu(*packed_call(params))
    sizes, ptrs, floats, ints = packed_call(params)
    with pytest.raises(ValueError, match="wrong length"):
        _C.elbo_forward_cpu(sizes[:-1], ptrs, floats, ints)
    params["likelihood"] = 2**40  # an enum code outside int32: refused before the cast
    params["batch"] = 2
    with pytest.raises(ValueError, match="enum code"):
        _C.elbo_forward_cpu(*packed_call(params))


# The CPU kernel checks class ids and bernoulli targets in its own pass: the
# first bad one in flat order is reported, in every chunk position, dtype and
# (for inplace calls) before recon_input is overwritten.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("position", [0, 31, 32, 17000, 2 * 17000 - 2])
@pytest.mark.parametrize("bad", [1.5, -0.25, math.nan])
def test_bernoulli_target_checked_in_the_kernel(dtype, position, bad):
    # Two examples of 17000 pixels: two chunks each, vector blocks and a tail.
    x, target, mu, logvar = make_inputs("bernoulli", 2, (17000,), dtype=dtype)
    target.view(-1)[position] = bad
    target.view(-1)[-1] = 2.0  # a later bad value is not the one reported
    expected = "nan" if math.isnan(bad) else str(bad)
    with pytest.raises(ValueError, match=re.escape(f"must lie in [0, 1]; found {expected}")):
        elbo_loss(x.requires_grad_(), target, mu, logvar, likelihood="bernoulli")


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
def test_invalid_target_leaves_inplace_input_untouched(likelihood):
    x, target, mu, logvar = make_inputs(likelihood, 2, (3,), 5, 4)
    target.view(-1)[4] = 7 if likelihood == "categorical" else 3.0
    logits = x.clone().requires_grad_()
    decoder_output = logits * 1.0  # a non-leaf, as inplace=True requires
    before = decoder_output.detach().clone()
    with pytest.raises(ValueError, match="found"):
        elbo_loss(decoder_output, target, mu, logvar, likelihood=likelihood, inplace=True)
    assert torch.equal(decoder_output.detach(), before)


def test_invalid_target_without_validation_is_not_reported():
    x, target, mu, logvar = make_inputs("bernoulli", 2, (40,))
    target.view(-1)[5] = 1.5
    out = elbo_loss(x, target, mu, logvar, likelihood="bernoulli", validate=False)
    assert torch.isfinite(out.loss)


# ---- decoders that end in log_softmax (docs/elbo.md) ----------------------------------


@pytest.mark.parametrize(
    ("layer", "op"),
    [
        (lambda h: torch.log_softmax(h, -1), "LogSoftmax"),
        (lambda h: torch.softmax(h, -1), "Softmax"),
        (torch.exp, "Exp"),
        (torch.sigmoid, "Sigmoid"),
        (torch.tanh, "Tanh"),
        (lambda h: torch.log_softmax(h, -1).view(-1, 5).view(2, 3, 5), "LogSoftmax"),  # a view
    ],
)
def test_inplace_on_an_output_its_op_saved(layer, op):
    # Regression: accepted, then backward failed with torch's generic "one of
    # the variables needed for gradient computation has been modified by an
    # inplace operation".
    logits, target, mu, logvar = _cat()
    h = logits.float().requires_grad_()
    x = layer(h)
    message = f"inplace=True would overwrite recon_input, the output of {op} ({op}Backward0)"
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        elbo_loss(x, target, mu.float(), logvar.float(), inplace=True)
    assert "inplace=False" in str(info.value) and "drop that layer" in str(info.value)
    torch.testing.assert_close(x, layer(h))  # not overwritten


def test_inplace_after_an_op_that_did_not_save_its_output_still_works():
    # A non-contiguous log_softmax output is copied before it is overwritten;
    # a linear layer's output was not saved; a half output is never overwritten.
    logits, target, mu, logvar = _cat()
    h = logits.float().requires_grad_()
    mu, logvar = mu.float(), logvar.float()
    for x in (
        torch.log_softmax(h.transpose(0, 1), -1).transpose(0, 1),
        h * 2.0,
        torch.log_softmax(h.bfloat16(), -1),
    ):
        elbo_loss(x, target, mu, logvar, inplace=True).loss.backward()
    with torch.no_grad():
        elbo_loss(torch.log_softmax(h, -1), target, mu, logvar, inplace=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_probabilities_give_the_loss_and_gradients_of_the_logits(dtype):
    # The authors' and Sentence-VAE's decoders end in log_softmax.
    logits, target, mu, logvar = make_inputs("categorical", 3, (7,), 41, 4, dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    results = []
    for layer in (lambda h: h, lambda h: torch.log_softmax(h, -1)):
        h, m, lv = (t.clone().requires_grad_() for t in (logits, mu, logvar))
        out = elbo_loss(layer(h), target, m, lv, 0.5)
        (2.5 * out.loss).backward()
        results.append((out.loss.detach(), out.recon, h.grad, m.grad, lv.grad))
    for fused, from_log_probs in zip(*results):
        torch.testing.assert_close(from_log_probs, fused, **tol)


def test_out_beta_is_the_schedule_rounded_to_the_result_dtype():
    # docs/elbo.md, "Beta and schedules": float32 for fp32 inputs, exact for fp64.
    from klanneal.schedules import Cyclical

    schedule = Cyclical(1000, 4, shape="cosine")
    for dtype in (torch.float32, torch.float64):
        inputs = make_inputs("categorical", 2, (3,), 5, 4, dtype=dtype)
        for step in (1, 77, 333):
            out = elbo_loss(*inputs, schedule, step=step)
            assert out.beta.dtype == dtype
            assert out.beta.item() == torch.tensor(schedule(step), dtype=dtype).item()
    assert out.beta.item() == schedule(333)  # fp64
    out = elbo_loss(*make_inputs("categorical", 2, (3,), 5, 4), schedule, step=333)
    assert out.beta.item() != schedule(333)  # fp32: rounded


# ---- bool options (inplace, validate) ---------------------------------------------------


def _with_flag(where: str, flag: str, value):
    """Calls `where` (a function, or builds a module and calls it) with `flag`=value;
    returns the logits it was given and the output."""
    from klanneal.nn import ELBOLoss, LinearELBOLoss

    logits, target, mu, logvar = _cat()
    logits = logits.clone().requires_grad_() * 1.0  # a non-leaf: inplace may write it
    hidden, weight = torch.randn(2, 3, 6), torch.randn(5, 6, requires_grad=True)
    if where == "elbo_loss":
        return logits, elbo_loss(logits, target, mu, logvar, **{flag: value})
    if where == "linear_elbo_loss":
        return logits, linear_elbo_loss(hidden, weight, target, mu, logvar, **{flag: value})
    if where == "ELBOLoss":
        return logits, ELBOLoss(**{flag: value})(logits, target, mu, logvar)
    return logits, LinearELBOLoss(weight=weight, **{flag: value})(hidden, target, mu, logvar)


FLAG_USES = [
    ("elbo_loss", "inplace"),
    ("elbo_loss", "validate"),
    ("linear_elbo_loss", "validate"),
    ("ELBOLoss", "inplace"),
    ("ELBOLoss", "validate"),
    ("LinearELBOLoss", "validate"),
]


@pytest.mark.parametrize("value", ["False", "no", 0, 1, None, torch.tensor(False)])
@pytest.mark.parametrize(("where", "flag"), FLAG_USES)
def test_a_flag_that_is_not_a_bool_is_refused(where, flag, value):
    # Regression: any truthy object was taken as True: inplace="False" (from a
    # string config) overwrote the logits, validate="no" validated.
    with pytest.raises(TypeError, match=f"{flag} must be a bool, got {type(value).__name__}"):
        _with_flag(where, flag, value)


def test_a_string_inplace_leaves_the_logits_alone():
    logits, target, mu, logvar = _cat()
    x = logits.clone().requires_grad_() * 1.0
    before = x.detach().clone()
    with pytest.raises(TypeError, match="inplace must be a bool, got str 'False'"):
        elbo_loss(x, target, mu, logvar, inplace="False")
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize(("where", "flag"), FLAG_USES)
def test_numpy_bools_are_accepted_as_flags(where, flag, value):
    import numpy as np

    logits, out = _with_flag(where, flag, np.bool_(value))
    assert torch.isfinite(out.loss).all()
    if flag == "inplace":  # the logits hold the gradient exactly when inplace is on
        assert torch.equal(logits.detach(), _cat()[0]) != value


# ---- meta and sparse tensors, one-element beta and step ---------------------------------


def _meta(t: torch.Tensor) -> torch.Tensor:
    return t.to("meta")


@pytest.mark.parametrize("validate", [True, False])
def test_meta_tensors_skip_the_value_checks(validate):
    # Regression: with validate=True (the default) meta inputs failed with
    # "Tensor.item() cannot be called on meta tensors": they hold no values to
    # check. Shapes and dtypes are still checked and the outputs are meta.
    x, target, mu, logvar = (_meta(t) for t in _cat())
    calls = [
        lambda: elbo_loss(x, target, mu, logvar, validate=validate),
        lambda: elbo_loss(x, target, mu, logvar, _meta(torch.tensor(0.5)), validate=validate),
        lambda: elbo_loss(x, torch.rand(2, 3, 5, device="meta"), mu, logvar,
                          likelihood="bernoulli", reduction="none", validate=validate),
        lambda: linear_elbo_loss(torch.randn(2, 3, 6, device="meta"),
                                 torch.randn(5, 6, device="meta"), target, mu, logvar,
                                 validate=validate),
    ]  # fmt: skip
    for call in calls:
        out = call()
        assert all(t.is_meta for t in out)
        assert out.kl_per_dim.shape == (4,)
    with pytest.raises(ValueError, match="target must have shape"):  # shapes still checked
        elbo_loss(x, target[:, :2], mu, logvar, validate=validate)


SPARSE_CASES = {
    # name: (a call with that argument sparse, layout)
    "recon_input": (lambda x, t, m, lv: elbo_loss(x.to_sparse(), t, m, lv), "sparse_coo"),
    "recon_input csr": (
        lambda x, t, m, lv: elbo_loss(x.reshape(6, 5).to_sparse_csr(), t.reshape(6), m, lv),
        "sparse_csr",
    ),
    "target": (
        lambda x, t, m, lv: elbo_loss(
            x, torch.rand(2, 3, 5).to_sparse(), m, lv, likelihood="bernoulli"
        ),
        "sparse_coo",
    ),  # fmt: skip
    "mu": (lambda x, t, m, lv: elbo_loss(x, t, m.to_sparse(), lv), "sparse_coo"),
    "logvar": (lambda x, t, m, lv: elbo_loss(x, t, m, lv.to_sparse()), "sparse_coo"),
    "prior_mu": (
        lambda x, t, m, lv: elbo_loss(x, t, m, lv, prior_mu=m.to_sparse(), prior_logvar=lv),
        "sparse_coo",
    ),
    "hidden": (
        lambda x, t, m, lv: linear_elbo_loss(
            torch.randn(2, 3, 6).to_sparse(), torch.randn(5, 6), t, m, lv
        ),
        "sparse_coo",
    ),  # fmt: skip
    "weight": (
        lambda x, t, m, lv: linear_elbo_loss(
            torch.randn(2, 3, 6), torch.randn(5, 6).to_sparse(), t, m, lv
        ),
        "sparse_coo",
    ),  # fmt: skip
}


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@pytest.mark.parametrize("name", list(SPARSE_CASES))
def test_a_sparse_tensor_is_refused_by_name(name):
    # Regression: sparse logits failed deep inside with "unsupported memory
    # format option Contiguous" (a RuntimeError).
    call, layout = SPARSE_CASES[name]
    argument = name.split()[0]
    message = f"{argument} must be a dense (strided) tensor, got layout torch.{layout}"
    with pytest.raises(TypeError, match=re.escape(message)):
        call(*_cat())


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_a_one_element_beta_or_step_that_is_not_0d_is_refused(shape):
    # Regression: accepted although documented as 0-d, and elbo_loss_ref then
    # broadcast the loss to the tensor's shape ([1] for a [1] beta) while the
    # fused op returned a 0-d loss. Refused like the schedules' steps.
    from klanneal.schedules import Cyclical

    x, target, mu, logvar = _cat()
    hidden, weight = torch.randn(2, 3, 6), torch.randn(5, 6)
    beta = torch.full(shape, 0.5, requires_grad=True)
    step = torch.full(shape, 3, dtype=torch.int64)
    hint = "(for a one-element tensor, pass t.reshape(()))"
    for call in (
        lambda: elbo_loss(x, target, mu, logvar, beta),
        lambda: linear_elbo_loss(hidden, weight, target, mu, logvar, beta),
    ):
        with pytest.raises(TypeError, match=re.escape(f"got a tensor of shape {shape}")) as info:
            call()
        assert str(info.value).startswith("beta must be a float, a 0-d") and hint in str(info.value)
    for call in (
        lambda: elbo_loss(x, target, mu, logvar, Cyclical(100), step=step),
        lambda: linear_elbo_loss(hidden, weight, target, mu, logvar, Cyclical(100), step=step),
    ):
        with pytest.raises(TypeError, match="step must be an int or a 0-d integer tensor") as info:
            call()
        assert f"shape {shape}" in str(info.value) and hint in str(info.value)
    out = elbo_loss(x, target, mu, logvar, beta.reshape(()))  # as the hint says
    assert out.loss.shape == ()
