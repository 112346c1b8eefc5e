"""``klanneal::elbo_loss`` and ``klanneal::elbo_loss_inplace``: their schemas, the
kernel per device, the fake kernels for torch.compile and the registered autograd.

Registration as bitsandbytes and extension-cpp do it: each schema is defined
once (``torch.library.define``), a kernel is registered per device (CPU,
CUDA) and the pure-PyTorch reference as the default kernel, so
``torch.ops.klanneal.elbo_loss`` runs on any device; ``register_fake`` lets
torch.compile trace it and ``register_autograd`` makes the op itself
differentiable (torch.compile, direct calls). The op is functional: it
returns loss, recon, kl, kl_per_dim, beta (float64, cast by the caller) and
the gradients of the loss w.r.t. recon_input, mu and logvar, computed in the
same pass (empty tensors for the ones not asked for); its backward only
scales those gradients by grad_output. ``klanneal::elbo_loss_inplace`` writes
the recon_input gradient into recon_input itself.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from klanneal._autograd import _backward_common, _save_context
from klanneal._buffers import _latent_grads, _op_scalars
from klanneal._kernels import (
    _inplace_outputs,
    _native_inplace_kernel,
    _native_kernel,
    _outputs,
    _reference_inplace_kernel,
    _reference_kernel,
)
from klanneal._layout import SAVED, ElboOptions, InplaceOutputs, OpInputs, Outputs, grad_dtype

try:
    from klanneal import _C
except ImportError:  # pragma: no cover - exercised via KLANNEAL_DISABLE_NATIVE
    _C = None  # type: ignore[assignment]


_ARGS = (
    "Tensor recon_input, Tensor target, Tensor mu, Tensor logvar, Tensor? beta, Tensor? step, "
    "float[] floats, int[] ints, Tensor? prior_mu=None, Tensor? prior_logvar=None, "
    "Tensor? global_kl_per_dim=None"
)
_RETURNS = ", ".join(["Tensor"] * len(Outputs._fields))
_INPLACE_RETURNS = ", ".join(["Tensor"] * len(InplaceOutputs._fields))
torch.library.define("klanneal::elbo_loss", f"({_ARGS}) -> ({_RETURNS})")
torch.library.define(
    "klanneal::elbo_loss_inplace",
    f"({_ARGS.replace('Tensor recon_input', 'Tensor(a!) recon_input')}) -> ({_INPLACE_RETURNS})",
)
elbo_loss_op = torch.ops.klanneal.elbo_loss.default
elbo_loss_inplace_op = torch.ops.klanneal.elbo_loss_inplace.default

torch.library.impl("klanneal::elbo_loss", "default")(_reference_kernel)
torch.library.impl("klanneal::elbo_loss_inplace", "default")(_reference_inplace_kernel)
if _C is not None:
    for _device in ("cpu", "cuda"):
        torch.library.impl("klanneal::elbo_loss", _device)(_native_kernel)
        torch.library.impl("klanneal::elbo_loss_inplace", _device)(_native_inplace_kernel)


def _fake_grads(i: OpInputs) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The op's scalars and gradients as shapes and dtypes only (torch.compile's trace)."""
    args = ElboOptions.unpack(i.floats, i.ints)
    recon_input = i.recon_input
    grad_recon = recon_input.new_empty(
        recon_input.shape if args.need_grads[0] else (0,), dtype=grad_dtype(recon_input.dtype)
    )
    scalars = _op_scalars(i.mu, args.options.reduction, recon_input.device)
    latent = tuple(
        g if g is not None else i.mu.new_empty(0, dtype=grad_dtype(i.mu.dtype))
        for g in _latent_grads(i.mu, args.need_grads)
    )
    return scalars, (grad_recon, *latent)


@torch.library.register_fake("klanneal::elbo_loss")  # type: ignore[untyped-decorator]
def _elbo_loss_fake(*args: Any, **kwargs: Any) -> Outputs:
    return _outputs(*_fake_grads(OpInputs(*args, **kwargs)))


@torch.library.register_fake("klanneal::elbo_loss_inplace")  # type: ignore[untyped-decorator]
def _elbo_loss_inplace_fake(*args: Any, **kwargs: Any) -> InplaceOutputs:
    return _inplace_outputs(*_fake_grads(OpInputs(*args, **kwargs)))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    _save_context(ctx, OpInputs(*inputs))
    out = Outputs(*output)
    ctx.save_for_backward(*(getattr(out, name) for name in SAVED), out.kl_weight)
    ctx.mark_non_differentiable(*(t for t in out if t is not out.loss))


def _backward(ctx: Any, grad_loss: Optional[torch.Tensor], *unused: Any) -> tuple[Any, ...]:
    return tuple(_backward_common(ctx, ctx, grad_loss))


torch.library.register_autograd("klanneal::elbo_loss", _backward, setup_context=_setup_context)
