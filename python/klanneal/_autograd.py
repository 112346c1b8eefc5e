"""The fused ELBO op's backward, shared by its registered autograd and the eager
attachment: the gradients computed in the forward pass, scaled by grad_output."""

from __future__ import annotations

from typing import Any, Optional

import torch

from klanneal._layout import _N_INPUTS, FULL_PRECISION, ElboOptions, OpInputs

_DOUBLE_BACKWARD = (
    "klanneal.elbo_loss does not support double backward (create_graph=True, as for a "
    "gradient penalty): its gradients are computed in the forward pass and have no graph "
    "of their own. Use klanneal.elbo_loss_ref for losses that need second derivatives."
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
    ctx: Any, state: Any, grad_loss: Optional[torch.Tensor]
) -> list[Optional[torch.Tensor]]:
    """Gradients of the op's inputs in schema order (OpInputs): the saved ones
    times grad_loss; beta's is grad_loss times d loss / d beta (kl_weight).

    ctx.saved_tensors: grad_recon, grad_mu, grad_logvar, grad_prior_mu,
    grad_prior_logvar, kl_weight. state (ctx itself for the op, in eager
    mode the copy of the call's EagerPlan that ElboFunction keeps on ctx):
    reduction, asked (the 5 gradients the forward computed), recon_dtype,
    latent_dtype, grad_recon_input, grad_target, grad_beta, scaled_in_place.

    Eager, the saved gradients are scaled in place (no second logits-sized
    buffer), after which they cannot serve another backward; when grad_loss
    is exactly 1 on CPU they are returned untouched. Under tracing
    (torch.compile, opcheck) the product is out of place.
    """
    if state.scaled_in_place:
        raise RuntimeError(_SECOND_BACKWARD)
    none: list[Optional[torch.Tensor]] = [None] * _N_INPUTS
    if grad_loss is None:  # only non-differentiable outputs reached this node
        return none
    eager = type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling()
    if eager and torch.is_grad_enabled():
        # Backward runs in grad mode only under create_graph=True: the result
        # would be a gradient without a graph, silently wrong for whatever
        # differentiates it again.
        raise RuntimeError(_DOUBLE_BACKWARD)
    saved = ctx.saved_tensors
    skip = eager and _is_one(grad_loss)
    # Saved gradients handed out as they are (an earlier backward's grad_loss
    # was exactly 1) may be held by the caller (torch.autograd.grad's result,
    # a hook's argument): a later backward through the retained graph scales
    # them out of place instead of overwriting what the caller holds.
    in_place = eager and not getattr(ctx, "handed_out", False)
    grads: list[Optional[torch.Tensor]]
    if skip:
        ctx.handed_out = True
        grads = [g if asked else None for g, asked in zip(saved[:5], state.asked)]
    else:
        grads = []
        for grad, asked in zip(saved[:5], state.asked):
            if not asked:
                grads.append(None)
            elif state.reduction == "none":
                # grad_loss is [B]: it scales each example's slice.
                factor = grad_loss.reshape(-1, 1)
                if in_place:
                    grad.view(factor.shape[0], -1).mul_(factor)
                    grads.append(grad)
                else:
                    grads.append(
                        (grad.view(factor.shape[0], -1) * factor).to(grad.dtype).view(grad.shape)
                    )
            elif in_place:
                grads.append(grad.mul_(grad_loss))
            else:
                grads.append((grad * grad_loss).to(grad.dtype))
        if in_place:
            state.scaled_in_place = True
    # fp16/bf16 inputs: the gradients were kept in fp32 up to here.
    if state.recon_dtype not in FULL_PRECISION and grads[0] is not None:
        grads[0] = grads[0].to(state.recon_dtype)
    if state.latent_dtype not in FULL_PRECISION:
        grads[1:] = [None if g is None else g.to(state.latent_dtype) for g in grads[1:]]
    # A gaussian/mse target that requires grad: d loss / d target = -d loss / d recon_input.
    grad_target = None
    if state.grad_target and grads[0] is not None:
        if state.grad_recon_input:
            grad_target = -grads[0]
        elif in_place:
            # Negated in place (no second logits-sized buffer): if that is the
            # saved gradient, it cannot serve another backward.
            if grads[0] is saved[0]:
                state.scaled_in_place = True
            grad_target, grads[0] = grads[0].neg_(), None
        else:
            grad_target, grads[0] = -grads[0], None
    out = none
    out[0], out[1], out[2], out[3] = grads[0], grad_target, grads[1], grads[2]
    out[8], out[9] = grads[3], grads[4]
    if state.grad_beta:
        # A learnable beta (GECO, a Lagrange multiplier): d loss / d beta = the KL term.
        out[4] = (grad_loss.to(torch.float64) * saved[5].to(torch.float64)).sum()
    return out


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
