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
FULL_PRECISION = (torch.float32, torch.float64)


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the gradients the forward pass computes for inputs of `dtype`.

    fp16/bf16 gradients are kept in fp32 until backward has applied the
    upstream gradient (the loss scale of a GradScaler): stored in half
    precision first, values below 6e-8 would flush to 0 and values above
    65504 overflow, whatever the scale (ElboParams in csrc/include/klanneal/elbo.h).
    """
    return dtype if dtype in FULL_PRECISION else torch.float32


def result_dtype(recon_dtype: torch.dtype, latent_dtype: torch.dtype) -> torch.dtype:
    """dtype of loss, recon, kl, kl_per_dim and beta: at least float32.

    Like torch autocast for losses: a half-precision loss would overflow
    (fp16 with reduction="sum") although it is accumulated in fp32/fp64.
    """
    dtype = torch.promote_types(recon_dtype, latent_dtype)
    return dtype if dtype in FULL_PRECISION else torch.float32


# A recon_input gradient of at least this many bytes comes from klanneal's
# buffer pool on the CPU (csrc/include/klanneal/buffer_pool.h) instead of a
# fresh torch.empty: glibc maps a buffer this large anew on every call and the
# kernel zeroes each page on first touch, ~half the op's time in the text
# benchmark. KLANNEAL_GRAD_POOL=0 switches the pool off.
POOL_MIN_BYTES = 1 << 20
# ScheduleParams of a constant schedule; unused unless a step tensor is passed.
NO_SCHEDULE = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]

# The ops' scalar options travel in two lists, `floats` and `ints`, laid out
# as below (see pack_options). One schema argument each would be clearer, but
# torch's custom-op layer pays per call for every argument squared
# (torch._library.utils.fill_defaults rebuilds the schema's argument list for
# each argument): ~70 us per call with 18 arguments, ~10 us with 8, against a
# kernel of ~100 us for a 128 x 784 bernoulli batch.
FLOAT_OPTIONS = ("beta_value", "free_bits", "gaussian_var")  # then the 8 schedule floats
INT_OPTIONS = (
    "likelihood", "reduction", "free_bits_mode", "ignore_index", "validate",
    "need_grad_recon", "need_grad_mu", "need_grad_logvar",
)  # fmt: skip
LIKELIHOODS = tuple(LIKELIHOOD_CODES)
REDUCTIONS = tuple(REDUCTION_CODES)
FREE_BITS_MODES = tuple(FREE_BITS_MODE_CODES)


def pack_options(
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
) -> tuple[list[float], list[int]]:
    """The `floats` and `ints` arguments of the ops (need_grad_recon: ignored inplace)."""
    floats = [float(beta_value), float(free_bits), float(gaussian_var)]
    floats += [float(v) for v in schedule]
    ints = [
        LIKELIHOOD_CODES[likelihood], REDUCTION_CODES[reduction],
        FREE_BITS_MODE_CODES[free_bits_mode], int(ignore_index), int(validate),
        int(need_grad_recon), int(need_grad_mu), int(need_grad_logvar),
    ]  # fmt: skip
    return floats, ints


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


def _pool_enabled() -> bool:
    return _C is not None and os.environ.get("KLANNEAL_GRAD_POOL", "1") not in ("0", "")


def _grad_recon_buffer(recon_input: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor of recon_input's shape for its gradient
    (dtype: grad_dtype(recon_input.dtype)).

    Large CPU buffers come from the pool: the tensor's deleter gives the
    buffer back for the next step's call instead of unmapping it.
    """
    dtype = grad_dtype(recon_input.dtype)
    nbytes = recon_input.numel() * dtype.itemsize
    if recon_input.device.type == "cpu" and nbytes >= POOL_MIN_BYTES and _pool_enabled():
        capsule = _C.pooled_empty(list(recon_input.shape), DTYPE_CODES[dtype])
        return torch.from_dlpack(capsule)
    return torch.empty(recon_input.shape, dtype=dtype, device=recon_input.device)


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


def _shapes(mu: torch.Tensor, ints: list[int]) -> tuple[int, ...]:
    return (mu.shape[0],) if ints[1] == REDUCTION_CODES["none"] else ()


def _latent_grads(mu: torch.Tensor, logvar: torch.Tensor, ints: list[int]) -> tuple:
    """Uninitialised grad_mu, grad_logvar (in grad_dtype), or empty ones when not asked for."""
    dtype = grad_dtype(mu.dtype)
    return (
        mu.new_empty(mu.shape if ints[6] else (0,), dtype=dtype),
        logvar.new_empty(logvar.shape if ints[7] else (0,), dtype=dtype),
    )


def _launch(
    recon_input: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: Optional[torch.Tensor],
    step: Optional[torch.Tensor],
    floats: list[float],
    ints: list[int],
    grad_recon: Optional[torch.Tensor],
) -> Outputs:
    """Allocates the outputs and runs the kernel of recon_input's device."""
    likelihood_code, reduction_code, free_bits_mode_code, ignore_index, validate = ints[:5]
    likelihood = LIKELIHOODS[likelihood_code]
    device = recon_input.device
    on_cpu = device.type == "cpu"
    # On CPU the kernel checks class ids / bernoulli targets in its own pass
    # over the data and reports the first bad one in first_invalid_target.
    first_invalid_target = None
    if validate:
        _validate.check_values(
            recon_input, target, likelihood, ignore_index, beta, step, check_target=not on_cpu
        )
        if on_cpu and likelihood in ("categorical", "bernoulli"):
            first_invalid_target = torch.empty(1, dtype=torch.int64)
    batch, latent_dim = mu.shape
    f64 = {"dtype": torch.float64, "device": device}
    loss = torch.empty(_shapes(mu, ints), **f64)
    recon = torch.empty_like(loss)
    kl = torch.empty_like(loss)
    kl_per_dim = torch.empty(latent_dim, **f64)
    beta_out = torch.empty((), **f64)
    grad_mu, grad_logvar = _latent_grads(mu, logvar, ints)
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
        "likelihood": likelihood_code,
        "reduction": reduction_code,
        "free_bits_mode": free_bits_mode_code,
        "recon_dtype": DTYPE_CODES[recon_input.dtype],
        "latent_dtype": DTYPE_CODES[mu.dtype],
        "free_bits": floats[1],
        "gaussian_var": floats[2],
        "ignore_index": ignore_index,
        "beta_ptr": ptr(beta),
        "step_ptr": ptr(step),
        "schedule": floats[3:],
        "beta_value": floats[0],
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
        "first_invalid_target": ptr(first_invalid_target),
    }
    if on_cpu:
        _C.elbo_forward_cpu(params)
        if first_invalid_target is not None:
            bad = int(first_invalid_target)
            if bad >= 0:
                _validate.raise_invalid_target(recon_input, target, likelihood, ignore_index, bad)
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
    floats: list[float],
    ints: list[int],
) -> Outputs:
    """Fused ELBO forward; see klanneal.elbo_loss. Inputs must be contiguous.

    floats, ints: the scalar options, from pack_options.
    """
    grad_recon = _grad_recon_buffer(recon_input) if ints[5] else None
    return _launch(recon_input, target, mu, logvar, beta, step, floats, ints, grad_recon)


@torch.library.custom_op("klanneal::elbo_loss_inplace", mutates_args=("recon_input",))
def elbo_loss_inplace_op(
    recon_input: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: Optional[torch.Tensor],
    step: Optional[torch.Tensor],
    floats: list[float],
    ints: list[int],
) -> InplaceOutputs:
    """As elbo_loss, but overwrites recon_input with d loss / d recon_input."""
    outs = _launch(recon_input, target, mu, logvar, beta, step, floats, ints, recon_input)
    return outs[:5] + outs[6:]


def _fake_scalars(
    recon_input: torch.Tensor, mu: torch.Tensor, ints: list[int]
) -> tuple[torch.Tensor, ...]:
    f64 = {"dtype": torch.float64, "device": recon_input.device}
    shape = _shapes(mu, ints)
    return (
        torch.empty(shape, **f64),
        torch.empty(shape, **f64),
        torch.empty(shape, **f64),
        torch.empty(mu.shape[1], **f64),
        torch.empty((), **f64),
    )


@elbo_loss_op.register_fake
def _elbo_loss_fake(recon_input, target, mu, logvar, beta, step, floats, ints):
    dtype = grad_dtype(recon_input.dtype)
    grad_recon = recon_input.new_empty(recon_input.shape if ints[5] else (0,), dtype=dtype)
    return _fake_scalars(recon_input, mu, ints) + (grad_recon,) + _latent_grads(mu, logvar, ints)


@elbo_loss_inplace_op.register_fake
def _elbo_loss_inplace_fake(recon_input, target, mu, logvar, beta, step, floats, ints):
    return _fake_scalars(recon_input, mu, ints) + _latent_grads(mu, logvar, ints)


# ---- autograd -----------------------------------------------------------------

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
    return grad_output.device.type == "cpu" and bool((grad_output == 1).all())


def _backward_common(ctx, grad_loss) -> list:
    """Gradients of recon_input, mu, logvar: the saved ones times grad_loss.

    Eager, the saved gradients are scaled in place (no second logits-sized
    buffer), after which they cannot serve another backward; when grad_loss
    is exactly 1 on CPU they are returned untouched. Under tracing
    (torch.compile, opcheck) the product is out of place.
    """
    if ctx.scaled_in_place:
        raise RuntimeError(_SECOND_BACKWARD)
    if grad_loss is None:  # only non-differentiable outputs reached this node
        return [None, None, None, None]
    eager = type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling()
    if eager and torch.is_grad_enabled():
        # Backward runs in grad mode only under create_graph=True: the result
        # would be a gradient without a graph, silently wrong for whatever
        # differentiates it again.
        raise RuntimeError(_DOUBLE_BACKWARD)
    saved = ctx.saved_tensors
    skip = eager and _is_one(grad_loss)
    grads = []
    for grad, asked in zip(saved, ctx.asked):
        if not asked:
            grads.append(None)
        elif skip:
            grads.append(grad)
        elif ctx.reduction == "none":
            # grad_loss is [B]: it scales each example's slice.
            factor = grad_loss.reshape(-1, 1)
            if eager:
                grad.view(factor.shape[0], -1).mul_(factor)
                grads.append(grad)
            else:
                grads.append(
                    (grad.view(factor.shape[0], -1) * factor).to(grad.dtype).view(grad.shape)
                )
        elif eager:
            grads.append(grad.mul_(grad_loss))
        else:
            grads.append((grad * grad_loss).to(grad.dtype))
    if eager and not skip:
        ctx.scaled_in_place = True
    # fp16/bf16 inputs: the gradients were kept in fp32 up to here.
    dtypes = (ctx.recon_dtype, ctx.latent_dtype, ctx.latent_dtype)
    grads = [g if g is None or g.dtype == d else g.to(d) for g, d in zip(grads, dtypes)]
    # A gaussian/mse target that requires grad: d loss / d target = -d loss / d recon_input.
    grad_target = None
    if ctx.grad_target and grads[0] is not None:
        if ctx.grad_recon_input:
            grad_target = -grads[0]
        else:
            grad_target, grads[0] = grads[0].neg_() if eager else -grads[0], None
    return [grads[0], grad_target, grads[1], grads[2]]


def _save_input_info(ctx, recon_input, target, mu, ints) -> None:
    ctx.recon_dtype, ctx.latent_dtype = recon_input.dtype, mu.dtype
    # Which of grad_recon, grad_mu, grad_logvar the forward pass computed (a
    # gradient asked for may still be empty: a [B, 0, V] input).
    ctx.asked = (bool(ints[5]), bool(ints[6]), bool(ints[7]))
    ctx.grad_recon_input = recon_input.requires_grad
    ctx.grad_target = target.requires_grad and target.dtype.is_floating_point


def _setup_context(ctx, inputs, output) -> None:
    # Without this autograd would materialise a zero tensor for the unused
    # gradient of every other output, a logits-sized one for grad_recon.
    ctx.set_materialize_grads(False)
    ctx.reduction = REDUCTIONS[inputs[7][1]]
    ctx.scaled_in_place = False
    _save_input_info(ctx, inputs[0], inputs[1], inputs[2], inputs[7])
    ctx.save_for_backward(*output[5:])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *unused):
    grad_recon, grad_target, grad_mu, grad_logvar = _backward_common(ctx, grad_loss)
    return (grad_recon, grad_target, grad_mu, grad_logvar) + (None,) * 4


elbo_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _ElboInplace(torch.autograd.Function):
    """Autograd of elbo_loss_inplace: the logits buffer becomes its own gradient.

    recon_input is not marked dirty: its autograd history stays that of the
    decoder output it is, so that views (logits.view(B, T, V)) work too (a
    Function that marks a view dirty may return only one tensor). The custom
    op declares the mutation, which bumps recon_input's version counter: a
    node that saved the logits for its own backward reports the overwrite.
    """

    @staticmethod
    def forward(ctx, recon_input, target, mu, logvar, beta, step, floats, ints):
        outs = elbo_loss_inplace_op(recon_input, target, mu, logvar, beta, step, floats, ints)
        ctx.set_materialize_grads(False)  # see _setup_context
        ctx.reduction = REDUCTIONS[ints[1]]
        ctx.scaled_in_place = False
        _save_input_info(ctx, recon_input, target, mu, ints)
        ctx.save_for_backward(recon_input, outs[5], outs[6])
        ctx.mark_non_differentiable(*outs[1:5])
        return outs[:5]

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grad_recon, grad_target, grad_mu, grad_logvar = _backward_common(ctx, grad_loss)
        return (grad_recon, grad_target, grad_mu, grad_logvar) + (None,) * 4


def elbo_loss_inplace(*args) -> tuple[torch.Tensor, ...]:
    """elbo_loss_inplace_op with autograd: loss, recon, kl, kl_per_dim, beta."""
    return _ElboInplace.apply(*args)
