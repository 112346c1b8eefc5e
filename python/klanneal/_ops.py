"""The fused ELBO op as torch.library custom ops.

``klanneal::elbo_loss`` is functional: it returns loss, recon, kl,
kl_per_dim, beta (float64, cast by the caller) and the gradients of the loss
w.r.t. recon_input, mu and logvar, computed in the same pass (empty tensors
for the ones not asked for). Its backward only scales those gradients by
grad_output. ``klanneal::elbo_loss_inplace`` is the same op writing the
recon_input gradient into recon_input itself; custom ops with an autograd
formula must be functional, so its autograd lives in ``_ElboInplace``, an
autograd.Function around it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from klanneal import _validate

try:
    from klanneal import _C
except ImportError:  # pragma: no cover - exercised via KLANNEAL_DISABLE_NATIVE
    _C = None

LIKELIHOOD_CODES = {"categorical": 0, "bernoulli": 1, "gaussian": 2, "mse": 3}
REDUCTION_CODES = {"batchmean": 0, "sum": 1, "none": 2}
FREE_BITS_MODE_CODES = {"batch": 0, "sample": 1}
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
# ScheduleParams of a constant schedule; unused unless a step tensor is passed.
NO_SCHEDULE = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]

Outputs = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
]  # fmt: skip
InplaceOutputs = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor, torch.Tensor,
]  # fmt: skip


def native_available(device: torch.device) -> bool:
    """Whether the fused kernel runs on `device` (else the reference is used)."""
    if _C is None or os.environ.get("KLANNEAL_DISABLE_NATIVE", "0") not in ("", "0"):
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and hasattr(_C, "elbo_forward_cuda")


def _shapes(recon_input: torch.Tensor, mu: torch.Tensor, reduction: str) -> tuple[int, ...]:
    return (mu.shape[0],) if reduction == "none" else ()


def _launch(
    recon_input: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: Optional[torch.Tensor],
    step: Optional[torch.Tensor],
    schedule: list[float],
    beta_value: float,
    likelihood: str,
    reduction: str,
    free_bits: float,
    free_bits_mode: str,
    ignore_index: int,
    gaussian_var: float,
    validate: bool,
    grad_recon: Optional[torch.Tensor],
    need_grad_mu: bool,
    need_grad_logvar: bool,
) -> Outputs:
    """Allocates the outputs and runs the kernel of recon_input's device."""
    if validate:
        _validate.check_values(recon_input, target, likelihood, ignore_index, beta, step)
    device = recon_input.device
    batch, latent_dim = mu.shape
    f64 = {"dtype": torch.float64, "device": device}
    loss = torch.empty(_shapes(recon_input, mu, reduction), **f64)
    recon = torch.empty_like(loss)
    kl = torch.empty_like(loss)
    kl_per_dim = torch.empty(latent_dim, **f64)
    beta_out = torch.empty((), **f64)
    grad_mu = torch.empty_like(mu) if need_grad_mu else mu.new_empty(0)
    grad_logvar = torch.empty_like(logvar) if need_grad_logvar else logvar.new_empty(0)
    if likelihood == "categorical":
        row_len = recon_input.shape[-1]
        n_rows = recon_input.numel() // row_len
    else:
        n_rows = batch
        row_len = recon_input.numel() // batch

    def ptr(t: Optional[torch.Tensor]) -> int:
        return 0 if t is None or t.numel() == 0 else t.data_ptr()

    params = {
        "batch": batch,
        "n_rows": n_rows,
        "row_len": row_len,
        "latent_dim": latent_dim,
        "likelihood": LIKELIHOOD_CODES[likelihood],
        "reduction": REDUCTION_CODES[reduction],
        "free_bits_mode": FREE_BITS_MODE_CODES[free_bits_mode],
        "recon_dtype": DTYPE_CODES[recon_input.dtype],
        "latent_dtype": DTYPE_CODES[mu.dtype],
        "free_bits": free_bits,
        "gaussian_var": gaussian_var,
        "ignore_index": ignore_index,
        "beta_ptr": ptr(beta),
        "step_ptr": ptr(step),
        "schedule": list(schedule),
        "beta_value": beta_value,
        "recon_input": ptr(recon_input),
        "target": ptr(target),
        "mu": ptr(mu),
        "logvar": ptr(logvar),
        "loss": ptr(loss),
        "recon": ptr(recon),
        "kl": ptr(kl),
        "kl_per_dim": ptr(kl_per_dim),
        "beta_out": ptr(beta_out),
        "grad_recon": ptr(grad_recon),
        "grad_mu": ptr(grad_mu),
        "grad_logvar": ptr(grad_logvar),
        "n_threads": torch.get_num_threads(),
    }
    if device.type == "cpu":
        _C.elbo_forward_cpu(params)
    elif device.type == "cuda" and hasattr(_C, "elbo_forward_cuda"):
        workspace_bytes = _C.elbo_cuda_workspace_bytes(params)
        workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        stream = torch.cuda.current_stream(device).cuda_stream
        _C.elbo_forward_cuda(params, workspace.data_ptr(), workspace_bytes, stream)
    else:
        raise RuntimeError(f"klanneal: no native ELBO kernel for device {device}")
    empty = recon_input.new_empty(0)
    return (
        loss,
        recon,
        kl,
        kl_per_dim,
        beta_out,
        grad_recon if grad_recon is not None else empty,
        grad_mu,
        grad_logvar,
    )


@torch.library.custom_op("klanneal::elbo_loss", mutates_args=())
def elbo_loss_op(
    recon_input: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: Optional[torch.Tensor],
    step: Optional[torch.Tensor],
    schedule: list[float],
    beta_value: float,
    likelihood: str,
    reduction: str,
    free_bits: float,
    free_bits_mode: str,
    ignore_index: int,
    gaussian_var: float,
    validate: bool,
    need_grad_recon: bool,
    need_grad_mu: bool,
    need_grad_logvar: bool,
) -> Outputs:
    """Fused ELBO forward; see klanneal.elbo_loss. Inputs must be contiguous."""
    grad_recon = torch.empty_like(recon_input) if need_grad_recon else None
    return _launch(
        recon_input, target, mu, logvar, beta, step, schedule, beta_value, likelihood,
        reduction, free_bits, free_bits_mode, ignore_index, gaussian_var, validate,
        grad_recon, need_grad_mu, need_grad_logvar,
    )  # fmt: skip


@torch.library.custom_op("klanneal::elbo_loss_inplace", mutates_args=("recon_input",))
def elbo_loss_inplace_op(
    recon_input: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: Optional[torch.Tensor],
    step: Optional[torch.Tensor],
    schedule: list[float],
    beta_value: float,
    likelihood: str,
    reduction: str,
    free_bits: float,
    free_bits_mode: str,
    ignore_index: int,
    gaussian_var: float,
    validate: bool,
    need_grad_mu: bool,
    need_grad_logvar: bool,
) -> InplaceOutputs:
    """As elbo_loss, but overwrites recon_input with d loss / d recon_input."""
    outs = _launch(
        recon_input, target, mu, logvar, beta, step, schedule, beta_value, likelihood,
        reduction, free_bits, free_bits_mode, ignore_index, gaussian_var, validate,
        recon_input, need_grad_mu, need_grad_logvar,
    )  # fmt: skip
    return outs[:5] + outs[6:]


def _fake_scalars(
    recon_input: torch.Tensor, mu: torch.Tensor, reduction: str
) -> tuple[torch.Tensor, ...]:
    f64 = {"dtype": torch.float64, "device": recon_input.device}
    shape = _shapes(recon_input, mu, reduction)
    return (
        torch.empty(shape, **f64),
        torch.empty(shape, **f64),
        torch.empty(shape, **f64),
        torch.empty(mu.shape[1], **f64),
        torch.empty((), **f64),
    )


@elbo_loss_op.register_fake
def _elbo_loss_fake(
    recon_input, target, mu, logvar, beta, step, schedule, beta_value, likelihood, reduction,
    free_bits, free_bits_mode, ignore_index, gaussian_var, validate,
    need_grad_recon, need_grad_mu, need_grad_logvar,
):  # fmt: skip
    return _fake_scalars(recon_input, mu, reduction) + (
        torch.empty_like(recon_input) if need_grad_recon else recon_input.new_empty(0),
        torch.empty_like(mu) if need_grad_mu else mu.new_empty(0),
        torch.empty_like(logvar) if need_grad_logvar else logvar.new_empty(0),
    )


@elbo_loss_inplace_op.register_fake
def _elbo_loss_inplace_fake(
    recon_input, target, mu, logvar, beta, step, schedule, beta_value, likelihood, reduction,
    free_bits, free_bits_mode, ignore_index, gaussian_var, validate,
    need_grad_mu, need_grad_logvar,
):  # fmt: skip
    return _fake_scalars(recon_input, mu, reduction) + (
        torch.empty_like(mu) if need_grad_mu else mu.new_empty(0),
        torch.empty_like(logvar) if need_grad_logvar else logvar.new_empty(0),
    )


# ---- autograd -----------------------------------------------------------------

_SECOND_BACKWARD = (
    "klanneal.elbo_loss: backward through the same graph twice (retain_graph=True) is not "
    "supported: the gradients saved by the forward pass are scaled in place by the first "
    "backward. Recompute the loss for a second backward."
)


def _scale(
    saved: torch.Tensor, grad_output: torch.Tensor, reduction: str
) -> Optional[torch.Tensor]:
    """saved * grad_output, in place when eager (no second logits-sized buffer).

    For reduction "none", grad_output is [B] and scales each example's slice.
    """
    if saved.numel() == 0:
        return None  # that gradient was not asked for
    eager = type(saved) is torch.Tensor and not torch.compiler.is_compiling()
    if reduction == "none":
        view = saved.view(grad_output.shape[0], -1)
        factor = grad_output.reshape(-1, 1)
        if eager:
            view.mul_(factor)
            return saved
        return (view * factor).to(saved.dtype).view(saved.shape)
    if eager:
        # Skip the pass over the gradient when grad_output is exactly 1 (the
        # common loss.backward()); only on CPU, where .item() costs no sync.
        if saved.device.type == "cpu" and grad_output.device.type == "cpu":
            if grad_output.item() == 1.0:
                return saved
        return saved.mul_(grad_output)
    return (saved * grad_output).to(saved.dtype)


def _setup_context(ctx, inputs, output) -> None:
    ctx.reduction = inputs[9]
    ctx.backward_done = False
    ctx.save_for_backward(*output[5:])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *unused):
    if ctx.backward_done:
        raise RuntimeError(_SECOND_BACKWARD)
    ctx.backward_done = True
    grad_recon, grad_mu, grad_logvar = ctx.saved_tensors
    return (
        _scale(grad_recon, grad_loss, ctx.reduction),
        None,
        _scale(grad_mu, grad_loss, ctx.reduction),
        _scale(grad_logvar, grad_loss, ctx.reduction),
    ) + (None,) * 14


elbo_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _ElboInplace(torch.autograd.Function):
    """Autograd of elbo_loss_inplace: the logits buffer becomes its own gradient."""

    @staticmethod
    def forward(ctx, recon_input, target, mu, logvar, beta, step, *options):
        # options: schedule, beta_value, likelihood, reduction, free_bits,
        # free_bits_mode, ignore_index, gaussian_var, validate, need_grad_mu,
        # need_grad_logvar
        outs = elbo_loss_inplace_op(recon_input, target, mu, logvar, beta, step, *options)
        ctx.mark_dirty(recon_input)
        ctx.reduction = options[3]
        ctx.backward_done = False
        ctx.save_for_backward(recon_input, outs[5], outs[6])
        ctx.mark_non_differentiable(*outs[1:])
        return (*outs, recon_input)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if ctx.backward_done:
            raise RuntimeError(_SECOND_BACKWARD)
        ctx.backward_done = True
        grad_recon, grad_mu, grad_logvar = ctx.saved_tensors
        return (
            _scale(grad_recon, grad_loss, ctx.reduction),
            None,
            _scale(grad_mu, grad_loss, ctx.reduction),
            _scale(grad_logvar, grad_loss, ctx.reduction),
        ) + (None,) * 13


def elbo_loss_inplace(*args) -> InplaceOutputs:
    """Runs elbo_loss_inplace_op with autograd (same arguments, no need_grad_recon)."""
    return _ElboInplace.apply(*args)[:7]
