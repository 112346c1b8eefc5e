"""Shared inputs, packed calls and the float64 reference of the count
reconstruction kernel tests (test_count_kernel.py, test_count_cuda_emulated.py)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from klanneal import _C
from klanneal._count_ref import nb_nll, poisson_nll, zinb_nll

LAYOUT = _C.count_recon_layout()
FAMILIES = tuple(LAYOUT["family"])  # ("poisson", "nb", "zinb")
DTYPE_CODES = {torch.float32: "float32", torch.float64: "float64",
               torch.float16: "float16", torch.bfloat16: "bfloat16"}  # fmt: skip
# theta / zi_logits shapes by name, for a batch of B examples of G genes.
SHAPES: dict[str, Callable[[int, int], tuple[int, ...]]] = {
    "scalar": lambda b, g: (),
    "gene": lambda b, g: (g,),
    "example": lambda b, g: (b, 1),
    "element": lambda b, g: (b, g),
}


def has_theta(family: str) -> bool:
    return family != "poisson"


def has_zi(family: str) -> bool:
    return family == "zinb"


def make_inputs(
    family: str,
    batch: int,
    genes: int,
    theta_shape: str = "gene",
    zi_shape: str = "gene",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """float64 mu, counts (whole, about a third zeros) and the family's parameters."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.exp(3.0 * torch.rand(batch, genes, generator=gen, dtype=torch.float64) - 1.5)
    counts = torch.poisson(mu * 1.3, generator=gen)
    counts[torch.rand(batch, genes, generator=gen) < 0.2] = 0.0
    out = {"mu": mu, "counts": counts}
    if has_theta(family):
        shape = SHAPES[theta_shape](batch, genes)
        out["theta"] = torch.exp(4.0 * torch.rand(shape, generator=gen, dtype=torch.float64) - 2.0)
    if has_zi(family):
        shape = SHAPES[zi_shape](batch, genes)
        out["zi_logits"] = 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return out


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gradients are stored in the inputs' dtype for fp32/fp64, in float32 for fp16/bf16."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def rounded(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The inputs in `dtype`, contiguous (the kernel's storage)."""
    return {k: v.to(dtype).contiguous() for k, v in inputs.items()}


def packed_call(
    family: str,
    inputs: dict[str, torch.Tensor],
    *,
    grads: tuple[str, ...] = ("mu", "theta", "zi_logits"),
    row_scale: Optional[torch.Tensor] = None,
    grad_scale: float = 1.0,
    n_threads: int = 1,
    simd_level: int = -1,
    validate: bool = False,
) -> tuple[list[int], list[int], list[float], dict[str, torch.Tensor]]:
    """(sizes, ptrs, floats, outputs) for `inputs` already in the kernel's dtype.

    The outputs (row_nll, the wanted gradients, first_invalid) are filled with NaN /
    a sentinel so that a slot the kernel does not write shows.
    """
    mu = inputs["mu"]
    batch, genes = mu.shape
    gdt = grad_dtype(mu.dtype)
    out: dict[str, torch.Tensor] = {"row_nll": torch.full((batch,), math.nan, dtype=torch.float64)}
    for name, grad in (("mu", "grad_mu"), ("theta", "grad_theta"), ("zi_logits", "grad_zi")):
        if name in grads and name in inputs:
            out[grad] = torch.full(inputs[name].shape, math.nan, dtype=gdt)
    if validate:
        out["first_invalid"] = torch.full((2,), -7, dtype=torch.int64)
    sizes = dict(batch=batch, genes=genes, family=FAMILIES.index(family),
                 dtype=LAYOUT["dtype"].index(DTYPE_CODES[mu.dtype]), n_threads=n_threads,
                 simd_level=simd_level, theta_row_stride=0, theta_col_stride=0,
                 zi_row_stride=0, zi_col_stride=0, workspace_bytes=0)  # fmt: skip
    for name, prefix in (("theta", "theta"), ("zi_logits", "zi")):
        if name in inputs:
            rs, cs = inputs[name].expand(batch, genes).stride()
            sizes[f"{prefix}_row_stride"], sizes[f"{prefix}_col_stride"] = rs, cs
    ptrs = {name: 0 for name in LAYOUT["ptrs"]}
    for name, t in list(inputs.items()) + list(out.items()):
        ptrs[name] = t.data_ptr()
    if row_scale is not None:
        ptrs["row_scale"] = row_scale.data_ptr()
    floats = dict(grad_scale=grad_scale)
    return (
        [sizes[n] for n in LAYOUT["sizes"]],
        [ptrs[n] for n in LAYOUT["ptrs"]],
        [floats[n] for n in LAYOUT["floats"]],
        out,
    )


def set_slot(call: list, kind: str, name: str, value: Any) -> list:
    """A copy of one packed list with slot `name` of LAYOUT[kind] set to value."""
    call = list(call)
    call[LAYOUT[kind].index(name)] = value
    return call


def run_cpu(family: str, inputs: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
    """_C.count_recon_forward_cpu on `inputs` (already in the kernel's dtype)."""
    sizes, ptrs, floats, out = packed_call(family, inputs, **kwargs)
    _C.count_recon_forward_cpu(sizes, ptrs, floats)
    return out


def reference(
    family: str,
    inputs: dict[str, torch.Tensor],
    row_scale: Optional[torch.Tensor] = None,
    grad_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """row_nll and the gradients of sum_b grad_scale * row_scale[b] * row_nll[b] from
    _count_ref in float64 (autograd), at the values of `inputs` (any dtype)."""
    leaves = {k: v.detach().double().requires_grad_(True) for k, v in inputs.items()}
    mu, x = leaves["mu"], leaves["counts"]
    if family == "poisson":
        nll = poisson_nll(mu, x)
    elif family == "nb":
        nll = nb_nll(mu, leaves["theta"], x)
    else:
        nll = zinb_nll(mu, leaves["theta"], leaves["zi_logits"], x)
    row_nll = nll.sum(1)
    weight = torch.full_like(row_nll, grad_scale)
    if row_scale is not None:
        weight = weight * row_scale
    (row_nll * weight).sum().backward()
    out = {"row_nll": row_nll.detach()}
    for name, grad in (("mu", "grad_mu"), ("theta", "grad_theta"), ("zi_logits", "grad_zi")):
        if name in leaves:
            out[grad] = leaves[name].grad
    return out
