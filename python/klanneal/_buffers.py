"""Output buffers of the fused ELBO op: the CPU gradient pool and the cheapest
allocation of the scalar outputs and latent gradients (what a small call pays)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from klanneal._env import env_switch
from klanneal._layout import DTYPE_CODES, grad_dtype

try:
    from klanneal import _C
except ImportError:  # pragma: no cover - exercised via KLANNEAL_DISABLE_NATIVE
    _C = None  # type: ignore[assignment]


# A recon_input gradient of at least this many bytes comes from klanneal's
# buffer pool on the CPU (csrc/include/klanneal/buffer_pool.h) instead of a
# fresh torch.empty: glibc maps a buffer this large anew on every call and the
# kernel zeroes each page on first touch, ~half the op's time in the text
# benchmark. KLANNEAL_GRAD_POOL=0 switches the pool off.
POOL_MIN_BYTES = 1 << 20


# torch.utils.dlpack.from_dlpack ends, for a capsule, in torch._C._from_dlpack:
# called directly, a Python frame and its checks less (~20 us when the call
# path is out of the caches, as between training steps).
_FROM_CAPSULE = getattr(torch._C, "_from_dlpack", None) or torch.utils.dlpack.from_dlpack


def _pool_enabled() -> bool:
    return _C is not None and env_switch("KLANNEAL_GRAD_POOL", True)


def _grad_recon_buffer(
    recon_input: torch.Tensor, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """An uninitialised contiguous tensor of recon_input's shape for its gradient
    (dtype: grad_dtype(recon_input.dtype), which the caller may pass).

    Large CPU buffers come from the pool: the tensor's deleter gives the
    buffer back for the next step's call instead of unmapping it.
    """
    if dtype is None:
        dtype = grad_dtype(recon_input.dtype)
    nbytes = recon_input.numel() * dtype.itemsize
    if nbytes >= POOL_MIN_BYTES and recon_input.is_cpu and _pool_enabled():
        capsule = _C.pooled_empty(list(recon_input.shape), DTYPE_CODES[dtype])
        return _FROM_CAPSULE(capsule)
    if not recon_input.is_contiguous():
        return torch.empty_like(recon_input, dtype=dtype, memory_format=torch.contiguous_format)
    if dtype is recon_input.dtype:  # empty_like keeps the (contiguous) strides
        return torch.empty_like(recon_input)
    return torch.empty_like(recon_input, dtype=dtype)


def empty_cache() -> None:
    """Frees the CPU gradient buffers klanneal keeps cached between calls.

    ``klanneal.elbo_loss`` (``inplace=False``, on the CPU) takes its large
    logits-sized gradient buffers from a small pool and gets them back when
    autograd frees the gradient, so the next training step reuses the memory
    instead of allocating it anew. At most two buffers (1 GiB in all) stay
    cached; this returns them to the system, e.g. after training. Buffers
    still in use by live tensors are not affected. A no-op without the native
    extension.
    """
    if _C is not None:
        _C.pool_empty_cache()


def pool_cached_bytes() -> int:
    """Bytes the CPU gradient-buffer pool holds in cached (free) buffers."""
    return 0 if _C is None else int(_C.pool_cached_bytes())


_FUNCTION_MODE_ENABLED = torch._C._is_torch_function_mode_enabled


def _scalar_outputs(
    mu: torch.Tensor,
    reduction: str,
    device: Optional[torch.device],
    dtype: torch.dtype = torch.float64,
    kl_weight: bool = True,
) -> tuple[Optional[torch.Tensor], ...]:
    """Uninitialised loss, recon, kl, kl_per_dim, beta and kl_weight (None
    without `kl_weight`) in `dtype` on `device` (None: the CPU).

    What a small eager call pays: torch.empty's keyword arguments cost
    about a microsecond each, so only those that differ from the defaults
    are passed; a shape goes as ``size=`` (a positional tuple is first tried
    against empty's other overloads, slower still).
    """
    batch, latent_dim = mu.shape
    shape = (batch,) if reduction == "none" else ()
    empty = torch.empty
    # A default device (torch.set_default_device, `with torch.device(...)`)
    # is a torch function mode: with one active, the CPU kernel's outputs
    # are placed on the CPU explicitly (it would write through their pointers).
    function_mode = _FUNCTION_MODE_ENABLED()
    if device is None and dtype is torch.get_default_dtype() and not function_mode:
        return (
            empty(size=shape), empty(size=shape), empty(size=shape), empty(latent_dim),
            empty(size=()), empty(size=shape) if kl_weight else None,
        )  # fmt: skip
    kw: dict[str, Any] = {}
    if dtype != torch.get_default_dtype():
        kw["dtype"] = dtype
    if device is not None:
        kw["device"] = device
    elif function_mode:
        kw["device"] = "cpu"
    return (
        empty(size=shape, **kw),
        empty(size=shape, **kw),
        empty(size=shape, **kw),
        empty(latent_dim, **kw),
        empty(size=(), **kw),
        empty(size=shape, **kw) if kl_weight else None,
    )


def _op_scalars(mu: torch.Tensor, reduction: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The op's six scalar outputs, float64 (kl_weight included)."""
    on = None if device.type == "cpu" else device
    return tuple(t for t in _scalar_outputs(mu, reduction, on) if t is not None)


def _latent_grads(
    mu: torch.Tensor, need: tuple[bool, ...], dtype: Optional[torch.dtype] = None
) -> tuple[Optional[torch.Tensor], ...]:
    """Uninitialised grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar (in
    `dtype`, by default grad_dtype(mu.dtype), mu's contiguous layout), None
    for those not asked for (need: the 5 flags). empty_like without keyword
    arguments where it can: each costs about a microsecond."""
    if dtype is None:
        dtype = grad_dtype(mu.dtype)
    if dtype is mu.dtype and mu.is_contiguous():
        empty = torch.empty_like
        return (
            empty(mu) if need[1] else None, empty(mu) if need[2] else None,
            empty(mu) if need[3] else None, empty(mu) if need[4] else None,
        )  # fmt: skip
    kw: dict[str, Any] = {} if dtype == mu.dtype else {"dtype": dtype}
    if not mu.is_contiguous():
        kw["memory_format"] = torch.contiguous_format
    return tuple(torch.empty_like(mu, **kw) if n else None for n in need[1:])
