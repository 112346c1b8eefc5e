"""The fused ELBO op's kernels: the native one per device (allocate -> pointers ->
launch the torch-free C++/CUDA kernel) and the pure-PyTorch reference (the op's
default kernel, its gradients by autograd)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from klanneal import _validate
from klanneal._buffers import _grad_recon_buffer, _latent_grads, _op_scalars
from klanneal._env import native_disabled
from klanneal._layout import (
    DTYPE_CODES,
    ElboOptions,
    InplaceOutputs,
    OpInputs,
    Outputs,
    grad_dtype,
)

try:
    from klanneal import _C
except ImportError:  # pragma: no cover - exercised via KLANNEAL_DISABLE_NATIVE
    _C = None  # type: ignore[assignment]


_HAS_CUDA_KERNEL = _C is not None and hasattr(_C, "elbo_forward_cuda")


def native_available(device: Optional[torch.device]) -> bool:
    """Whether the fused kernel runs on `device` (None: the CPU; else the
    reference is used)."""
    if _C is None or native_disabled():
        return False
    if device is None:
        return True
    kind = device.type
    return kind == "cpu" or (kind == "cuda" and _HAS_CUDA_KERNEL)


def _run_kernel(
    opts: ElboOptions,
    op: OpInputs,
    scalars: tuple[Optional[torch.Tensor], ...],
    grads: Sequence[Optional[torch.Tensor]],
) -> None:
    """Runs recon_input's device's kernel on allocated outputs (both the op and
    the eager path): value checks -> sizes and pointers -> launch.

    op: the op's inputs (contiguous); scalars: loss, recon, kl, kl_per_dim,
    beta_out, kl_weight (kl_weight may be None), all of the loss's dtype
    (float64, or the results' dtype on the CPU: its out_dtype); grads: the
    gradients of recon_input, mu, logvar, prior_mu, prior_logvar (None where
    not asked for). The packed lists go to C++ as they are.
    """
    (recon_input, target, mu, logvar, beta, step, floats, ints, prior_mu, prior_logvar,
     global_mean) = op  # fmt: skip
    loss, recon, kl, kl_per_dim, beta_out, kl_weight = scalars  # only kl_weight may be None
    on_cpu = recon_input.is_cpu
    if opts.validate and (not on_cpu or beta is not None or step is not None):
        # On CPU the kernel checks class ids / bernoulli targets in its own
        # pass over the data and returns the first bad one.
        _validate.check_values(
            recon_input, target, opts.likelihood, opts.ignore_index, beta, step,
            check_target=not on_cpu,
        )  # fmt: skip
    batch, latent_dim = mu.shape
    if opts.likelihood == "categorical":
        row_len = recon_input.shape[-1]
        n_rows = recon_input.numel() // row_len
    else:
        n_rows, row_len = batch, recon_input.numel() // batch
    codes = DTYPE_CODES
    sizes = [
        batch, n_rows, row_len, latent_dim, codes[recon_input.dtype], codes[mu.dtype],
        torch.get_num_threads(), codes[loss.dtype],  # type: ignore[union-attr]
    ]  # fmt: skip
    # In _C.elbo_layout()["ptrs"] order (tests/test_ops_layout.py). data_ptr()
    # is 0 for an empty tensor; the optional ones are None or a tensor.
    g0, g1, g2, g3, g4 = grads
    ptrs = [
        recon_input.data_ptr(), target.data_ptr(), mu.data_ptr(), logvar.data_ptr(),
        0 if prior_mu is None else prior_mu.data_ptr(),
        0 if prior_logvar is None else prior_logvar.data_ptr(),
        0 if global_mean is None else global_mean.data_ptr(),
        0 if beta is None else beta.data_ptr(), 0 if step is None else step.data_ptr(),
        loss.data_ptr(), recon.data_ptr(), kl.data_ptr(),  # type: ignore[union-attr]
        kl_per_dim.data_ptr(), beta_out.data_ptr(),  # type: ignore[union-attr]
        0 if kl_weight is None else kl_weight.data_ptr(),
        0 if g0 is None else g0.data_ptr(), 0 if g1 is None else g1.data_ptr(),
        0 if g2 is None else g2.data_ptr(), 0 if g3 is None else g3.data_ptr(),
        0 if g4 is None else g4.data_ptr(),
    ]  # fmt: skip
    if on_cpu:
        bad = _C.elbo_forward_cpu(sizes, ptrs, floats, ints)
        if bad >= 0:
            _validate.raise_invalid_target(
                recon_input, target, opts.likelihood, opts.ignore_index, bad
            )
    elif recon_input.is_cuda and _HAS_CUDA_KERNEL:
        device = recon_input.device
        workspace_bytes = _C.elbo_cuda_workspace_bytes(sizes, ptrs, floats, ints)
        workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        stream = torch.cuda.current_stream(device).cuda_stream
        _C.elbo_forward_cuda(
            sizes, ptrs, floats, ints, workspace.data_ptr(), workspace_bytes, stream
        )
    else:
        raise RuntimeError(f"klanneal: no native ELBO kernel for device {recon_input.device}")


def _launch(
    i: OpInputs, grad_recon: Optional[torch.Tensor]
) -> tuple[tuple[torch.Tensor, ...], tuple[Optional[torch.Tensor], ...]]:
    """The op's device kernel: allocates the float64 scalars and the latent
    gradients asked for, and runs the kernel (grad_recon: the caller's buffer,
    or None). Returns the 6 scalars (loss, recon, kl, kl_per_dim, beta,
    kl_weight) and the 5 gradients (recon_input, mu, logvar, prior_mu,
    prior_logvar; None where not asked for)."""
    args = ElboOptions.unpack(i.floats, i.ints)
    scalars = _op_scalars(i.mu, args.options.reduction, i.recon_input.device)
    grads = (grad_recon, *_latent_grads(i.mu, args.need_grads))
    _run_kernel(args.options, i, scalars, grads)
    return scalars, grads


def _outputs(
    scalars: tuple[torch.Tensor, ...], grads: tuple[Optional[torch.Tensor], ...]
) -> Outputs:
    """The op's Outputs from the 6 scalars (loss, recon, kl, kl_per_dim, beta,
    kl_weight) and the 5 gradients (None: not asked for, an empty tensor)."""
    loss, recon, kl, kl_per_dim, beta, kl_weight = scalars
    g_recon, g_mu, g_logvar, g_prior_mu, g_prior_logvar = (
        loss.new_empty(0, dtype=torch.float32) if g is None else g for g in grads
    )
    return Outputs(
        loss, recon, kl, kl_per_dim, beta, g_recon, g_mu, g_logvar, kl_weight, g_prior_mu,
        g_prior_logvar,
    )  # fmt: skip


def _inplace_outputs(
    scalars: tuple[torch.Tensor, ...], grads: tuple[Optional[torch.Tensor], ...]
) -> InplaceOutputs:
    """The inplace op's outputs: _outputs without grad_recon (written over recon_input)."""
    full = _outputs(scalars, grads)
    return InplaceOutputs(*(getattr(full, name) for name in InplaceOutputs._fields))


def _native_kernel(*args: Any, **kwargs: Any) -> Outputs:
    i = OpInputs(*args, **kwargs)
    need_recon = ElboOptions.unpack(i.floats, i.ints).need_grads[0]
    grad_recon = _grad_recon_buffer(i.recon_input) if need_recon else None
    return _outputs(*_launch(i, grad_recon))


def _native_inplace_kernel(*args: Any, **kwargs: Any) -> InplaceOutputs:
    i = OpInputs(*args, **kwargs)
    return _inplace_outputs(*_launch(i, i.recon_input))


def _reference_outputs(i: OpInputs) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The 6 scalars and 5 gradients of the op from the pure-PyTorch reference and autograd."""
    from klanneal.reference import reference_loss
    from klanneal.schedules import schedule_value_ref

    args = ElboOptions.unpack(i.floats, i.ints)
    opts = args.options
    mu = i.mu
    f64 = torch.float64
    if i.beta is not None:
        beta_value: Any = i.beta.detach().to(f64)
    elif i.step is not None:
        beta_value = schedule_value_ref(list(args.schedule), int(i.step))
    else:
        beta_value = args.beta_value
    capacity = None
    if args.capacity is not None:
        capacity = schedule_value_ref(list(args.capacity), 0 if i.step is None else int(i.step))
    need = args.need_grads
    with torch.enable_grad():
        # beta as a leaf: d loss / d beta is the op's kl_weight output.
        beta_leaf = torch.as_tensor(beta_value, dtype=f64, device=mu.device).reshape(())
        beta_leaf = beta_leaf.detach().requires_grad_()
        tensors = (i.recon_input, mu, i.logvar, i.prior_mu, i.prior_logvar)
        leaves = [
            None if t is None else t.detach().requires_grad_(n) for t, n in zip(tensors, need)
        ]
        x, mu_leaf, logvar_leaf = (t for t in leaves[:3] if t is not None)
        given = i.global_kl_per_dim
        out = reference_loss(
            x, i.target, mu_leaf, logvar_leaf, beta_leaf, step=None,
            likelihood=opts.likelihood, reduction=opts.reduction, free_bits=opts.free_bits,
            free_bits_mode=opts.free_bits_mode, ignore_index=opts.ignore_index,
            gaussian_var=opts.gaussian_var, prior_mu=leaves[3], prior_logvar=leaves[4],
            capacity=capacity, global_mean=None if given is None else lambda _: given,
        )  # fmt: skip
        wanted = [t for t, n in zip(leaves, need) if n and t is not None]
        # Examples are independent under "none" (batch free bits is refused
        # there): the gradient of the sum is each example's own gradient.
        kl_weight = _kl_weight(out.loss, beta_leaf, opts.reduction)
        grads = list(torch.autograd.grad(out.loss.sum(), wanted)) if wanted else []
    full = []
    for t, n in zip(leaves, need):
        dtype = grad_dtype(mu.dtype if t is None else t.dtype)
        g = grads.pop(0).to(dtype) if n and t is not None else mu.new_empty(0, dtype=dtype)
        full.append(g.contiguous())
    scalars = (
        out.loss.detach().to(f64), out.recon.to(f64), out.kl.to(f64), out.kl_per_dim.to(f64),
        beta_leaf.detach().clone(), kl_weight,
    )  # fmt: skip
    return scalars, tuple(full)


def _kl_weight(loss: torch.Tensor, beta_leaf: torch.Tensor, reduction: str) -> torch.Tensor:
    """d loss / d beta per loss element (float64), by autograd."""
    if reduction != "none":
        (g,) = torch.autograd.grad(loss, beta_leaf, allow_unused=True, retain_graph=True)
        zero = torch.zeros((), dtype=torch.float64, device=loss.device)
        return (zero if g is None else g.detach()).to(torch.float64)
    # Per example: loss_b = recon_b + beta * term_b, so term_b = d loss_b / d beta.
    rows = [
        torch.autograd.grad(loss[b], beta_leaf, allow_unused=True, retain_graph=True)[0]
        for b in range(loss.shape[0])
    ]
    zero = torch.zeros((), dtype=torch.float64, device=loss.device)
    return torch.stack([zero if g is None else g.detach().to(torch.float64) for g in rows])


def _reference_kernel(*args: Any, **kwargs: Any) -> Outputs:
    """The op on any device, from the pure-PyTorch reference and autograd.

    The default kernel: devices without a native one (and builds without
    _C) get the same outputs, the gradients taken with torch.autograd.grad.
    """
    return _outputs(*_reference_outputs(OpInputs(*args, **kwargs)))


def _reference_inplace_kernel(*args: Any, **kwargs: Any) -> InplaceOutputs:
    i = OpInputs(*args, **kwargs)
    scalars, grads = _reference_outputs(i)
    i.recon_input.copy_(grads[0].to(i.recon_input.dtype))
    return _inplace_outputs(scalars, grads)


def _kernels(device: torch.device) -> tuple[Any, Any]:
    if native_available(device):
        return _native_kernel, _native_inplace_kernel
    return _reference_kernel, _reference_inplace_kernel
