"""The count likelihoods' reconstruction term as one op: ``klanneal::count_nll``.

For the Poisson, negative binomial and zero-inflated negative binomial
families (klanneal.likelihoods), ``count_recon`` returns the reduced sum of
-log p(x | mu, theta, zi_logits) over a [B, G] matrix of means and counts,
its gradients w.r.t. mu, theta and zi_logits computed in the forward pass
(as elbo_loss does); backward scales them by the upstream gradient.
``elbo_loss`` adds it to the KL term of the same call (klanneal._call).

The op's kernels: the native one where ``_C`` has it (the torch-free
``count_recon_forward_*`` launchers: every formula in
csrc/include/klanneal/count_likelihoods_body.h), else the default kernel,
the float64-accurate reference (klanneal._count_ref) and autograd.
``register_fake`` and ``register_autograd`` make it traceable by
torch.compile.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import torch

from klanneal._env import native_disabled
from klanneal._layout import DTYPE_CODES, grad_dtype
from klanneal.likelihoods import FAMILIES

try:
    from klanneal import _C
except ImportError:  # pragma: no cover - exercised via KLANNEAL_DISABLE_NATIVE
    _C = None  # type: ignore[assignment]

# The count families, in the order of their codes (the C++ X-macro list when
# the extension has the native kernel).
COUNT_FAMILIES = ("poisson", "negative_binomial", "zero_inflated_negative_binomial")
_REDUCTIONS = ("batchmean", "sum", "none")


class CountOutputs(NamedTuple):
    """klanneal::count_nll's outputs: the reconstruction term (float64, 0-d or
    [B] for "none") and the gradients of the forward pass (empty where not
    asked for: grad_theta / grad_zi in theta's / zi_logits's own shapes)."""

    recon: torch.Tensor
    grad_mu: torch.Tensor
    grad_theta: torch.Tensor
    grad_zi: torch.Tensor


@dataclasses.dataclass(frozen=True)
class CountOptions:
    """The op's integer options, packed into its ``ints`` by name."""

    family: str
    reduction: str
    validate: bool
    need_grad_mu: bool
    need_grad_theta: bool
    need_grad_zi: bool

    def pack(self) -> list[int]:
        return [
            COUNT_FAMILIES.index(self.family), _REDUCTIONS.index(self.reduction),
            int(self.validate), int(self.need_grad_mu), int(self.need_grad_theta),
            int(self.need_grad_zi),
        ]  # fmt: skip

    @staticmethod
    def unpack(ints: list[int]) -> CountOptions:
        family, reduction, validate, g_mu, g_theta, g_zi = ints
        return CountOptions(
            COUNT_FAMILIES[family], _REDUCTIONS[reduction], bool(validate), bool(g_mu),
            bool(g_theta), bool(g_zi),
        )  # fmt: skip

    def scale(self, batch: int) -> float:
        """The reduction's factor on the sum over examples."""
        return 1.0 / batch if self.reduction == "batchmean" else 1.0


def _reduce(rows: torch.Tensor, opts: CountOptions) -> torch.Tensor:
    if opts.reduction == "none":
        return rows
    total = rows.sum()
    return total / rows.shape[0] if opts.reduction == "batchmean" else total


def _reference_grads(
    mu: torch.Tensor,
    counts: torch.Tensor,
    theta: Optional[torch.Tensor],
    zi_logits: Optional[torch.Tensor],
    opts: CountOptions,
    grad_recon: torch.Tensor,
) -> list[Optional[torch.Tensor]]:
    """The gradients of (reduced rows * grad_recon).sum() w.r.t. mu, theta and
    zi_logits (those asked for; None for the others) from the reference and
    autograd, recomputed (run from backward, where autograd records)."""
    need = (opts.need_grad_mu, opts.need_grad_theta, opts.need_grad_zi)
    with torch.enable_grad():
        leaves = [
            None if t is None else t.detach().requires_grad_(n)
            for t, n in zip((mu, theta, zi_logits), need)
        ]
        recon = _reference_recon(leaves[0], counts, leaves[1], leaves[2], opts)  # type: ignore[arg-type]
        wanted = [t for t, n in zip(leaves, need) if n and t is not None]
        total = (recon * grad_recon.to(recon.dtype)).sum()
        grads = list(torch.autograd.grad(total, wanted)) if wanted else []
    return [grads.pop(0) if n and t is not None else None for t, n in zip(leaves, need)]


def _reference_recon(
    mu: torch.Tensor,
    counts: torch.Tensor,
    theta: Optional[torch.Tensor],
    zi_logits: Optional[torch.Tensor],
    opts: CountOptions,
) -> torch.Tensor:
    """The reduced rows of -log p (float64) from the table's reference formula."""
    nll = FAMILIES[opts.family].nll(mu, counts, theta=theta, zi_logits=zi_logits)
    return _reduce(nll.to(torch.float64).reshape(mu.shape[0], -1).sum(1), opts)


def _reference_kernel(
    mu: torch.Tensor,
    counts: torch.Tensor,
    theta: Optional[torch.Tensor],
    zi_logits: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
    ints: list[int],
) -> CountOutputs:
    """The op's default kernel (every device): the reference value; its
    gradients are left empty and recomputed by backward (_reference_grads)."""
    opts = CountOptions.unpack(ints)
    empty = mu.new_empty(0, dtype=grad_dtype(mu.dtype))
    recon = _reference_recon(mu, counts, theta, zi_logits, opts)
    return CountOutputs(recon, empty, empty.clone(), empty.clone())


_HAS_NATIVE = _C is not None and hasattr(_C, "count_recon_forward_cpu")
_LAYOUT: dict[str, list[str]] = _C.count_recon_layout() if _HAS_NATIVE else {}


def native_count_kernel(device: torch.device) -> bool:
    """Whether the native count kernel runs on `device` (else the reference)."""
    if not _HAS_NATIVE or native_disabled():
        return False
    return device.type == "cpu" or (
        device.type == "cuda" and hasattr(_C, "count_recon_forward_cuda")
    )


def _native_outputs(
    mu: torch.Tensor,
    counts: torch.Tensor,
    theta: Optional[torch.Tensor],
    zi_logits: Optional[torch.Tensor],
    opts: CountOptions,
    row_scale: Optional[torch.Tensor] = None,
) -> CountOutputs:
    """The native kernel: the rows' -log p (float64) and the gradients asked
    for, each times the reduction's scale (and row_scale[b] per example when
    given: a backward under "none"), in one pass over mu [B, G] (contiguous,
    in the compute dtype, as counts, theta and zi_logits)."""
    batch = mu.shape[0]
    genes = mu.numel() // batch

    def strides(t: Optional[torch.Tensor]) -> tuple[int, ...]:
        return (0, 0) if t is None else t.expand_as(mu).reshape(batch, genes).stride()

    def grad(t: Optional[torch.Tensor], need: bool) -> Optional[torch.Tensor]:
        return torch.empty_like(t) if need and t is not None else None

    row_nll = mu.new_empty(batch, dtype=torch.float64)
    grads = (grad(mu, opts.need_grad_mu), grad(theta, opts.need_grad_theta),
             grad(zi_logits, opts.need_grad_zi))  # fmt: skip
    first_invalid = mu.new_empty(2, dtype=torch.int64) if opts.validate else None
    (t_rows, t_cols), (z_rows, z_cols) = strides(theta), strides(zi_logits)
    size = {
        "batch": batch, "genes": genes, "family": COUNT_FAMILIES.index(opts.family),
        "dtype": DTYPE_CODES[mu.dtype], "n_threads": torch.get_num_threads(), "simd_level": -1,
        "theta_row_stride": t_rows, "theta_col_stride": t_cols, "zi_row_stride": z_rows,
        "zi_col_stride": z_cols, "workspace_bytes": 0,
    }  # fmt: skip
    tensors = {
        "mu": mu, "counts": counts, "theta": theta, "zi_logits": zi_logits,
        "row_scale": row_scale, "row_nll": row_nll, "grad_mu": grads[0], "grad_theta": grads[1],
        "grad_zi": grads[2], "first_invalid": first_invalid, "workspace": None,
    }  # fmt: skip
    sizes = [size[name] for name in _LAYOUT["sizes"]]
    ptrs = [0 if tensors[n] is None else tensors[n].data_ptr() for n in _LAYOUT["ptrs"]]  # type: ignore[union-attr]
    floats = [opts.scale(batch)]
    if mu.is_cpu:
        _C.count_recon_forward_cpu(sizes, ptrs, floats)
    else:  # the launcher's scratch memory comes from the caller (torch's allocator)
        nbytes = _C.count_recon_cuda_workspace_bytes(sizes, ptrs, floats)
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=mu.device)
        sizes[_LAYOUT["sizes"].index("workspace_bytes")] = nbytes
        ptrs[_LAYOUT["ptrs"].index("workspace")] = workspace.data_ptr()
        stream = torch.cuda.current_stream(mu.device).cuda_stream
        _C.count_recon_forward_cuda(sizes, ptrs, floats, stream)
    if first_invalid is not None and int(first_invalid[0]) >= 0:
        _raise_invalid(first_invalid, mu, counts, theta, zi_logits)
    return CountOutputs(
        _reduce(row_nll, opts), *(mu.new_empty(0) if g is None else g for g in grads)
    )  # each its own empty tensor: outputs must not alias


def _raise_invalid(
    where: torch.Tensor, mu: torch.Tensor, counts: torch.Tensor, theta: Any, zi_logits: Any
) -> None:
    """The ValueError of check_count_values for the first invalid input the
    kernel found (its flat index and which input)."""
    from klanneal._count_ref import check_count_values

    index, which = int(where[0]), int(where[1])
    check_count_values(mu, counts, theta=theta, zi_logits=zi_logits)  # raises, naming it
    raise ValueError(f"{_LAYOUT['input'][which]}: invalid value at flat index {index}")


def _native_kernel(
    mu: torch.Tensor,
    counts: torch.Tensor,
    theta: Optional[torch.Tensor],
    zi_logits: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
    ints: list[int],
) -> CountOutputs:
    if mu.dim() < 1 or mu.shape[0] == 0:
        return _reference_kernel(mu, counts, theta, zi_logits, row_scale, ints)
    opts = CountOptions.unpack(ints)
    return _native_outputs(mu, counts, theta, zi_logits, opts, row_scale)


def _fake(
    mu: torch.Tensor,
    counts: torch.Tensor,
    theta: Optional[torch.Tensor],
    zi_logits: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
    ints: list[int],
) -> CountOutputs:
    opts = CountOptions.unpack(ints)
    shape = (mu.shape[0],) if opts.reduction == "none" else ()
    empty = mu.new_empty(0, dtype=grad_dtype(mu.dtype))
    recon = mu.new_empty(shape, dtype=torch.float64)
    if not native_count_kernel(mu.device):  # the reference leaves them to backward
        return CountOutputs(recon, empty, empty.clone(), empty.clone())

    def grad(t: Optional[torch.Tensor], need: bool) -> torch.Tensor:
        return torch.empty_like(t) if need and t is not None else empty.clone()

    return CountOutputs(
        recon, grad(mu, opts.need_grad_mu), grad(theta, opts.need_grad_theta),
        grad(zi_logits, opts.need_grad_zi),
    )  # fmt: skip


torch.library.define(
    "klanneal::count_nll",
    "(Tensor mu, Tensor counts, Tensor? theta, Tensor? zi_logits, Tensor? row_scale, "
    "int[] ints) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)
torch.library.impl("klanneal::count_nll", "default")(_reference_kernel)
if _HAS_NATIVE:
    torch.library.impl("klanneal::count_nll", "cpu")(_native_kernel)
    if hasattr(_C, "count_recon_forward_cuda"):
        torch.library.impl("klanneal::count_nll", "cuda")(_native_kernel)
torch.library.register_fake("klanneal::count_nll")(_fake)
count_nll_op = torch.ops.klanneal.count_nll.default


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    mu, counts, theta, zi_logits, _, ints = inputs
    out = CountOutputs(*output)
    ctx.opts, ctx.ints = CountOptions.unpack(ints), ints
    ctx.set_materialize_grads(False)
    # The inputs too: under reduction "none" (per-example upstream
    # gradients: a parameter shared by the examples, theta [G], does not get
    # a rescaling of the forward pass's gradient) and for a kernel that left
    # its gradients to backward (the reference), backward recomputes them.
    ctx.save_for_backward(mu, counts, theta, zi_logits, out.grad_mu, out.grad_theta, out.grad_zi)


def _backward(ctx: Any, grad_recon: Optional[torch.Tensor], *unused: Any) -> tuple[Any, ...]:
    if grad_recon is None:
        return (None,) * 6
    opts = ctx.opts
    mu, counts, theta, zi_logits, *saved = ctx.saved_tensors
    need = tuple(
        n and t is not None
        for n, t in zip((opts.need_grad_mu, opts.need_grad_theta, opts.need_grad_zi),
                        (mu, theta, zi_logits))
    )  # fmt: skip
    computed = all(g.numel() > 0 or not n for g, n in zip(saved, need))
    if (opts.reduction == "none" or not computed) and native_count_kernel(mu.device):
        # The kernel again, each example's gradient times its upstream one.
        # (Through the op: opaque to torch.compile's trace of this backward.)
        row_scale = grad_recon.to(torch.float64).expand(mu.shape[0]).contiguous()
        out = CountOutputs(*count_nll_op(mu, counts, theta, zi_logits, row_scale, ctx.ints))
        grads = [g if n else None for g, n in zip(out[1:], need)]
    elif opts.reduction == "none" or not computed:
        grads = _reference_grads(mu, counts, theta, zi_logits, opts, grad_recon)
    elif (
        type(grad_recon) is torch.Tensor  # eager (not a fake or traced tensor)
        and not torch.compiler.is_compiling()
        and grad_recon.is_cpu
        and grad_recon.numel() == 1
        and grad_recon.item() == 1.0
    ):
        grads = [g if n else None for g, n in zip(saved, need)]  # loss.backward(): as they are
    else:
        grads = [g * grad_recon if n else None for g, n in zip(saved, need)]
    return grads[0], None, grads[1], grads[2], None, None


torch.library.register_autograd("klanneal::count_nll", _backward, setup_context=_setup_context)


def count_recon(
    mu: torch.Tensor,
    counts: torch.Tensor,
    family: str,
    theta: Any,
    zi_logits: Any,
    reduction: str,
    validate: bool,
) -> torch.Tensor:
    """The reconstruction term of a count family (float64, 0-d or [B]),
    differentiable w.r.t. mu and the parameter tensors that require grad.

    mu: [B, ...] means > 0; counts: their counts (any real dtype, converted
    to mu's compute dtype); theta, zi_logits: None, floats or tensors
    broadcastable to mu's shape (checked by the caller).
    """
    compute = grad_dtype(mu.dtype)  # fp16/bf16 computed in fp32

    def as_tensor(t: Any) -> Optional[torch.Tensor]:
        if t is None:
            return None
        tensor = t if isinstance(t, torch.Tensor) else torch.tensor(float(t))
        return tensor.to(mu.device, compute)

    theta_t, zi_t = as_tensor(theta), as_tensor(zi_logits)
    grad_on = torch.is_grad_enabled()
    opts = CountOptions(
        family, reduction, validate, grad_on and mu.requires_grad,
        grad_on and theta_t is not None and theta_t.requires_grad,
        grad_on and zi_t is not None and zi_t.requires_grad,
    )  # fmt: skip
    out = CountOutputs(
        *count_nll_op(
            mu.to(compute).contiguous(),
            counts.to(compute).contiguous(),
            None if theta_t is None else theta_t.contiguous(),
            None if zi_t is None else zi_t.contiguous(),
            None,
            opts.pack(),
        )  # fmt: skip
    )
    return out.recon
