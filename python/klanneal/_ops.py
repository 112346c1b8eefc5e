"""The fused ELBO op: its torch.library registration and its eager autograd.

``klanneal::elbo_loss`` is functional: it returns loss, recon, kl,
kl_per_dim, beta (float64, cast by the caller) and the gradients of the loss
w.r.t. recon_input, mu and logvar, computed in the same pass (empty tensors
for the ones not asked for). Its backward only scales those gradients by
grad_output. ``klanneal::elbo_loss_inplace`` is the same op writing the
recon_input gradient into recon_input itself.

Registration as bitsandbytes and extension-cpp do it: each schema is defined
once (``torch.library.define``), a kernel is registered per device (CPU,
CUDA) and the pure-PyTorch reference as the default kernel, so
``torch.ops.klanneal.elbo_loss`` runs on any device; ``register_fake`` lets
torch.compile trace it and ``register_autograd`` makes the op itself
differentiable (torch.compile, direct calls). In eager mode klanneal.elbo_loss
does not go through the dispatcher at all: ``eager_elbo`` calls the device
kernel directly and ``ElboFunction``, a plain autograd.Function, attaches the
loss (the cheapest attachment: torch's custom-op wrapper costs tens of
microseconds per call); with nothing to track (torch.no_grad) there is no
Function at all.

The scalar options travel as two lists, ``floats`` and ``ints``, whose slot
layout is defined in C++ (csrc/include/klanneal/elbo_layout.h) and exported by
``_C.elbo_layout()``; :class:`ElboOptions` is the only code that packs or reads
them, by name.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import torch

from klanneal import _validate
from klanneal._env import env_switch, native_disabled

try:
    from klanneal import _C
except ImportError:  # pragma: no cover - exercised via KLANNEAL_DISABLE_NATIVE
    _C = None  # type: ignore[assignment]

# The packed call's layout and the enum codes as this Python code expects
# them. With the extension present they must equal _C.elbo_layout(), the one
# definition (tests/test_ops_layout.py asserts it); without it they describe
# the options of the pure-PyTorch default kernel.
PY_LAYOUT: dict[str, list[str]] = {
    "sizes": ["batch", "n_rows", "row_len", "latent_dim", "recon_dtype", "latent_dtype",
              "n_threads", "out_dtype"],
    "ptrs": ["recon_input", "target", "mu", "logvar", "prior_mu", "prior_logvar",
             "global_kl_per_dim", "beta_ptr", "step_ptr", "loss", "recon", "kl", "kl_per_dim",
             "beta_out", "kl_weight", "grad_recon", "grad_mu", "grad_logvar", "grad_prior_mu",
             "grad_prior_logvar"],
    "floats": ["beta_value", "free_bits", "gaussian_var", "schedule_kind", "schedule_shape",
               "schedule_start", "schedule_stop", "schedule_total_steps", "schedule_n_cycles",
               "schedule_ratio", "schedule_zero_ratio", "capacity_kind", "capacity_shape",
               "capacity_start", "capacity_stop", "capacity_total_steps", "capacity_n_cycles",
               "capacity_ratio", "capacity_zero_ratio"],
    "ints": ["likelihood", "reduction", "free_bits_mode", "ignore_index", "validate",
             "need_grad_recon", "need_grad_mu", "need_grad_logvar", "need_grad_prior_mu",
             "need_grad_prior_logvar", "has_capacity"],
    "likelihood": ["categorical", "bernoulli", "gaussian", "mse"],
    "reduction": ["batchmean", "sum", "none"],
    "free_bits_mode": ["batch", "sample"],
    "dtype": ["float32", "float64", "float16", "bfloat16"],
    "schedule_kind": ["constant", "monotonic", "cyclical", "capacity"],
    "ramp_shape": ["linear", "sigmoid", "cosine", "logistic"],
}  # fmt: skip
LAYOUT = _C.elbo_layout() if _C is not None else PY_LAYOUT

LIKELIHOODS = tuple(LAYOUT["likelihood"])
REDUCTIONS = tuple(LAYOUT["reduction"])
FREE_BITS_MODES = tuple(LAYOUT["free_bits_mode"])
DTYPE_CODES = {getattr(torch, name): code for code, name in enumerate(LAYOUT["dtype"])}
FULL_PRECISION = (torch.float32, torch.float64)
_INT = {name: i for i, name in enumerate(LAYOUT["ints"])}
_FLOAT = {name: i for i, name in enumerate(LAYOUT["floats"])}
_N_SCHEDULE = 8  # ScheduleParams' fields, from schedule_kind on
_BETA_SLOT = _FLOAT["beta_value"]
_SCHEDULE_SLOT = _FLOAT["schedule_kind"]
_CAPACITY_SLOT = _FLOAT["capacity_kind"]
_NEED_GRADS = ("need_grad_recon", "need_grad_mu", "need_grad_logvar", "need_grad_prior_mu",
               "need_grad_prior_logvar")  # fmt: skip

# A recon_input gradient of at least this many bytes comes from klanneal's
# buffer pool on the CPU (csrc/include/klanneal/buffer_pool.h) instead of a
# fresh torch.empty: glibc maps a buffer this large anew on every call and the
# kernel zeroes each page on first touch, ~half the op's time in the text
# benchmark. KLANNEAL_GRAD_POOL=0 switches the pool off.
POOL_MIN_BYTES = 1 << 20
# ScheduleParams of a constant schedule; unused unless a step tensor is passed.
NO_SCHEDULE: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0)


def constant_schedule(value: float) -> tuple[float, ...]:
    """ScheduleParams of a schedule that is `value` at every step."""
    value = _validate.as_float(value)
    return (0.0, 0.0, value, value, 1.0, 1.0, 1.0, 0.0)


@dataclasses.dataclass(frozen=True)
class ElboOptions:
    """The scalar options of one elbo_loss call, checked, packed for the op by name.

    ``pack`` writes them, with the per-call beta, capacity and the gradients
    asked for, into the op's ``floats`` and ``ints`` lists; ``unpack`` reads
    them back. Nothing else knows the slot layout.
    """

    likelihood: str = "categorical"
    reduction: str = "batchmean"
    free_bits: float = 0.0
    free_bits_mode: str = "batch"
    ignore_index: int = -100
    gaussian_var: float = 1.0
    validate: bool = True
    # pack()'s result per (gradients asked for, with capacity), for packed().
    _templates: dict[Any, tuple[list[float], list[int]]] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def packed(
        self,
        beta_value: float,
        schedule: Optional[tuple[float, ...]],
        capacity: Optional[tuple[float, ...]],
        need: tuple[bool, bool, bool, bool, bool],
    ) -> tuple[list[float], list[int]]:
        """``pack`` for one call (need: need_grad_recon ... need_grad_prior_logvar;
        schedule None: NO_SCHEDULE, the template's),
        from a template kept per `need` and capacity-or-not: the per-call cost
        of an elbo_loss call is a list copy and three slot writes."""
        key = (need, capacity is None)
        template = None if torch.compiler.is_compiling() else self._templates.get(key)
        if template is None:
            template = self.pack(
                capacity=None if capacity is None else NO_SCHEDULE,
                need_grad_recon=need[0], need_grad_mu=need[1], need_grad_logvar=need[2],
                need_grad_prior_mu=need[3], need_grad_prior_logvar=need[4],
            )  # fmt: skip
            if not torch.compiler.is_compiling():
                self._templates[key] = template
        floats = template[0].copy()
        floats[_BETA_SLOT] = beta_value
        if schedule is not None:
            floats[_SCHEDULE_SLOT : _SCHEDULE_SLOT + _N_SCHEDULE] = schedule
        if capacity is not None:
            floats[_CAPACITY_SLOT : _CAPACITY_SLOT + _N_SCHEDULE] = capacity
        return floats, template[1].copy()

    def pack(
        self,
        *,
        beta_value: float = 0.0,
        schedule: tuple[float, ...] | list[float] = NO_SCHEDULE,
        capacity: Optional[tuple[float, ...] | list[float]] = None,
        need_grad_recon: bool = False,
        need_grad_mu: bool = False,
        need_grad_logvar: bool = False,
        need_grad_prior_mu: bool = False,
        need_grad_prior_logvar: bool = False,
    ) -> tuple[list[float], list[int]]:
        """The op's ``floats`` and ``ints`` (need_grad_recon: ignored by the inplace op).

        `capacity`: the capacity's 8 ScheduleParams (evaluated at the op's
        step, or a constant schedule), or None for the plain KL term.
        """
        floats = [0.0] * len(_FLOAT)
        floats[_FLOAT["beta_value"]] = float(beta_value)
        floats[_FLOAT["free_bits"]] = float(self.free_bits)
        floats[_FLOAT["gaussian_var"]] = float(self.gaussian_var)
        first = _FLOAT["schedule_kind"]
        floats[first : first + _N_SCHEDULE] = [float(v) for v in schedule]
        first = _FLOAT["capacity_kind"]
        floats[first : first + _N_SCHEDULE] = [
            float(v) for v in (NO_SCHEDULE if capacity is None else capacity)
        ]
        ints = [0] * len(_INT)
        ints[_INT["likelihood"]] = LIKELIHOODS.index(self.likelihood)
        ints[_INT["reduction"]] = REDUCTIONS.index(self.reduction)
        ints[_INT["free_bits_mode"]] = FREE_BITS_MODES.index(self.free_bits_mode)
        ints[_INT["ignore_index"]] = int(self.ignore_index)
        ints[_INT["validate"]] = int(self.validate)
        ints[_INT["need_grad_recon"]] = int(need_grad_recon)
        ints[_INT["need_grad_mu"]] = int(need_grad_mu)
        ints[_INT["need_grad_logvar"]] = int(need_grad_logvar)
        ints[_INT["need_grad_prior_mu"]] = int(need_grad_prior_mu)
        ints[_INT["need_grad_prior_logvar"]] = int(need_grad_prior_logvar)
        ints[_INT["has_capacity"]] = int(capacity is not None)
        return floats, ints

    @staticmethod
    def unpack(floats: list[float], ints: list[int]) -> OpArgs:
        """The options, beta, capacity and the gradients asked for, from the op's lists."""
        first = _FLOAT["schedule_kind"]
        cap = _FLOAT["capacity_kind"]
        return OpArgs(
            ElboOptions(
                likelihood=LIKELIHOODS[ints[_INT["likelihood"]]],
                reduction=REDUCTIONS[ints[_INT["reduction"]]],
                free_bits=floats[_FLOAT["free_bits"]],
                free_bits_mode=FREE_BITS_MODES[ints[_INT["free_bits_mode"]]],
                ignore_index=ints[_INT["ignore_index"]],
                gaussian_var=floats[_FLOAT["gaussian_var"]],
                validate=bool(ints[_INT["validate"]]),
            ),
            beta_value=floats[_FLOAT["beta_value"]],
            schedule=tuple(floats[first : first + _N_SCHEDULE]),
            capacity=(
                tuple(floats[cap : cap + _N_SCHEDULE]) if ints[_INT["has_capacity"]] else None
            ),
            need_grads=tuple(bool(ints[_INT[n]]) for n in _NEED_GRADS),  # type: ignore[arg-type]
        )


def _make_options(
    likelihood: Any, reduction: Any, free_bits: Any, free_bits_mode: Any, ignore_index: Any,
    gaussian_var: Any, validate: Any,
) -> ElboOptions:  # fmt: skip
    _validate.check_options(
        likelihood, reduction, free_bits, free_bits_mode, ignore_index, gaussian_var
    )
    as_float = _validate.as_float  # free_bits, gaussian_var: symbolic under torch.compile
    return ElboOptions(
        likelihood, reduction, as_float(free_bits), free_bits_mode, int(ignore_index),
        as_float(gaussian_var), _validate.check_flag("validate", validate),
    )  # fmt: skip


_cached_options = functools.lru_cache(maxsize=256, typed=True)(_make_options)


def elbo_options(
    likelihood: Any, reduction: Any, free_bits: Any, free_bits_mode: Any, ignore_index: Any,
    gaussian_var: Any, validate: Any,
) -> ElboOptions:  # fmt: skip
    """The checked ElboOptions of these elbo_loss arguments (raises naming a bad
    one), the same object for the same arguments: one dict lookup per call."""
    args = (likelihood, reduction, free_bits, free_bits_mode, ignore_index, gaussian_var, validate)
    if torch.compiler.is_compiling():  # traced once per graph; dynamo skips lru_cache
        return _make_options(*args)
    try:
        return _cached_options(*args)
    except TypeError:
        # An unhashable argument (or a wrong type check_options reports):
        # checked without the cache, which raises the argument's own error.
        return _make_options(*args)


class OpArgs(NamedTuple):
    """What ``ElboOptions.unpack`` reads from the op's ``floats`` and ``ints``
    (a NamedTuple: built on every call of the op's kernels)."""

    options: ElboOptions
    beta_value: float
    schedule: tuple[float, ...]
    capacity: Optional[tuple[float, ...]]
    need_grads: tuple[
        bool, bool, bool, bool, bool
    ]  # recon_input, mu, logvar, prior_mu, prior_logvar


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
    if recon_dtype == latent_dtype:
        dtype = recon_dtype
    else:
        dtype = torch.promote_types(recon_dtype, latent_dtype)
    return dtype if dtype in FULL_PRECISION else torch.float32


Outputs = tuple[torch.Tensor, ...]  # the op's 11 outputs (see _schema_outputs)
InplaceOutputs = tuple[torch.Tensor, ...]  # the inplace op's 10: no grad_recon


class OpInputs(NamedTuple):
    """The op's inputs in schema order (the learned prior and the global free-bits
    mean come last, optional, so that older calls keep their positions)."""

    recon_input: torch.Tensor
    target: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    beta: Optional[torch.Tensor]
    step: Optional[torch.Tensor]
    floats: list[float]
    ints: list[int]
    prior_mu: Optional[torch.Tensor] = None
    prior_logvar: Optional[torch.Tensor] = None
    global_kl_per_dim: Optional[torch.Tensor] = None


_N_INPUTS = len(OpInputs._fields)


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


# torch.utils.dlpack.from_dlpack ends, for a capsule, in torch._C._from_dlpack:
# called directly, a Python frame and its checks less (~20 us when the call
# path is out of the caches, as between training steps).
_FROM_CAPSULE = getattr(torch._C, "_from_dlpack", None) or torch.utils.dlpack.from_dlpack


def _pool_enabled() -> bool:
    return _C is not None and env_switch("KLANNEAL_GRAD_POOL", True)


def _grad_recon_buffer(
    recon_input: torch.Tensor, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """An uninitialised contiguous tensor of recon_input's shape for its gradient
    (dtype: grad_dtype(recon_input.dtype), which the caller may pass).

    Large CPU buffers come from the pool: the tensor's deleter gives the
    buffer back for the next step's call instead of unmapping it.
    """
    if dtype is None:
        dtype = grad_dtype(recon_input.dtype)
    nbytes = recon_input.numel() * dtype.itemsize
    if nbytes >= POOL_MIN_BYTES and recon_input.is_cpu and _pool_enabled():
        capsule = _C.pooled_empty(list(recon_input.shape), DTYPE_CODES[dtype])
        return _FROM_CAPSULE(capsule)
    if not recon_input.is_contiguous():
        return torch.empty_like(recon_input, dtype=dtype, memory_format=torch.contiguous_format)
    if dtype is recon_input.dtype:  # empty_like keeps the (contiguous) strides
        return torch.empty_like(recon_input)
    return torch.empty_like(recon_input, dtype=dtype)


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


_FUNCTION_MODE_ENABLED = torch._C._is_torch_function_mode_enabled


def _scalar_outputs(
    mu: torch.Tensor,
    reduction: str,
    device: Optional[torch.device],
    dtype: torch.dtype = torch.float64,
    kl_weight: bool = True,
) -> tuple[Optional[torch.Tensor], ...]:
    """Uninitialised loss, recon, kl, kl_per_dim, beta and kl_weight (None
    without `kl_weight`) in `dtype` on `device` (None: the CPU).

    What a small eager call pays: torch.empty's keyword arguments cost
    about a microsecond each, so only those that differ from the defaults
    are passed; a shape goes as ``size=`` (a positional tuple is first tried
    against empty's other overloads, slower still).
    """
    batch, latent_dim = mu.shape
    shape = (batch,) if reduction == "none" else ()
    empty = torch.empty
    # A default device (torch.set_default_device, `with torch.device(...)`)
    # is a torch function mode: with one active, the CPU kernel's outputs
    # are placed on the CPU explicitly (it would write through their pointers).
    function_mode = _FUNCTION_MODE_ENABLED()
    if device is None and dtype is torch.get_default_dtype() and not function_mode:
        return (
            empty(size=shape), empty(size=shape), empty(size=shape), empty(latent_dim),
            empty(size=()), empty(size=shape) if kl_weight else None,
        )  # fmt: skip
    kw: dict[str, Any] = {}
    if dtype != torch.get_default_dtype():
        kw["dtype"] = dtype
    if device is not None:
        kw["device"] = device
    elif function_mode:
        kw["device"] = "cpu"
    return (
        empty(size=shape, **kw),
        empty(size=shape, **kw),
        empty(size=shape, **kw),
        empty(latent_dim, **kw),
        empty(size=(), **kw),
        empty(size=shape, **kw) if kl_weight else None,
    )


def _op_scalars(mu: torch.Tensor, reduction: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The op's six scalar outputs, float64 (kl_weight included)."""
    on = None if device.type == "cpu" else device
    return tuple(t for t in _scalar_outputs(mu, reduction, on) if t is not None)


def _latent_grads(
    mu: torch.Tensor, need: tuple[bool, ...], dtype: Optional[torch.dtype] = None
) -> tuple[Optional[torch.Tensor], ...]:
    """Uninitialised grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar (in
    `dtype`, by default grad_dtype(mu.dtype), mu's contiguous layout), None
    for those not asked for (need: the 5 flags). empty_like without keyword
    arguments where it can: each costs about a microsecond."""
    if dtype is None:
        dtype = grad_dtype(mu.dtype)
    if dtype is mu.dtype and mu.is_contiguous():
        empty = torch.empty_like
        return (
            empty(mu) if need[1] else None, empty(mu) if need[2] else None,
            empty(mu) if need[3] else None, empty(mu) if need[4] else None,
        )  # fmt: skip
    kw: dict[str, Any] = {} if dtype == mu.dtype else {"dtype": dtype}
    if not mu.is_contiguous():
        kw["memory_format"] = torch.contiguous_format
    return tuple(torch.empty_like(mu, **kw) if n else None for n in need[1:])


def _run_kernel(
    opts: ElboOptions,
    inputs: tuple[Optional[torch.Tensor], ...],
    scalars: tuple[Optional[torch.Tensor], ...],
    grads: Sequence[Optional[torch.Tensor]],
    floats: list[float],
    ints: list[int],
) -> None:
    """Runs recon_input's device's kernel on allocated outputs (both the op and
    the eager path): value checks -> sizes and pointers -> launch.

    inputs: recon_input, target, mu, logvar, prior_mu, prior_logvar,
    global_kl_per_dim, beta, step (None where absent); scalars: loss, recon,
    kl, kl_per_dim, beta_out, kl_weight (kl_weight may be None), all of the
    loss's dtype (float64, or float32 on the CPU: its out_dtype); grads: the
    gradients of recon_input, mu, logvar, prior_mu, prior_logvar (None where
    not asked for). The packed lists go to C++ as they are.
    """
    recon_input, target, mu, logvar, prior_mu, prior_logvar, global_mean, beta, step = inputs
    assert recon_input is not None and target is not None
    assert mu is not None and logvar is not None
    loss, recon, kl, kl_per_dim, beta_out, kl_weight = scalars
    assert loss is not None and recon is not None and kl is not None
    assert kl_per_dim is not None and beta_out is not None
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
        torch.get_num_threads(), codes[loss.dtype],
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
        loss.data_ptr(), recon.data_ptr(), kl.data_ptr(), kl_per_dim.data_ptr(),
        beta_out.data_ptr(), 0 if kl_weight is None else kl_weight.data_ptr(),
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
    inputs = (
        i.recon_input, i.target, i.mu, i.logvar, i.prior_mu, i.prior_logvar,
        i.global_kl_per_dim, i.beta, i.step,
    )  # fmt: skip
    _run_kernel(args.options, inputs, scalars, grads, i.floats, i.ints)
    return scalars, grads


def _schema_outputs(
    scalars: tuple[torch.Tensor, ...], grads: tuple[Optional[torch.Tensor], ...], inplace: bool
) -> Outputs:
    """The op's outputs: loss, recon, kl, kl_per_dim, beta, [grad_recon,] grad_mu,
    grad_logvar, kl_weight, grad_prior_mu, grad_prior_logvar (an empty tensor
    for a gradient not asked for)."""
    full = tuple(scalars[0].new_empty(0, dtype=torch.float32) if g is None else g for g in grads)
    return scalars[:5] + full[1 if inplace else 0 : 3] + scalars[5:] + full[3:]


def _native_kernel(*args: Any, **kwargs: Any) -> Outputs:
    i = OpInputs(*args, **kwargs)
    need_recon = ElboOptions.unpack(i.floats, i.ints).need_grads[0]
    grad_recon = _grad_recon_buffer(i.recon_input) if need_recon else None
    return _schema_outputs(*_launch(i, grad_recon), inplace=False)


def _native_inplace_kernel(*args: Any, **kwargs: Any) -> InplaceOutputs:
    i = OpInputs(*args, **kwargs)
    return _schema_outputs(*_launch(i, i.recon_input), inplace=True)


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
    return _schema_outputs(*_reference_outputs(OpInputs(*args, **kwargs)), inplace=False)


def _reference_inplace_kernel(*args: Any, **kwargs: Any) -> InplaceOutputs:
    i = OpInputs(*args, **kwargs)
    scalars, grads = _reference_outputs(i)
    i.recon_input.copy_(grads[0].to(i.recon_input.dtype))
    return _schema_outputs(scalars, grads, inplace=True)


# ---- registration ------------------------------------------------------------------

_ARGS = (
    "Tensor recon_input, Tensor target, Tensor mu, Tensor logvar, Tensor? beta, Tensor? step, "
    "float[] floats, int[] ints, Tensor? prior_mu=None, Tensor? prior_logvar=None, "
    "Tensor? global_kl_per_dim=None"
)
torch.library.define("klanneal::elbo_loss", f"({_ARGS}) -> ({', '.join(['Tensor'] * 11)})")
torch.library.define(
    "klanneal::elbo_loss_inplace",
    f"({_ARGS.replace('Tensor recon_input', 'Tensor(a!) recon_input')}) -> "
    f"({', '.join(['Tensor'] * 10)})",
)
elbo_loss_op = torch.ops.klanneal.elbo_loss.default
elbo_loss_inplace_op = torch.ops.klanneal.elbo_loss_inplace.default

torch.library.impl("klanneal::elbo_loss", "default")(_reference_kernel)
torch.library.impl("klanneal::elbo_loss_inplace", "default")(_reference_inplace_kernel)
if _C is not None:
    for _device in ("cpu", "cuda"):
        torch.library.impl("klanneal::elbo_loss", _device)(_native_kernel)
        torch.library.impl("klanneal::elbo_loss_inplace", _device)(_native_inplace_kernel)


def _fake_outputs(i: OpInputs, inplace: bool) -> Outputs:
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
    return _schema_outputs(scalars, (grad_recon,) + latent, inplace)


@torch.library.register_fake("klanneal::elbo_loss")  # type: ignore[untyped-decorator]
def _elbo_loss_fake(*args: Any, **kwargs: Any) -> Outputs:
    return _fake_outputs(OpInputs(*args, **kwargs), inplace=False)


@torch.library.register_fake("klanneal::elbo_loss_inplace")  # type: ignore[untyped-decorator]
def _elbo_loss_inplace_fake(*args: Any, **kwargs: Any) -> InplaceOutputs:
    return _fake_outputs(OpInputs(*args, **kwargs), inplace=True)


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


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    i = OpInputs(*inputs)
    _save_context(ctx, i)
    # grad_recon, grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar, kl_weight.
    ctx.save_for_backward(*output[5:8], *output[9:11], output[8])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx: Any, grad_loss: Optional[torch.Tensor], *unused: Any) -> tuple[Any, ...]:
    return tuple(_backward_common(ctx, ctx, grad_loss))


torch.library.register_autograd("klanneal::elbo_loss", _backward, setup_context=_setup_context)


def _kernels(device: torch.device) -> tuple[Any, Any]:
    if native_available(device):
        return _native_kernel, _native_inplace_kernel
    return _reference_kernel, _reference_inplace_kernel


class EagerPlan:
    """What an eager call's requires-grad flags, dtypes and reduction decide,
    worked out once per combination (``eager_plan``, a cache of at most
    2^7 x 4 x 4 x 3 keys).

    asked: the 5 gradients the kernel computes (recon_input, mu, logvar,
    prior_mu, prior_logvar); tracked: which of eager_elbo's 7 inputs
    autograd tracks; saved_index: the saved gradient (ctx.saved_tensors
    index) of each tracked input, for the backward that returns them as they
    are, or None where one needs more than that (a target or beta gradient,
    or fp16/bf16 inputs, whose fp32 gradients are cast); dtype: the results'
    dtype; the gradients' dtypes. It is also ``_backward_common``'s state:
    ``scaled`` gives the copy that records a backward's in-place scaling.
    """

    __slots__ = (
        "asked", "tracked", "saved_index", "dtype", "recon_grad_dtype", "latent_grad_dtype",
        "reduction", "recon_dtype", "latent_dtype", "grad_recon_input", "grad_target",
        "grad_beta", "scaled_in_place",
    )  # fmt: skip

    def __init__(
        self,
        requires: tuple[bool, ...],
        recon_dtype: torch.dtype,
        latent_dtype: torch.dtype,
        reduction: str,
    ) -> None:
        """requires: whether autograd tracks recon_input, target, mu, logvar,
        beta, prior_mu, prior_logvar (all False with grad mode off). A
        gaussian/mse target that requires grad gets -grad_recon."""
        self.asked = eager_need(requires)
        self.tracked = tuple(k for k, r in enumerate(requires) if r)
        index = (0, None, 1, 2, None, 3, 4)
        saved = [index[k] for k in self.tracked]
        full = recon_dtype in FULL_PRECISION and latent_dtype in FULL_PRECISION
        self.saved_index = None if None in saved or not full else tuple(saved)
        self.dtype = result_dtype(recon_dtype, latent_dtype)
        self.recon_grad_dtype = grad_dtype(recon_dtype)
        self.latent_grad_dtype = grad_dtype(latent_dtype)
        self.reduction = reduction
        self.recon_dtype, self.latent_dtype = recon_dtype, latent_dtype
        self.grad_recon_input, self.grad_target = requires[0], requires[1]
        self.grad_beta = requires[4]
        self.scaled_in_place = False

    def scaled(self) -> EagerPlan:
        """A copy for one backward to mark (the cached plan is shared by calls)."""
        copy = object.__new__(EagerPlan)
        for name in EagerPlan.__slots__:
            setattr(copy, name, getattr(self, name))
        return copy


eager_plan = functools.cache(EagerPlan)


def eager_need(requires: tuple[bool, ...]) -> tuple[bool, bool, bool, bool, bool]:
    """The gradients the kernel computes (recon_input, mu, logvar, prior_mu,
    prior_logvar) for the requires-grad flags of eager_elbo's inputs: a
    gaussian/mse target that requires grad gets -grad_recon."""
    return (requires[0] or requires[1], requires[2], requires[3], requires[5], requires[6])


def eager_elbo(
    plan: EagerPlan,
    options: ElboOptions,
    inputs: tuple[Optional[torch.Tensor], ...],
    floats: list[float],
    ints: list[int],
    step: Optional[torch.Tensor],
    global_kl_per_dim: Optional[torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """One eager elbo_loss call: runs the device kernel, then attaches the
    loss to autograd (ElboFunction) if any input is tracked.

    inputs: recon_input, target, mu, logvar, beta, prior_mu, prior_logvar
    (None where absent, all contiguous); plan: eager_plan of their
    requires-grad flags; floats, ints: the packed options, with plan.asked
    the gradients asked for. Returns loss, recon, kl, kl_per_dim, beta in
    plan.dtype: written in that dtype on the CPU (out_dtype), in float64 on
    CUDA and cast.
    """
    recon_input, target, mu, logvar, beta, prior_mu, prior_logvar = inputs
    assert recon_input is not None and target is not None
    assert mu is not None and logvar is not None
    need = plan.asked
    on_cpu = recon_input.is_cpu
    if on_cpu:
        scalars = _scalar_outputs(mu, plan.reduction, None, plan.dtype, plan.grad_beta)
    else:
        scalars = _scalar_outputs(mu, plan.reduction, recon_input.device, kl_weight=plan.grad_beta)
    grads = (
        _grad_recon_buffer(recon_input, plan.recon_grad_dtype) if need[0] else None,
        *_latent_grads(mu, need, plan.latent_grad_dtype),
    )
    kernel_inputs = (
        recon_input, target, mu, logvar, prior_mu, prior_logvar, global_kl_per_dim, beta, step,
    )  # fmt: skip
    _run_kernel(options, kernel_inputs, scalars, grads, floats, ints)
    loss, recon, kl, kl_per_dim, beta_out, kl_weight = scalars
    assert loss is not None and recon is not None and kl is not None
    assert kl_per_dim is not None and beta_out is not None
    if not on_cpu:
        out = plan.dtype
        loss, recon, kl = loss.to(out), recon.to(out), kl.to(out)
        kl_per_dim, beta_out = kl_per_dim.to(out), beta_out.to(out)
    if plan.tracked:
        # Function.apply's C part (APPLY); only the tracked inputs are its
        # arguments, unwrapped as Function.apply does (a tensor that escaped
        # a finished torch.func transform).
        unwrap = UNWRAP_IF_DEAD
        tracked = [unwrap(inputs[k]) for k in plan.tracked]
        loss = APPLY((loss, (*grads, kl_weight), plan), *tracked)
    return loss, recon, kl, kl_per_dim, beta_out


class ElboFunction(torch.autograd.Function):
    """Eager autograd of klanneal.elbo_loss: attaches the loss of a kernel that
    already ran (eager_elbo) and returns the gradients it computed.

    Its arguments are (loss, the gradients, the EagerPlan) and, of the
    inputs, only those that require grad (EagerPlan.tracked): each argument
    of an autograd.Function costs time on every call, which is what small
    batches pay for. For the same reason the loss is the only output: recon,
    kl, kl_per_dim and beta are plain tensors.
    """

    @staticmethod
    def forward(ctx: Any, state: tuple[Any, ...], *tracked: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = state[0]
        saved, plan = state[1], state[2]
        ctx.set_materialize_grads(False)
        # grad_recon, grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar, kl_weight.
        ctx.save_for_backward(*saved)
        ctx.plan = plan
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Optional[torch.Tensor]) -> tuple[Any, ...]:
        plan = ctx.plan
        index = plan.saved_index
        if (
            index is not None
            and not plan.scaled_in_place
            and type(grad_loss) is torch.Tensor
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and _is_one(grad_loss)
        ):
            # The common case (loss.backward() on a scalar loss): the
            # gradients of the forward pass, as they are (so a later backward
            # through a retained graph must not scale them in place).
            ctx.handed_out = True
            saved = ctx.saved_tensors
            return (None, *[saved[k] for k in index])
        ctx.plan = state = plan.scaled()
        out = _backward_common(ctx, state, grad_loss)
        # OpInputs order -> eager_elbo's inputs order, then the tracked ones.
        full = (out[0], out[1], out[2], out[3], out[4], out[8], out[9])
        return (None, *[full[k] for k in plan.tracked])


def _c_apply() -> Any:
    """torch.autograd.Function's C-level apply bound to ElboFunction, or its
    Python apply where torch's class layout is not the expected one."""
    apply = getattr(super(torch.autograd.Function, ElboFunction), "apply", None)
    if isinstance(apply, types.BuiltinMethodType) and apply.__self__ is ElboFunction:
        return apply
    return ElboFunction.apply


# eager_elbo calls ElboFunction through APPLY, the C apply of
# torch.autograd.Function: what Function.apply adds in Python is for
# torch.func transforms, and elbo_loss takes the reference path whenever one
# is active; the inputs are unwrapped (UNWRAP_IF_DEAD) as Function.apply
# does.
APPLY = _c_apply()
UNWRAP_IF_DEAD = getattr(torch._C._functorch, "unwrap_if_dead", lambda t: t)


class _ElboInplace(torch.autograd.Function):
    """Autograd of the inplace op: the logits buffer becomes its own gradient.

    recon_input is not marked dirty: its autograd history stays that of the
    decoder output it is, so that views (logits.view(B, T, V)) work too (a
    Function that marks a view dirty may return only one tensor). The
    mutation bumps recon_input's version counter (the op declares it; the
    eager path bumps it by hand): a node that saved the logits for its own
    backward reports the overwrite.
    """

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[torch.Tensor, ...]:
        i = OpInputs(*inputs)
        if torch.compiler.is_compiling():
            outs = elbo_loss_inplace_op(*inputs)
        else:
            kernel = _kernels(i.recon_input.device)[1]
            outs = kernel(*inputs)
            torch.autograd.graph.increment_version(i.recon_input)
        _save_context(ctx, i)
        # outs: 5 scalars, grad_mu, grad_logvar, kl_weight, grad_prior_mu, grad_prior_logvar.
        ctx.save_for_backward(i.recon_input, outs[5], outs[6], outs[8], outs[9], outs[7])
        ctx.mark_non_differentiable(*outs[1:5])
        return tuple(outs[:5])

    @staticmethod
    def backward(ctx: Any, grad_loss: Optional[torch.Tensor], *unused: Any) -> tuple[Any, ...]:
        return tuple(_backward_common(ctx, ctx, grad_loss))


def elbo_loss_traced(*args: Any) -> tuple[torch.Tensor, ...]:
    """loss, recon, kl, kl_per_dim, beta (float64) of the op, with its
    registered autograd: the path under torch.compile and on devices without
    a native kernel (the op's default kernel is the reference)."""
    return tuple(elbo_loss_op(*args)[:5])


def elbo_loss_inplace(*args: Any) -> tuple[torch.Tensor, ...]:
    """The inplace op with autograd: loss, recon, kl, kl_per_dim, beta."""
    return tuple(_ElboInplace.apply(*args))  # type: ignore[no-untyped-call]
