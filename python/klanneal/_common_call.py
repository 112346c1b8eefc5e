"""The common elbo_loss call, recognised and run without an ElboCall.

Most training steps call ``elbo_loss(recon_input, target, mu, logvar, beta,
likelihood=...)`` with CPU tensors, a float or 0-d tensor beta and nothing
else: no step, capacity, prior, process group or inplace. ``common_call``
(``_C.common_elbo``, csrc/bind_common_call.cpp) recognises such a call and
runs the eager path in one C call: it reads the tensors' attributes,
looks up the call's lane (``make_lane``, once per options, dtypes and
gradients asked for: the EagerPlan and the packed options decoded for the
kernel), allocates the outputs, launches the kernel and attaches the loss
(ElboFunction). Per call it costs the attribute reads, the allocations and
the attachment and nothing more (docs/perf.md).

It has no errors of its own: a call it does not recognise, valid or not,
returns None and ``elbo_call`` checks it and raises the error
(docs/architecture.md). The option checks are the one check both share
(``elbo_options``, run by ``make_lane``); the kernel's invalid target is
reported by ``raise_invalid_target``, as on the eager path.

Common: an elementwise native likelihood named by a string; plain CPU
tensors (not subclasses) of strided layout, of one floating dtype pair
(recon_input and target fp32/fp64 alike, mu and logvar fp32/fp64 alike)
and the shapes elbo_call accepts (mu [B, D] with B > 0, logvar mu's shape,
recon_input [B, ...], target recon_input's shape); a target that does not
require grad; beta a float or a 0-d floating CPU tensor that does not, in
[0, inf); grad mode as it is; no torch.compile, torch.func transform,
forward-mode AD or torch function mode; the native kernel present and not
disabled (KLANNEAL_DISABLE_NATIVE).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from klanneal._buffers import POOL_MIN_BYTES, _grad_recon_buffer
from klanneal._eager import _ZERO_D, APPLY, eager_plan
from klanneal._env import _ENV_BYTES, native_disabled
from klanneal._layout import DTYPE_CODES, FULL_PRECISION, LAYOUT, elbo_options
from klanneal._validate import raise_invalid_target
from klanneal.likelihoods import FAMILIES
from klanneal.reference import ELBOOutput

try:
    from klanneal import _C
except ImportError:  # pragma: no cover - exercised via KLANNEAL_DISABLE_NATIVE
    _C = None  # type: ignore[assignment]

# The likelihoods of the common call: the native ones with a target of
# recon_input's shape (categorical's class ids take elbo_call's path).
_ELEMENTWISE = frozenset(
    name for name, family in FAMILIES.items()
    if family.native and family.target not in ("class_ids", "counts")
)  # fmt: skip


def make_lane(
    likelihood: Any, reduction: Any, free_bits: Any, free_bits_mode: Any, ignore_index: Any,
    gaussian_var: Any, validate: Any, _free_bits_type: type, _ignore_index_type: type,
    _gaussian_var_type: type, _validate_type: type, recon_dtype: torch.dtype,
    target_dtype: torch.dtype, latent_dtype: torch.dtype, logvar_dtype: torch.dtype,
    grad_recon: bool, grad_mu: bool, grad_logvar: bool,
) -> Any:  # fmt: skip
    """The lane of a common call (its key in _C.common_elbo's lane table: the
    options, their types, the four dtypes and the gradients asked for), or
    None where the dtypes make it not common. Checks the options first
    (elbo_options raises the error elbo_call would)."""
    options = elbo_options(
        likelihood, reduction, free_bits, free_bits_mode, ignore_index, gaussian_var, validate
    )
    if not (
        recon_dtype in FULL_PRECISION and target_dtype is recon_dtype
        and latent_dtype in FULL_PRECISION and logvar_dtype is latent_dtype
    ):  # fmt: skip
        return None
    requires = (grad_recon, False, grad_mu, grad_logvar, False, False, False)
    plan = eager_plan(requires, recon_dtype, latent_dtype, options.reduction)
    floats, ints = options.packed_value(0.0, plan.asked)
    codes = {
        "recon_dtype": DTYPE_CODES[recon_dtype], "latent_dtype": DTYPE_CODES[latent_dtype],
        "out_dtype": DTYPE_CODES[plan.dtype], "n_threads": 1,
    }  # fmt: skip
    sizes = [codes.get(name, 0) for name in LAYOUT["sizes"]]
    return _C.common_lane(
        sizes, floats, ints, _ZERO_D[plan.dtype], plan.dtype, plan, grad_recon, grad_mu,
        grad_logvar, POOL_MIN_BYTES // recon_dtype.itemsize,
    )  # fmt: skip


def _python_common_call(*args: Any) -> Optional[ELBOOutput]:
    """Without the native extension no call is common."""
    return None


common_call: Callable[..., Optional[ELBOOutput]] = _python_common_call
if _C is not None:
    _C.common_setup({
        "tensor_type": torch.Tensor, "strided": torch.strided, "float32": torch.float32,
        "float64": torch.float64, "elementwise": _ELEMENTWISE, "empty_like": torch.empty_like,
        "empty": torch.empty, "default_dtype": torch.get_default_dtype,
        "transforms_active": torch._C._are_functorch_transforms_active,
        "function_mode": torch._C._is_torch_function_mode_enabled,
        "forward_ad": torch.autograd.forward_ad, "grad_enabled": torch.is_grad_enabled,
        "num_threads": torch.get_num_threads, "apply": APPLY, "output_type": ELBOOutput,
        "make_lane": make_lane, "lanes": {}, "large_grad": _grad_recon_buffer,
        "invalid_target": raise_invalid_target,
        "env": _ENV_BYTES if _ENV_BYTES is not None else None,
        "native_disabled": native_disabled,
    })  # fmt: skip
    common_call = _C.common_elbo

__all__ = ["common_call", "make_lane"]
