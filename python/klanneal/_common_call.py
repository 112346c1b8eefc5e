"""The common elbo_loss call, recognised and run without an ElboCall.

Most training steps call ``elbo_loss(recon_input, target, mu, logvar, beta,
likelihood=...)`` with CPU tensors, a float or 0-d tensor beta and nothing
else: no step, capacity, prior, process group or inplace. ``common_call``
recognises such a call with a few attribute reads and runs it through the
eager path's own pieces (``eager_plan``, ``ElboOptions.packed``,
``eager_elbo``). It has no errors of its own: a call it does not recognise,
valid or not, returns None, and ``elbo_call`` checks it and raises the error
(docs/architecture.md). The option checks are the one check both share
(``elbo_options``), and run first in both, as for every float or tensor beta.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from klanneal._call import _FORWARD_AD, _NEW_TUPLE, _TRANSFORMS_ACTIVE, _UNTRACKED
from klanneal._eager import eager_elbo, eager_plan
from klanneal._kernels import native_available
from klanneal._layout import FULL_PRECISION, OpInputs, _cached_options, elbo_options
from klanneal.likelihoods import FAMILIES
from klanneal.reference import ELBOOutput

# The likelihoods of the common call: the native ones with a target of
# recon_input's shape (categorical's class ids take elbo_call's path).
_ELEMENTWISE = frozenset(
    name for name, family in FAMILIES.items()
    if family.native and family.target not in ("class_ids", "counts")
)  # fmt: skip
_Tensor = torch.Tensor
_STRIDED = torch.strided
_INF = float("inf")


def common_call(
    recon_input: Any, target: Any, mu: Any, logvar: Any, beta: Any, likelihood: Any,
    reduction: Any, free_bits: Any, free_bits_mode: Any, ignore_index: Any, gaussian_var: Any,
    validate: Any,
) -> Optional[ELBOOutput]:  # fmt: skip
    """elbo_loss's result for a common call (the caller has seen no step,
    capacity, prior, process group or inplace), or None for any other call.

    Common: an elementwise native likelihood named by a string; plain CPU
    tensors (not subclasses) of one floating dtype pair (recon_input and
    target fp32/fp64 alike, mu and logvar fp32/fp64 alike) and the shapes
    elbo_call accepts; a target that does not require grad; beta a float or
    a 0-d floating CPU tensor that does not, in [0, inf); grad mode as it
    is; no torch.compile, torch.func transform, forward-mode AD or torch
    function mode; the native kernel present.
    """
    beta_is_float = type(beta) is float
    if not (
        (beta_is_float or (
            type(beta) is _Tensor and beta.dim() == 0 and beta.is_cpu
            and not beta.requires_grad and beta.dtype.is_floating_point
        ))
        and type(likelihood) is str and likelihood in _ELEMENTWISE
        and type(recon_input) is _Tensor and type(target) is _Tensor
        and type(mu) is _Tensor and type(logvar) is _Tensor
        and recon_input.is_cpu and target.is_cpu and mu.is_cpu and logvar.is_cpu
        and recon_input.layout is _STRIDED and target.layout is _STRIDED
        and mu.layout is _STRIDED and logvar.layout is _STRIDED
        and not target.requires_grad and not _SPECIAL_STATE()
    ):  # fmt: skip
        return None
    value = beta if beta_is_float else beta.item()  # after _SPECIAL_STATE: vmap has no item()
    if not 0 <= value < _INF:
        return None
    recon_dtype, latent_dtype = recon_input.dtype, mu.dtype
    if not (
        recon_dtype in FULL_PRECISION and target.dtype is recon_dtype
        and latent_dtype in FULL_PRECISION and logvar.dtype is latent_dtype
    ):  # fmt: skip
        return None
    shape, recon_shape = mu.shape, recon_input.shape
    if not (
        len(shape) == 2 and logvar.shape == shape and target.shape == recon_shape
        and len(recon_shape) > 0 and recon_shape[0] == shape[0] and shape[0] > 0
    ):  # fmt: skip
        return None
    if not native_available(None):
        return None
    args = (likelihood, reduction, free_bits, free_bits_mode, ignore_index, gaussian_var, validate)
    try:
        options = _cached_options(*args)  # elbo_options' cache, not tracing
    except TypeError:
        options = elbo_options(*args)  # an unhashable argument: checked uncached
    if _GRAD_ENABLED():
        requires = (
            recon_input.requires_grad, False, mu.requires_grad, logvar.requires_grad,
            False, False, False,
        )  # fmt: skip
    else:
        requires = _UNTRACKED
    plan = eager_plan(requires, recon_dtype, latent_dtype, options.reduction)
    floats, ints = options.packed_value(value, plan.asked)
    op = _NEW_TUPLE(OpInputs, (
        recon_input.contiguous(), target.contiguous(), mu.contiguous(), logvar.contiguous(),
        None, None, floats, ints, None, None, None,
    ))  # fmt: skip
    return _NEW_TUPLE(ELBOOutput, eager_elbo(plan, options, op))


def _special_state() -> bool:
    """torch.compile tracing, a torch.func transform, forward-mode AD or a
    torch function mode is active: elbo_call decides those calls."""
    return (
        _IS_COMPILING()
        or _TRANSFORMS_ACTIVE()
        or _FORWARD_AD._current_level >= 0
        or _FUNCTION_MODE()
    )


_IS_COMPILING = torch.compiler.is_compiling
_FUNCTION_MODE = torch._C._is_torch_function_mode_enabled
_GRAD_ENABLED = torch.is_grad_enabled
_SPECIAL_STATE = _special_state
