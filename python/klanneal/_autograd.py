"""The fused ELBO op's backward, shared by its registered autograd and the eager
attachment: the gradients computed in the forward pass, scaled by grad_output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from klanneal._layout import _N_INPUTS, FULL_PRECISION, SAVED, ElboOptions, OpInputs

_DOUBLE_BACKWARD = (
    "klanneal.elbo_loss does not support double backward (create_graph=True, as for a "
    "gradient penalty): its gradients are computed in the forward pass and have no graph "
    "of their own. Use klanneal.elbo_loss_ref for losses that need second derivatives."
)


# Positions of the op's inputs (OpInputs) in the gradient list backward returns.
_IN_RECON, _IN_TARGET, _IN_MU, _IN_LOGVAR, _IN_BETA = (
    OpInputs._fields.index(name) for name in ("recon_input", "target", "mu", "logvar", "beta")
)
_IN_PRIOR_MU, _IN_PRIOR_LOGVAR = (
    OpInputs._fields.index(name) for name in ("prior_mu", "prior_logvar")
)

_N_SAVED = len(SAVED)

_MODIFIED = (
    "klanneal.elbo_loss: a gradient handed out by an earlier backward was modified by an "
    "inplace operation, so a later backward through the same graph (retain_graph=True) "
    "cannot hand it out again. Recompute the loss for another backward."
)

_SECOND_BACKWARD = (
    "klanneal.elbo_loss: a second backward through the same graph (retain_graph=True) is "
    "not supported: the first backward scaled the gradients saved by the forward pass in "
    "place. Recompute the loss for a second backward."
)


def _is_one(grad_output: torch.Tensor) -> bool:
    """grad_output is exactly 1 everywhere (checked on CPU only: no device sync)."""
    if not grad_output.is_cpu:
        return False
    if grad_output.numel() == 1:
        return grad_output.item() == 1.0
    return bool((grad_output == 1).all())


def _backward_common(
    ctx: Any,
    state: Any,
    grad_loss: Optional[torch.Tensor],
    saved_slots: Optional[Sequence[int]] = None,
) -> list[Optional[torch.Tensor]]:
    """Gradients of the op's inputs in schema order (OpInputs): the saved ones
    times grad_loss; beta's is grad_loss times d loss / d beta (kl_weight).

    ctx.saved_tensors: the gradients named in SAVED (grad_recon, grad_mu,
    grad_logvar, grad_prior_mu, grad_prior_logvar), then kl_weight; or, with
    ``saved_slots`` (ElboFunction), ``saved_gradients(ctx)``: only those
    computed, each in its slot of that list. state
    (ctx itself for the op, in eager mode the copy of the call's EagerPlan
    that ElboFunction keeps on ctx): reduction, asked (the 5 gradients the
    forward computed), recon_dtype, latent_dtype, grad_recon_input,
    grad_target, grad_beta, scaled_in_place.

    Eager, the saved gradients are scaled in place (no second logits-sized
    buffer), after which they cannot serve another backward; when grad_loss
    is exactly 1 on CPU they are returned untouched. Under tracing
    (torch.compile, opcheck) the product is out of place.
    """
    check_backward(state, _SECOND_BACKWARD)
    none: list[Optional[torch.Tensor]] = [None] * _N_INPUTS
    if grad_loss is None:  # only non-differentiable outputs reached this node
        return none
    eager = check_eager(grad_loss, _DOUBLE_BACKWARD)
    if saved_slots is None:
        saved_all: list[Any] = list(ctx.saved_tensors)
    else:
        saved_all = [None] * (_N_SAVED + 1)
        for slot, tensor in zip(saved_slots, saved_gradients(ctx)):
            saved_all[slot] = tensor
    *saved, kl_weight = saved_all  # the SAVED gradients, then kl_weight
    grads, in_place = scale_saved(ctx, state, saved, state.asked, grad_loss, state.reduction, eager)
    # fp16/bf16 inputs: the gradients were kept in fp32 up to here.
    if state.recon_dtype not in FULL_PRECISION and grads[0] is not None:
        grads[0] = grads[0].to(state.recon_dtype)
    if state.latent_dtype not in FULL_PRECISION:
        grads[1:] = [None if g is None else g.to(state.latent_dtype) for g in grads[1:]]
    grad_recon, grad_target = _target_grad(state, grads[0], saved[0], in_place)
    out = none
    out[_IN_RECON], out[_IN_TARGET] = grad_recon, grad_target
    out[_IN_MU], out[_IN_LOGVAR], out[_IN_PRIOR_MU], out[_IN_PRIOR_LOGVAR] = grads[1:]
    if state.grad_beta:
        # A learnable beta (GECO, a Lagrange multiplier): d loss / d beta = the KL term.
        out[_IN_BETA] = (grad_loss.to(torch.float64) * kl_weight.to(torch.float64)).sum()
    return out


def saved_gradients(ctx: Any) -> tuple[torch.Tensor, ...]:
    """The gradients ElboFunction's forward kept: ``ctx.kept`` (small ones,
    kept as an attribute, which costs less per call than saved tensors) or
    ``ctx.saved_tensors``.

    Kept ones get the saved tensors' checks: reading ctx.saved_tensors (none
    saved) raises torch's error for a backward through a graph an earlier
    backward freed, and once handed out (``ctx.handed_out``) they must not
    have been modified in place (their version is 0 until then: allocated
    by the call, written by the kernel through a pointer).
    """
    kept = ctx.kept
    if kept is None:
        return ctx.saved_tensors  # type: ignore[no-any-return]
    ctx.saved_tensors  # noqa: B018 - raises after the graph was freed
    if ctx.handed_out and any(t._version != 0 for t in kept):
        raise RuntimeError(_MODIFIED)
    return kept  # type: ignore[no-any-return]


def check_backward(state: Any, second_backward: str) -> None:
    """Refuses a backward after one that scaled the saved gradients in place."""
    if state.scaled_in_place:
        raise RuntimeError(second_backward)


def check_eager(grad: torch.Tensor, double_backward: str) -> bool:
    """Whether this backward runs eagerly (not traced); refuses double backward.

    Backward runs in grad mode only under create_graph=True: the result
    would be a gradient without a graph, silently wrong for whatever
    differentiates it again.
    """
    eager = type(grad) is torch.Tensor and not torch.compiler.is_compiling()
    if eager and torch.is_grad_enabled():
        raise RuntimeError(double_backward)
    return eager


def scale_saved(
    ctx: Any,
    state: Any,
    saved: Sequence[torch.Tensor],
    asked: Sequence[bool],
    grad: torch.Tensor,
    reduction: str,
    eager: bool,
) -> tuple[list[Optional[torch.Tensor]], bool]:
    """The saved gradients (those ``asked``; None for the others) times the
    upstream ``grad``, and whether they were scaled in place.

    Eager, they are scaled in place (no second logits-sized buffer), after
    which they cannot serve another backward (``state.scaled_in_place``);
    when ``grad`` is exactly 1 on the CPU they are handed out untouched.
    Gradients handed out so (``ctx.handed_out``) may be held by the caller
    (torch.autograd.grad's result, a hook's argument): a later backward
    through the retained graph scales them out of place. Traced
    (torch.compile, opcheck), always out of place.
    """
    in_place = eager and not getattr(ctx, "handed_out", False)
    if eager and _is_one(grad):
        ctx.handed_out = True
        return [g if a else None for g, a in zip(saved, asked)], in_place
    grads = [_scaled(g, grad, reduction, in_place) if a else None for g, a in zip(saved, asked)]
    if in_place:
        state.scaled_in_place = True
    return grads, in_place


def _scaled(
    grad: torch.Tensor, grad_loss: torch.Tensor, reduction: str, in_place: bool
) -> torch.Tensor:
    """A saved gradient times grad_loss ([B] under reduction "none": each
    example's slice by its own), in place or not."""
    if reduction == "none":
        factor = grad_loss.reshape(-1, 1)
        rows = grad.view(factor.shape[0], -1)
        if in_place:
            rows.mul_(factor)
            return grad
        return (rows * factor).to(grad.dtype).view(grad.shape)
    if in_place:
        return grad.mul_(grad_loss)
    return (grad * grad_loss).to(grad.dtype)


def _target_grad(
    state: Any, grad: Optional[torch.Tensor], saved: torch.Tensor, in_place: bool
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(recon_input's gradient, target's): a gaussian/mse target that requires
    grad gets d loss / d target = -d loss / d recon_input."""
    if not state.grad_target or grad is None:
        return grad, None
    if state.grad_recon_input:
        return grad, -grad
    if in_place:
        # Negated in place (no second logits-sized buffer): if that is the
        # saved gradient, it cannot serve another backward.
        if grad is saved:
            state.scaled_in_place = True
        return None, grad.neg_()
    return None, -grad


def _save_context(ctx: Any, i: OpInputs) -> None:
    # Without this autograd would materialise a zero tensor for the unused
    # gradient of every other output, a logits-sized one for grad_recon.
    ctx.set_materialize_grads(False)
    args = ElboOptions.unpack(i.floats, i.ints)
    ctx.reduction = args.options.reduction
    ctx.scaled_in_place = False
    ctx.recon_dtype, ctx.latent_dtype = i.recon_input.dtype, i.mu.dtype
    # Which of grad_recon, grad_mu, grad_logvar, grad_prior_mu,
    # grad_prior_logvar the forward pass computed (a gradient asked for may
    # still be empty: a [B, 0, V] input).
    ctx.asked = args.need_grads
    ctx.grad_recon_input = i.recon_input.requires_grad
    ctx.grad_target = i.target.requires_grad and i.target.dtype.is_floating_point
    ctx.grad_beta = i.beta is not None and i.beta.requires_grad
