"""The fused ELBO op's call layout: option packing, input and output tuples, dtypes.

The scalar options travel to the op as two lists, ``floats`` and ``ints``,
whose slot layout is defined in C++ (csrc/include/klanneal/elbo_layout.h) and
exported by ``_C.elbo_layout()``; :class:`ElboOptions` is the only code that
packs or reads them, by name. :class:`OpInputs` and :class:`Outputs` name
the op's schema positions: no code reads them by number.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import torch

from klanneal import _validate

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
        beta: Any,
        capacity: Any,
        step_tensor: bool,
        need: tuple[bool, bool, bool, bool, bool],
        traced: bool = False,
    ) -> tuple[list[float], list[int]]:
        """``pack`` for one call from a template kept per `need` and
        capacity-or-not: the per-call cost is a list copy and a few slot
        writes.

        beta, capacity: klanneal._call.Weight (capacity None: the plain KL
        term); step_tensor: the call passes a step tensor, at which the
        kernel evaluates beta's schedule (a constant one for a beta value:
        resolve_beta) and the capacity's; need: need_grad_recon ...
        need_grad_prior_logvar; traced: torch.compile is tracing (no cache).
        """
        template = self._template(need, capacity is None, traced)
        floats = template[0].copy()
        floats[_BETA_SLOT] = beta.value
        schedule = beta.schedule
        if schedule is None and step_tensor and beta.tensor is None:
            schedule = constant_schedule(beta.value)
        if schedule is not None:
            floats[_SCHEDULE_SLOT : _SCHEDULE_SLOT + _N_SCHEDULE] = schedule
        if capacity is not None:
            params = capacity.schedule
            if params is None:
                params = constant_schedule(capacity.value)
            floats[_CAPACITY_SLOT : _CAPACITY_SLOT + _N_SCHEDULE] = params
        return floats, template[1].copy()

    def packed_value(
        self, beta_value: float, need: tuple[bool, bool, bool, bool, bool]
    ) -> tuple[list[float], list[int]]:
        """``packed`` for an eager call with a beta value and nothing else
        per call (no step tensor, no capacity): a list copy and one write."""
        template = self._templates.get((need, True)) or self._template(need, True, False)
        floats = template[0].copy()
        floats[_BETA_SLOT] = beta_value
        return floats, template[1].copy()

    def _template(
        self, need: tuple[bool, ...], plain_kl: bool, traced: bool
    ) -> tuple[list[float], list[int]]:
        """pack()'s result for these gradients asked for and a capacity (not
        plain_kl) or not, kept per key (built anew while tracing)."""
        key = (need, plain_kl)
        template = None if traced else self._templates.get(key)
        if template is None:
            template = self.pack(
                capacity=None if plain_kl else NO_SCHEDULE,
                need_grad_recon=need[0], need_grad_mu=need[1], need_grad_logvar=need[2],
                need_grad_prior_mu=need[3], need_grad_prior_logvar=need[4],
            )  # fmt: skip
            if not traced:
                self._templates[key] = template
        return template

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


class Outputs(NamedTuple):
    """klanneal::elbo_loss's outputs in schema order: the five results (float64),
    the gradients computed in the forward pass (an empty tensor for one not
    asked for) and d loss / d beta per loss element (kl_weight)."""

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor
    beta: torch.Tensor
    grad_recon: torch.Tensor
    grad_mu: torch.Tensor
    grad_logvar: torch.Tensor
    kl_weight: torch.Tensor
    grad_prior_mu: torch.Tensor
    grad_prior_logvar: torch.Tensor


class Results(NamedTuple):
    """The five results every path of klanneal.elbo_loss returns (ELBOOutput's fields)."""

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor
    beta: torch.Tensor


# What the op's autograd saves for backward, in this order: the gradients of
# recon_input, mu, logvar, prior_mu, prior_logvar, then kl_weight.
SAVED = ("grad_recon", "grad_mu", "grad_logvar", "grad_prior_mu", "grad_prior_logvar")


class InplaceOutputs(NamedTuple):
    """klanneal::elbo_loss_inplace's outputs: Outputs without grad_recon (written
    over recon_input)."""

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor
    beta: torch.Tensor
    grad_mu: torch.Tensor
    grad_logvar: torch.Tensor
    kl_weight: torch.Tensor
    grad_prior_mu: torch.Tensor
    grad_prior_logvar: torch.Tensor


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
