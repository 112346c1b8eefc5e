"""klanneal.linear_elbo_loss: the decoder's output projection and the ELBO in one op.

The largest tensors of a text-VAE training step are the decoder's logits
[N, V] and their gradient (N = batch x length). ``linear_elbo_loss`` never
builds them: it walks the rows in chunks, and for each chunk

    logits = hidden_chunk @ weight^T + bias          one reused [chunk, V] buffer (BLAS)
    the categorical kernel of elbo_loss              loss per row; d loss / d logits
                                                     written over the logits, in place
    grad_hidden[chunk] = g @ weight                  BLAS
    grad_weight += g^T @ hidden_chunk, grad_bias += column sums of g

all in the forward pass; backward only scales the saved gradients by the
upstream gradient, as ``elbo_loss`` does. Peak extra memory: one chunk
buffer plus the parameter gradients. The reconstruction part is the op
``klanneal::linear_nll`` registered here (a CPU and a CUDA kernel around the
existing categorical kernel, the pure-PyTorch reference as the default
kernel, ``register_fake`` and ``register_autograd``); the KL part is
the same call object and kernel as ``klanneal.elbo_loss``'s
(``klanneal._call.kl_term_call``: a call without reconstruction elements,
for which the kernel computes only the KL term), so beta schedules, step
tensors, free bits and every KL option come from the one implementation.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from klanneal import _ops, _validate
from klanneal._call import kl_term_call
from klanneal._call import reference_only as _reference_only
from klanneal.elbo import elbo_loss
from klanneal.kl_terms import KLTerm
from klanneal.reference import ELBOOutput
from klanneal.schedules import Schedule

try:
    from klanneal import _C
except ImportError:  # pragma: no cover - exercised via KLANNEAL_DISABLE_NATIVE
    _C = None  # type: ignore[assignment]


from klanneal._linear_op import (  # noqa: F401 - re-exported (tests, users)
    CHUNK_BYTES,
    MIN_CHUNK_ROWS,
    LinearOptions,
    _linear_nll,
    default_chunk_size,
    linear_nll_op,
)

__all__ = ["default_chunk_size", "linear_elbo_loss"]


# ---- the public function -------------------------------------------------------------


def _check_linear_args(
    hidden: Any, weight: Any, bias: Any, target: Any, mu: Any, logvar: Any, chunk_size: Any
) -> None:
    """Raises TypeError/ValueError naming the first bad argument of the projection.

    mu, logvar, beta, step and the options are checked by elbo_loss (the KL term).
    """
    named = [("hidden", hidden), ("weight", weight), ("target", target), ("mu", mu)]
    named += [("logvar", logvar)] + ([("bias", bias)] if bias is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _validate.check_strided(**dict(named))
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in named)
        raise ValueError(
            f"hidden, weight, bias, target, mu and logvar must be on one device: {where}"
        )
    if hidden.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, float64, float16 or bfloat16, got {hidden.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{name} must have the dtype of hidden ({hidden.dtype}), got {t.dtype}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [B, ..., H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H] (nn.Linear.weight), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty class dimension (V = 0)")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got "
            f"{tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class ids, got {target.dtype}")
    if target.dtype == torch.uint64:
        raise TypeError("target: uint64 class ids are not supported; pass int64 class ids")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got "
            f"{tuple(target.shape)}"
        )
    if mu.dim() >= 1 and hidden.shape[0] != mu.shape[0]:
        raise ValueError(f"hidden has batch size {hidden.shape[0]} but mu has {mu.shape[0]}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0 rows (or None), got {chunk_size}")


def linear_elbo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: Union[float, torch.Tensor, Schedule] = 1.0,
    *,
    step: Optional[Union[int, torch.Tensor]] = None,
    bias: Optional[torch.Tensor] = None,
    reduction: str = "batchmean",
    free_bits: float = 0.0,
    free_bits_mode: str = "batch",
    ignore_index: int = -100,
    prior_mu: Optional[torch.Tensor] = None,
    prior_logvar: Optional[torch.Tensor] = None,
    capacity: Union[None, float, Schedule] = None,
    free_bits_group: Any = None,
    chunk_size: Optional[int] = None,
    validate: bool = True,
    prior: Optional[KLTerm] = None,
) -> ELBOOutput:
    """Negative ELBO of a categorical decoder from its last hidden states: the output
    projection ``logits = hidden @ weight^T + bias`` fused with
    ``klanneal.elbo_loss(logits, target, mu, logvar, beta, likelihood="categorical")``.

    The same value and gradients as that pair of calls, without the [N, V]
    logits or their gradient ever existing (N = the number of positions):
    the rows are processed ``chunk_size`` at a time through one reused
    buffer, each chunk's projection and gradients by the BLAS torch links,
    its softmax by elbo_loss's categorical kernel. All gradients (hidden,
    weight, bias, mu, logvar) are computed in the forward pass for
    "batchmean" and "sum"; backward scales them by the upstream gradient.
    With reduction="none" the forward pass computes the per-example losses
    only and backward runs the chunked pass again, each row's gradient
    weighted by its example's upstream gradient (a weight gradient summed
    over the examples cannot be re-weighted afterwards): one more pass of
    the projection, in exchange for arbitrary per-example upstream gradients.

    Args:
        hidden: [B, ..., H] decoder states, the input of the output layer;
            float32, float64, float16 or bfloat16 (half types are computed
            in float32, the weight converted once per call).
        weight: [V, H] projection (``nn.Linear.weight`` layout), hidden's dtype.
        target: [B, ...] = hidden.shape[:-1] integer class ids in [0, V) or
            ignore_index (not uint64).
        mu: [B, D] mean of q(z|x).
        logvar: [B, D] log-variance of q(z|x), mu's dtype.
        beta: KL weight: a float, a 0-d tensor (one that requires grad gets its
            gradient) or a klanneal.schedules object evaluated at `step`, as in
            ``klanneal.elbo_loss``.
        step: int or 0-d integer tensor; required with a schedule (beta or
            capacity), not allowed otherwise.
        bias: [V] or None.
        reduction: "batchmean" (sums / B), "sum" or "none" ([B] per example),
            as in ``klanneal.elbo_loss``.
        free_bits: lambda in nats per latent dimension; 0 disables.
        free_bits_mode: "batch" or "sample".
        ignore_index: target value whose positions contribute nothing.
        prior_mu, prior_logvar, prior, capacity, free_bits_group: the KL
            term's options, as in ``klanneal.elbo_loss`` (a learned prior [B, D], the
            capacity objective |KL - C|, batch free bits across processes).
        chunk_size: rows per chunk; None picks one (``default_chunk_size``:
            a chunk buffer of about 24 MiB). Larger is faster up to a point and
            uses chunk_size * V values of extra memory.
        validate: check the class ids (and tensor beta / step values) and
            raise; with validate=False a bad class id gives a NaN loss. A
            bool (numpy bools accepted; anything else is a TypeError).

    Returns:
        ELBOOutput(loss, recon, kl, kl_per_dim, beta), with the fields and
        dtypes of ``klanneal.elbo_loss(..., likelihood="categorical")``: loss
        differentiable w.r.t. hidden, weight, bias, mu and logvar (0-d, or [B]
        for "none"); recon, kl, kl_per_dim, beta detached. Gradients have the
        dtype of their input (fp16/bf16 ones are kept in fp32 until backward).

    Raises:
        TypeError: an argument of the wrong type or dtype (weight or bias not
            in hidden's dtype, a float target, a non-int chunk_size, ...).
        ValueError: mismatched shapes (weight not [V, H], bias not [V], target
            not hidden.shape[:-1], batch sizes of hidden and mu) or devices,
            chunk_size <= 0, a class id outside [0, V), and every ValueError of
            ``klanneal.elbo_loss`` for mu, logvar, beta, step and the options.
        RuntimeError: double backward, or a second backward through the graph.
    """
    _check_linear_args(hidden, weight, bias, target, mu, logvar, chunk_size)
    kl_options: dict[str, Any] = dict(
        step=step, reduction=reduction, free_bits=free_bits, free_bits_mode=free_bits_mode,
        ignore_index=ignore_index, prior_mu=prior_mu, prior_logvar=prior_logvar,
        capacity=capacity, free_bits_group=free_bits_group, validate=validate, prior=prior,
    )  # fmt: skip
    if not _ops.native_available(hidden.device) or _reference_only():
        # No kernel for this device (or a torch.func transform, forward-mode AD): the logits
        # are materialised, elbo_loss takes its reference path.
        return elbo_loss(F.linear(hidden, weight, bias), target, mu, logvar, beta, **kl_options)
    # The KL term: its own call of the fused kernel (no reconstruction
    # elements), which also checks mu, logvar, beta, step and every option.
    batch = hidden.shape[0]
    kl_out = kl_term_call(
        mu, logvar, beta, step, hidden, reduction, free_bits, free_bits_mode, ignore_index,
        prior_mu, prior_logvar, capacity, free_bits_group, validate, prior,
    ).run()  # fmt: skip
    dtype = kl_out.loss.dtype
    grad_enabled = torch.is_grad_enabled()
    opts = LinearOptions(
        batch=batch,
        reduction=reduction,
        ignore_index=ignore_index,
        chunk_size=chunk_size or 0,
        validate=validate,
        need_grad_hidden=grad_enabled and hidden.requires_grad,
        need_grad_weight=grad_enabled and weight.requires_grad,
        need_grad_bias=grad_enabled and bias is not None and bias.requires_grad,
    )
    n_rows, width = target.numel(), hidden.shape[-1]
    recon = _linear_nll(
        hidden.reshape(n_rows, width).contiguous(),
        weight,
        None if bias is None else bias.contiguous(),
        target.reshape(-1).to(torch.int64).contiguous(),
        opts.pack(),
    ).to(dtype)
    return ELBOOutput(
        kl_out.loss + recon, recon.detach(), kl_out.kl, kl_out.kl_per_dim, kl_out.beta
    )
