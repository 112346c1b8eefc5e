"""The fused ELBO op, one namespace for its parts (each in its own module):

* ``_layout``: the packed options (:class:`ElboOptions`), the op's input and
  output tuples, the layout and codes exported by ``_C.elbo_layout()``;
* ``_buffers``: output allocation and the CPU gradient-buffer pool;
* ``_kernels``: the native kernel per device and the pure-PyTorch reference;
* ``_autograd``: the backward shared by the registered and the eager autograd;
* ``_registration``: the ``torch.library`` schemas, kernels, fakes, autograd;
* ``_eager``: klanneal.elbo_loss's eager path (``eager_elbo``, ``ElboFunction``).
"""

from __future__ import annotations

from klanneal._autograd import _backward_common, _is_one
from klanneal._buffers import POOL_MIN_BYTES, _pool_enabled, empty_cache, pool_cached_bytes
from klanneal._eager import (
    APPLY,
    EagerPlan,
    ElboFunction,
    eager_elbo,
    eager_need,
    eager_plan,
    elbo_loss_inplace,
    elbo_loss_traced,
)
from klanneal._kernels import _native_kernel, _reference_kernel, native_available
from klanneal._layout import (
    DTYPE_CODES,
    FREE_BITS_MODES,
    FULL_PRECISION,
    LAYOUT,
    LIKELIHOODS,
    NO_SCHEDULE,
    PY_LAYOUT,
    REDUCTIONS,
    ElboOptions,
    OpInputs,
    constant_schedule,
    elbo_options,
    grad_dtype,
    result_dtype,
)
from klanneal._registration import elbo_loss_inplace_op, elbo_loss_op

__all__ = [
    "APPLY", "DTYPE_CODES", "FREE_BITS_MODES", "FULL_PRECISION", "LAYOUT", "LIKELIHOODS",
    "NO_SCHEDULE", "POOL_MIN_BYTES", "PY_LAYOUT", "REDUCTIONS", "EagerPlan", "ElboFunction",
    "ElboOptions", "OpInputs", "_backward_common", "_is_one", "_native_kernel", "_pool_enabled",
    "_reference_kernel", "constant_schedule", "eager_elbo", "eager_need", "eager_plan",
    "elbo_loss_inplace", "elbo_loss_inplace_op", "elbo_loss_op", "elbo_loss_traced",
    "elbo_options", "empty_cache", "grad_dtype", "native_available", "pool_cached_bytes",
    "result_dtype",
]  # fmt: skip
