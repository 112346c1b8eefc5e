"""``klanneal::linear_nll``: the chunked output projection + categorical kernel of
``klanneal.linear_elbo_loss`` (options, native and reference kernels,
registration, autograd). See linear.py's docstring for the algorithm."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F

from klanneal import _ops, _validate
from klanneal._autograd import check_backward, check_eager, scale_saved

try:
    from klanneal import _C
except ImportError:  # pragma: no cover - exercised via KLANNEAL_DISABLE_NATIVE
    _C = None  # type: ignore[assignment]


# chunk_size=None: rows per chunk such that the chunk's logits take about
# this many bytes. Each chunk reads the weight twice and its gradient once
# (BLAS); fewer, larger chunks are faster, smaller ones need less memory.
# 24 MiB keeps the chunk buffer under a tenth of the logits at N >= 2048 rows
# (GPT-2's V = 50257: 120 rows) and was the fastest size within that budget
# measured on a 2-core AVX2 CPU (benchmarks/bench_linear.py).
CHUNK_BYTES = 24 << 20
MIN_CHUNK_ROWS = 16


def default_chunk_size(n_rows: int, vocab: int, hidden_dim: int, dtype: torch.dtype) -> int:
    """Rows per chunk that ``chunk_size=None`` picks for [n_rows, hidden_dim] inputs.

    The chunk's logits (computed in ``dtype``, float32 for fp16/bf16) take
    about ``CHUNK_BYTES``; rounded down to a multiple of 8 rows, at least
    ``MIN_CHUNK_ROWS`` (BLAS is far from its peak on fewer rows) and at most
    ``n_rows``. hidden_dim does not change the buffer's size; it is part of
    the signature so that a finer model of the GEMMs' cost can use it.
    """
    del hidden_dim
    itemsize = _ops.grad_dtype(dtype).itemsize
    rows = CHUNK_BYTES // max(1, vocab * itemsize)
    rows = max(MIN_CHUNK_ROWS, rows - rows % 8)
    return max(1, min(rows, n_rows))


# ---- options ---------------------------------------------------------------------

_INTS = (
    "batch", "reduction", "ignore_index", "chunk_size", "validate",
    "need_grad_hidden", "need_grad_weight", "need_grad_bias",
)  # fmt: skip
_SLOT = {name: i for i, name in enumerate(_INTS)}


@dataclasses.dataclass(frozen=True)
class LinearOptions:
    """The integer options of one klanneal::linear_nll call, packed by name.

    ``pack`` writes the op's ``ints`` list and ``unpack`` reads it back:
    nothing else knows the slot order. chunk_size 0 means "pick one"
    (default_chunk_size).
    """

    batch: int
    reduction: str = "batchmean"
    ignore_index: int = -100
    chunk_size: int = 0
    validate: bool = True
    need_grad_hidden: bool = False
    need_grad_weight: bool = False
    need_grad_bias: bool = False

    def pack(self) -> list[int]:
        ints = [0] * len(_INTS)
        ints[_SLOT["batch"]] = int(self.batch)
        ints[_SLOT["reduction"]] = _ops.REDUCTIONS.index(self.reduction)
        ints[_SLOT["ignore_index"]] = int(self.ignore_index)
        ints[_SLOT["chunk_size"]] = int(self.chunk_size)
        ints[_SLOT["validate"]] = int(self.validate)
        ints[_SLOT["need_grad_hidden"]] = int(self.need_grad_hidden)
        ints[_SLOT["need_grad_weight"]] = int(self.need_grad_weight)
        ints[_SLOT["need_grad_bias"]] = int(self.need_grad_bias)
        return ints

    @staticmethod
    def unpack(ints: list[int]) -> LinearOptions:
        return LinearOptions(
            batch=ints[_SLOT["batch"]],
            reduction=_ops.REDUCTIONS[ints[_SLOT["reduction"]]],
            ignore_index=ints[_SLOT["ignore_index"]],
            chunk_size=ints[_SLOT["chunk_size"]],
            validate=bool(ints[_SLOT["validate"]]),
            need_grad_hidden=bool(ints[_SLOT["need_grad_hidden"]]),
            need_grad_weight=bool(ints[_SLOT["need_grad_weight"]]),
            need_grad_bias=bool(ints[_SLOT["need_grad_bias"]]),
        )

    @property
    def need_grads(self) -> tuple[bool, bool, bool]:
        """Gradients asked for: hidden, weight, bias."""
        return self.need_grad_hidden, self.need_grad_weight, self.need_grad_bias

    @property
    def op_grads(self) -> tuple[bool, bool, bool]:
        """The gradients the op itself returns: none under reduction="none",
        whose backward calls the op again with row weights (see _save)."""
        if self.reduction == "none":
            return False, False, False
        return self.need_grads

    def grad_scale(self) -> float:
        """d recon / d (sum of the per-row losses) under the reduction."""
        return 1.0 / self.batch if self.reduction == "batchmean" else 1.0


def _reduce_rows(row_loss: torch.Tensor, opts: LinearOptions) -> torch.Tensor:
    """The float64 recon term under the reduction from the per-row losses [N].

    The rows of example b are rows b * N/B ... (b + 1) * N/B - 1 (target is
    [B, ...]); summed per example first, in a fixed order, as elbo_loss does.
    """
    per_example = row_loss.to(torch.float64).view(opts.batch, -1).sum(dim=1)
    if opts.reduction == "none":
        return per_example
    return per_example.sum() * opts.grad_scale()


# ---- the native kernel -------------------------------------------------------------


def _categorical_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    row_loss: torch.Tensor,
    scratch: torch.Tensor,
    grad_in_place: bool,
    floats: list[float],
    ints: list[int],
) -> int:
    """Runs elbo_loss's categorical kernel on one chunk: a call without a KL term
    (latent_dim 0), one "example" per row, reduction "none".

    Writes the chunk's per-row losses into ``row_loss`` (float64 [rows]) and,
    with grad_in_place, d loss_r / d logits (softmax - one-hot, unscaled) over
    ``logits`` [rows, V] itself. ``scratch``: float64 [4 * rows + 2] for the
    outputs the call does not need. Returns the index of the first invalid
    class id in the chunk (CPU with validation), else -1.
    """
    rows, vocab = logits.shape
    names = _ops.LAYOUT["ptrs"]
    ptr = {name: 0 for name in names}
    ptr["recon_input"] = logits.data_ptr()
    ptr["target"] = target.data_ptr()
    ptr["loss"] = row_loss.data_ptr()
    ptr["recon"] = scratch[:rows].data_ptr()
    ptr["kl"] = scratch[rows : 2 * rows].data_ptr()
    ptr["kl_per_dim"] = scratch[-2:].data_ptr()  # D = 0: never written
    ptr["beta_out"] = scratch[-1:].data_ptr()
    if "kl_weight" in ptr:
        ptr["kl_weight"] = scratch[2 * rows : 3 * rows].data_ptr()
    if grad_in_place:
        ptr["grad_recon"] = logits.data_ptr()
    ptrs = [ptr[name] for name in names]
    size = {
        "batch": rows, "n_rows": rows, "row_len": vocab, "latent_dim": 0,
        "recon_dtype": _ops.DTYPE_CODES[logits.dtype],
        "latent_dtype": _ops.DTYPE_CODES[logits.dtype], "n_threads": torch.get_num_threads(),
        "out_dtype": _ops.DTYPE_CODES[torch.float64],
    }  # fmt: skip
    sizes = [size[name] for name in _ops.LAYOUT["sizes"]]
    if logits.device.type == "cpu":
        return int(_C.elbo_forward_cpu(sizes, ptrs, floats, ints))
    workspace_bytes = _C.elbo_cuda_workspace_bytes(sizes, ptrs, floats, ints)
    workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=logits.device)
    stream = torch.cuda.current_stream(logits.device).cuda_stream
    _C.elbo_forward_cuda(sizes, ptrs, floats, ints, workspace.data_ptr(), workspace_bytes, stream)
    return -1


def _check_class_ids(target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raises the ValueError of elbo_loss for a class id outside [0, V) (reads target)."""
    target = _validate.unwrap_functorch(target)  # under torch.func.vmap: every example's
    if target.is_meta:
        return  # no values to check
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if bool(bad.any()):
        _raise_bad_class(target[bad].reshape(-1)[0], vocab, ignore_index)


def _raise_bad_class(found: Any, vocab: int, ignore_index: int) -> None:
    raise ValueError(
        f"target: class ids must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
        f"found {int(found)}"
    )


class LinearOutputs(NamedTuple):
    """klanneal::linear_nll's outputs: the recon term (float64, under the
    reduction) and the gradients computed in the forward pass (empty when
    not asked for, and under reduction "none")."""

    recon: torch.Tensor
    grad_hidden: torch.Tensor
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor


Outputs = LinearOutputs


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor; large CPU ones from klanneal's buffer pool.

    The chunk buffer and grad_weight are the same sizes at every training
    step: from the pool (2 MiB-aligned, huge-page advised) they are neither
    mapped nor faulted in anew each time, and the weight gradient's pages
    are huge pages for the GEMMs that accumulate it. The tensor's deleter
    gives the buffer back (for grad_weight: when weight.grad is released).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type == "cpu" and nbytes >= _ops.POOL_MIN_BYTES and _ops._pool_enabled():
        capsule = _C.pooled_empty(list(shape), _ops.DTYPE_CODES[dtype])
        return torch.utils.dlpack.from_dlpack(capsule)
    return torch.empty(shape, dtype=dtype, device=device)


# The CPU projection goes through [block, rows] tiles of about this many bytes
# (see _project): small enough to stay in a core's L2 cache while transposed.
TILE_BYTES = 512 << 10


def _project(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             logits: torch.Tensor, tile: Optional[torch.Tensor]) -> None:  # fmt: skip
    """logits [rows, V] = h [rows, H] @ weight^T (+ bias [V]).

    With a CPU ``tile``: one vocabulary block at a time, as weight_block @ h^T
    into the tile, then transposed into the logits. BLAS given the chunk's
    few rows as its small dimension repacks the whole weight at every call
    (on a 2-core AVX2 machine h @ weight^T ran at 2/3 of the speed of the
    same product done this way for H=768, V=50257, 128 rows); as the large
    dimension it streams the weight once.
    """
    if tile is None:
        if bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        return
    rows, vocab = logits.shape
    block = max(1, tile.numel() // rows)
    h_t = h.t()
    for v0 in range(0, vocab, block):
        v1 = min(v0 + block, vocab)
        part = tile[: (v1 - v0) * rows].view(v1 - v0, rows)
        if bias is None:
            torch.mm(weight[v0:v1], h_t, out=part)
        else:
            torch.addmm(bias[v0:v1, None], weight[v0:v1], h_t, out=part)
        logits[:, v0:v1].copy_(part.t())


class LinearInputs(NamedTuple):
    """The inputs of klanneal::linear_nll in schema order."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    target: torch.Tensor
    row_weight: Optional[torch.Tensor]
    ints: list[int]


def _native_kernel(*args: Any) -> Outputs:
    """recon (float64, under the reduction) and the gradients asked for, chunk by chunk.

    hidden [N, H], weight [V, H], bias [V] or None, target int64 [N].
    row_weight (float [N] or None): the gradients are those of
    sum_r row_weight[r] * loss_r instead of the reduction's (the backward
    of reduction="none"). Gradients come back in grad_dtype of their input
    (float32 for fp16/bf16), empty when not asked for (LinearOptions.op_grads).
    args: the op's inputs (LinearInputs).
    """
    hidden, weight, bias, target, row_weight, ints = LinearInputs(*args)
    opts = LinearOptions.unpack(ints)
    n_rows, width = hidden.shape
    vocab, device = weight.shape[0], hidden.device
    # fp16/bf16: the logits, their gradient and every accumulation in fp32
    # (a half-precision grad_weight summed over thousands of rows loses it).
    compute = _ops.grad_dtype(hidden.dtype)
    weight = weight if weight.dtype == compute else weight.to(compute)
    bias = bias if bias is None or bias.dtype == compute else bias.to(compute)
    need = opts.op_grads
    grads = (
        torch.empty((n_rows, width) if need[0] else (0,), dtype=compute, device=device),
        _buffer((vocab, width) if need[1] else (0,), compute, device),
        torch.empty((vocab,) if need[2] else (0,), dtype=compute, device=device),
    )
    row_loss = torch.empty(n_rows, dtype=torch.float64, device=device)
    if n_rows == 0:
        grads[1].zero_()
        grads[2].zero_()
    else:
        _chunks(hidden, weight, bias, target, row_weight, opts, row_loss, grads)
    return LinearOutputs(_reduce_rows(row_loss, opts), *grads)


def _chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    row_weight: Optional[torch.Tensor],
    opts: LinearOptions,
    row_loss: torch.Tensor,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """The chunk loop of _native_kernel: fills row_loss [N] and grads (hidden,
    weight, bias; weight and bias accumulated, uninitialised before)."""
    n_rows, vocab, device = hidden.shape[0], weight.shape[0], hidden.device
    compute = weight.dtype
    on_cpu = device.type == "cpu"
    if opts.validate and not on_cpu:
        _check_class_ids(target, vocab, opts.ignore_index)  # one sync, before any work
    chunk = opts.chunk_size or default_chunk_size(n_rows, vocab, hidden.shape[1], compute)
    chunk = min(chunk, n_rows)
    # One buffer for every chunk's logits, overwritten by their gradient.
    buffer = _buffer((chunk * vocab,), compute, device)
    block = max(1, TILE_BYTES // (chunk * compute.itemsize))
    tile = None
    if on_cpu and vocab >= 2 * block:
        tile = torch.empty(block * chunk, dtype=compute, device=device)
    scratch = torch.empty(4 * chunk + 2, dtype=torch.float64, device=device)
    need_grad = any(opts.op_grads)
    floats, ints = _ops.ElboOptions(
        reduction="none", ignore_index=opts.ignore_index, validate=opts.validate and on_cpu
    ).pack(need_grad_recon=need_grad)
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        logits = buffer[: (stop - start) * vocab].view(stop - start, vocab)
        h = hidden[start:stop].to(compute)
        _project(h, weight, bias, logits, tile)
        bad = _categorical_rows(
            logits, target[start:stop], row_loss[start:stop], scratch, need_grad, floats, ints
        )
        if bad >= 0:
            _raise_bad_class(target[start + bad], vocab, opts.ignore_index)
        if need_grad:
            # logits now holds d loss_r / d logits (softmax - one-hot) of each row.
            if row_weight is not None:
                logits.mul_(row_weight[start:stop].to(compute).unsqueeze(1))
            scale = 1.0 if row_weight is not None else opts.grad_scale()
            _accumulate(logits, h, weight, grads, start, scale, first=start == 0)


def _accumulate(
    g: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    start: int,
    scale: float,
    *,
    first: bool,
) -> None:
    """One chunk's share of the gradients from g = d loss / d logits [rows, V].

    grad_hidden[chunk] = scale * g @ weight; grad_weight += scale * g^T @ h;
    grad_bias += scale * column sums of g (empty gradients are skipped). On
    the first chunk beta=0: the uninitialised buffers are not read.
    """
    grad_hidden, grad_weight, grad_bias = grads
    beta = 0 if first else 1
    if grad_hidden.numel():
        rows = grad_hidden[start : start + g.shape[0]]
        torch.addmm(rows, g, weight, beta=0, alpha=scale, out=rows)
    if grad_weight.numel():
        grad_weight.addmm_(g.t(), h, beta=beta, alpha=scale)
    if grad_bias.numel():
        ones = torch.ones(g.shape[0], dtype=g.dtype, device=g.device)
        grad_bias.addmv_(g.t(), ones, beta=beta, alpha=scale)


def _reference_kernel(*args: Any) -> Outputs:
    """The op on any device, in plain PyTorch: F.linear + F.cross_entropy and autograd.

    The default kernel (devices without a native one, builds without _C):
    the same outputs as _native_kernel, the logits materialised.
    """
    hidden, weight, bias, target, row_weight, ints = LinearInputs(*args)
    opts = LinearOptions.unpack(ints)
    compute = _ops.grad_dtype(hidden.dtype)
    if opts.validate:
        _check_class_ids(target, weight.shape[0], opts.ignore_index)
    inputs = (hidden, weight, bias)
    with torch.enable_grad():
        leaves = [
            None if t is None else t.detach().to(compute).requires_grad_(need)
            for t, need in zip(inputs, opts.op_grads)
        ]
        h, w, b = leaves
        assert h is not None and w is not None
        row_loss = F.cross_entropy(
            F.linear(h, w, b), target, reduction="none", ignore_index=opts.ignore_index
        )
        weights: Any = opts.grad_scale() if row_weight is None else row_weight.to(compute)
        wanted = [t for t, need in zip(leaves, opts.op_grads) if need and t is not None]
        grads = list(torch.autograd.grad((row_loss * weights).sum(), wanted)) if wanted else []
    outs = []
    for t, need in zip(leaves, opts.op_grads):
        if need and t is not None:
            outs.append(grads.pop(0).contiguous())
        else:
            outs.append(hidden.new_empty(0, dtype=compute))
    grad_hidden, grad_weight, grad_bias = outs
    return LinearOutputs(_reduce_rows(row_loss.detach(), opts), grad_hidden, grad_weight, grad_bias)


# ---- registration ------------------------------------------------------------------

torch.library.define(
    "klanneal::linear_nll",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor? row_weight, "
    "int[] ints) -> (Tensor, Tensor, Tensor, Tensor)",
)
linear_nll_op = torch.ops.klanneal.linear_nll.default
torch.library.impl("klanneal::linear_nll", "default")(_reference_kernel)
if _C is not None:
    for _device in ("cpu", "cuda"):
        torch.library.impl("klanneal::linear_nll", _device)(_native_kernel)


@torch.library.register_fake("klanneal::linear_nll")  # type: ignore[untyped-decorator]
def _linear_nll_fake(*args: Any) -> Outputs:
    hidden, weight, _, _, _, ints = LinearInputs(*args)
    opts = LinearOptions.unpack(ints)
    compute = _ops.grad_dtype(hidden.dtype)
    shape = (opts.batch,) if opts.reduction == "none" else ()
    need_hidden, need_weight, need_bias = opts.op_grads
    return LinearOutputs(
        hidden.new_empty(shape, dtype=torch.float64),
        hidden.new_empty(hidden.shape if need_hidden else (0,), dtype=compute),
        hidden.new_empty(weight.shape if need_weight else (0,), dtype=compute),
        hidden.new_empty((weight.shape[0],) if need_bias else (0,), dtype=compute),
    )


# ---- autograd -----------------------------------------------------------------

_DOUBLE_BACKWARD = (
    "klanneal.linear_elbo_loss does not support double backward (create_graph=True): its "
    "gradients are computed in the forward pass and have no graph of their own. Use "
    "F.linear + klanneal.elbo_loss_ref for losses that need second derivatives."
)
_SECOND_BACKWARD = (
    "klanneal.linear_elbo_loss: a second backward through the same graph (retain_graph=True) "
    "is not supported: the first backward scaled the gradients saved by the forward pass in "
    "place. Recompute the loss for a second backward."
)


def _save(
    ctx: Any,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    ints: list[int],
    grads: tuple[torch.Tensor, ...],
) -> None:
    opts = LinearOptions.unpack(ints)
    ctx.opts = opts
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.scaled_in_place = False
    if opts.reduction == "none":
        # Per-example upstream gradients cannot be applied to a grad_weight
        # summed over the examples: backward runs the chunked pass again with
        # each row's gradient weighted by its example's (recomputing the
        # logits), so the forward pass computed no gradient here.
        ctx.save_for_backward(hidden, weight, bias, target)
    else:
        ctx.save_for_backward(*grads)


def _backward_common(ctx: Any, grad_recon: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """Gradients of hidden, weight, bias: the saved ones times grad_recon.

    Eager, the saved gradients are scaled in place (after which they cannot
    serve another backward) or returned untouched when grad_recon is exactly 1
    on the CPU; traced (torch.compile, opcheck), out of place. Under
    reduction="none" they are computed here (see _save).
    """
    opts: LinearOptions = ctx.opts
    check_backward(ctx, _SECOND_BACKWARD)
    if grad_recon is None or not any(opts.need_grads):
        return [None, None, None]
    eager = check_eager(grad_recon, _DOUBLE_BACKWARD)
    grads: list[Optional[torch.Tensor]]
    if opts.reduction == "none":
        hidden, weight, bias, target = ctx.saved_tensors
        rows_per_example = hidden.shape[0] // opts.batch
        row_weight = grad_recon.repeat_interleave(rows_per_example)
        ints = dataclasses.replace(opts, reduction="sum", validate=False).pack()
        if eager and _ops.native_available(hidden.device):
            outs = LinearOutputs(*_native_kernel(hidden, weight, bias, target, row_weight, ints))
        else:
            outs = LinearOutputs(*linear_nll_op(hidden, weight, bias, target, row_weight, ints))
        grads = [outs.grad_hidden, outs.grad_weight, outs.grad_bias]
    else:
        saved = ctx.saved_tensors
        # The recon term is a sum (already scaled by the reduction): scaled like elbo_loss's.
        grads, _ = scale_saved(ctx, ctx, saved, [True] * len(saved), grad_recon, "sum", eager)
    result: list[Optional[torch.Tensor]] = []
    for grad, need, dtype in zip(grads, opts.need_grads, ctx.dtypes):
        if not need or grad is None:
            result.append(None)
        else:
            result.append(grad if grad.dtype == dtype else grad.to(dtype))
    return result


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    hidden, weight, bias, target, _, ints = LinearInputs(*inputs)
    out = LinearOutputs(*output)
    grads = (out.grad_hidden, out.grad_weight, out.grad_bias)
    _save(ctx, hidden, weight, bias, target, ints, grads)
    ctx.mark_non_differentiable(*grads)


def _backward(ctx: Any, grad_recon: Optional[torch.Tensor], *unused: Any) -> tuple[Any, ...]:
    grad_hidden, grad_weight, grad_bias = _backward_common(ctx, grad_recon)
    return grad_hidden, grad_weight, grad_bias, None, None, None


torch.library.register_autograd("klanneal::linear_nll", _backward, setup_context=_setup_context)


class _LinearNllFunction(torch.autograd.Function):
    """Eager autograd of the op: the native kernel called directly (no dispatcher)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        target: torch.Tensor,
        ints: list[int],
    ) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        recon, *grads = _native_kernel(hidden, weight, bias, target, None, ints)
        _save(ctx, hidden, weight, bias, target, ints, tuple(grads))
        return recon

    @staticmethod
    def backward(ctx: Any, grad_recon: Optional[torch.Tensor]) -> tuple[Any, ...]:
        grad_hidden, grad_weight, grad_bias = _backward_common(ctx, grad_recon)
        return grad_hidden, grad_weight, grad_bias, None, None


def _linear_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    ints: list[int],
) -> torch.Tensor:
    """The recon term with autograd: the op (traced) or the native kernel (eager)."""
    result: torch.Tensor
    if torch.compiler.is_compiling() or not _ops.native_available(hidden.device):
        result = linear_nll_op(hidden, weight, bias, target, None, ints)[0]
    else:
        result = _LinearNllFunction.apply(  # type: ignore[no-untyped-call]
            hidden, weight, bias, target, ints
        )
    return result
