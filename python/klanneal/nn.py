"""klanneal.nn.ELBOLoss: the fused ELBO loss as an nn.Module with a step counter."""

from __future__ import annotations

import math
import numbers
import sys
import types
import warnings
from typing import Any, Optional, Union

import torch
from torch import nn

from klanneal import _validate
from klanneal._call import elbo_call
from klanneal._controller import KLController, controller_kl
from klanneal._host_schedules import as_schedule
from klanneal._schedule_args import _tensor_step
from klanneal._sizing import ScheduleLengthWarning, cycles_end, past_end_message
from klanneal.kl_terms import KLTerm
from klanneal.likelihoods import Likelihood
from klanneal.likelihoods import resolve as resolve_likelihood
from klanneal.linear import linear_elbo_loss
from klanneal.reference import ELBOOutput
from klanneal.schedules import Schedule

__all__ = ["ELBOLoss", "LinearELBOLoss"]


class ELBOLoss(nn.Module):
    """Negative ELBO with a KL weight that follows a schedule.

    The training step is held in an int64 buffer (``current_step``), so it
    moves with ``.to(device)`` and is saved in the model's state_dict; the
    schedule is evaluated from that tensor inside the op, so under
    torch.compile a changing step causes no recompiles. Call ``step()`` once
    per optimizer step::

        criterion = ELBOLoss(schedule=klanneal.schedules.Cyclical(...))
        ...
        out = criterion(logits, tokens, mu, logvar)
        out.loss.backward()
        optimizer.step()
        criterion.step()

    The capacity objective (Burgess et al. 2018) steps with the same counter::

        criterion = ELBOLoss(schedule=4.0, capacity=Capacity(c_max=25, warmup_steps=10_000))

    The state_dict records the schedules' ``state_dict()`` next to the step:
    loading it into an ELBOLoss with different schedules raises (strict),
    naming the fields that differ, or warns and keeps this loss's schedules
    (``strict=False``). A model that gains an ELBOLoss submodule gains its
    ``current_step`` and ``_extra_state`` keys (docs/elbo.md shows how to
    load older checkpoints). ``forward`` warns once if it runs 1000 times
    in training mode without a ``step()``: the schedule would be frozen;
    and once (``klanneal.schedules.ScheduleLengthWarning``) the first time
    it runs in training mode past the end of a cyclical schedule's cycles.

    With a :class:`klanneal.schedules.KLController` as the schedule, every
    call in training mode feeds the controller this call's detached KL per
    example (``out.kl`` under "batchmean", ``out.kl / B`` under "sum", its
    mean under "none"); the next call uses the beta it gives. Its running
    state is saved in the state_dict with the schedules and restored on load.

    Args:
        schedule: a klanneal.schedules object, a list / 1-D array of beta per
            step (a klanneal.schedules.FromArray), or a float for a constant beta
            (not a Capacity: pass that as ``capacity``).
        capacity: None, a float or a schedule: the capacity C of
            ``klanneal.elbo_loss``, evaluated at the same step.
        likelihood, reduction, free_bits, free_bits_mode, ignore_index,
            gaussian_var, free_bits_group, inplace, validate: as in
            ``klanneal.elbo_loss``.

    Raises:
        TypeError, ValueError: an invalid option (checked here, at construction).
    """

    current_step: torch.Tensor
    # forward calls in training mode without a step() before the warning.
    STEPLESS_CALLS_WARNING = 1000
    # current_step as an int, counted by step() (None: read it when needed),
    # so that the past-the-end warning costs no device sync per call.
    _host_step: Optional[int] = None
    _warned_past_end = False

    def __init__(
        self,
        schedule: Union[float, Schedule] = 1.0,
        *,
        capacity: Union[None, float, Schedule] = None,
        likelihood: str = "categorical",
        reduction: str = "batchmean",
        free_bits: float = 0.0,
        free_bits_mode: str = "batch",
        ignore_index: int = -100,
        gaussian_var: float = 1.0,
        free_bits_group: Any = None,
        inplace: bool = False,
        validate: bool = True,
    ) -> None:
        super().__init__()
        given = likelihood
        likelihood, gaussian_var = resolve_likelihood(likelihood, gaussian_var)
        _validate.check_options(
            likelihood, reduction, free_bits, free_bits_mode, ignore_index, gaussian_var,
            with_params=isinstance(given, Likelihood),
        )  # fmt: skip
        if isinstance(given, Likelihood) and given.tensors():
            likelihood = given  # kept whole: its tensors (a learnable theta) are read per call
        schedule = as_schedule(schedule)  # a list or 1-D array of values: FromArray
        _validate.check_not_capacity(schedule, "schedule")
        _validate.check_capacity(capacity)
        if capacity is not None and not _validate.is_schedule(capacity):
            # A plain float in the state_dict (torch.load's weights_only
            # refuses numpy scalars).
            capacity = float(capacity)  # type: ignore[arg-type]  # a real number (checked)
        if _validate.is_schedule(schedule):
            # Here rather than at the step where it first goes negative.
            _validate.check_schedule_range(schedule, "schedule")
        else:
            if isinstance(schedule, bool) or not isinstance(schedule, numbers.Real):
                raise TypeError(
                    "schedule must be a klanneal.schedules object or a float, got "
                    f"{type(schedule).__name__}"
                )
            value = float(schedule)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"schedule: a constant beta must be finite and >= 0, got {value}")
            schedule = value
        self.schedule = schedule
        self.capacity = capacity
        self.free_bits_group = free_bits_group
        self.likelihood = likelihood
        self.reduction = reduction
        self.free_bits = float(free_bits)
        self.free_bits_mode = free_bits_mode
        self.ignore_index = ignore_index
        self.gaussian_var = float(gaussian_var)
        self.inplace = _validate.check_flag("inplace", inplace)
        self.validate = _validate.check_flag("validate", validate)
        self.register_buffer("current_step", torch.zeros((), dtype=torch.int64))
        self._calls_since_step = 0
        self._warned_stepless = False
        self._schedule_mismatch: Optional[str] = None
        self.register_load_state_dict_post_hook(  # type: ignore[no-untyped-call]
            ELBOLoss._report_schedule_mismatch
        )

    def forward(
        self,
        recon_input: torch.Tensor,
        target: torch.Tensor,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        prior_mu: Optional[torch.Tensor] = None,
        prior_logvar: Optional[torch.Tensor] = None,
        prior: Optional[KLTerm] = None,
    ) -> ELBOOutput:
        """Loss at the current step; see ``klanneal.elbo_loss`` for shapes and the result.

        A likelihood whose parameters the decoder computes per batch (a [B, G]
        theta): set ``criterion.likelihood = NegativeBinomial(theta)`` before
        the call, or call ``klanneal.elbo_loss`` with the same arguments.
        """
        o = self._step_options()
        out = elbo_call(
            recon_input, target, mu, logvar, self.schedule, o["step"], self.likelihood,
            self.reduction, self.free_bits, self.free_bits_mode, self.ignore_index,
            self.gaussian_var, prior_mu, prior_logvar, self.capacity, self.free_bits_group,
            self.inplace, self.validate, prior,
        ).run()  # fmt: skip
        self._feed_controller(out, mu)
        return out

    def _feed_controller(self, out: ELBOOutput, mu: torch.Tensor) -> None:
        """A KLController schedule gets this training call's KL per example."""
        if self.training and isinstance(self.schedule, KLController):
            self.schedule.update(controller_kl(out.kl, self.reduction, mu.shape[0]))

    def _step_options(self) -> dict[str, Any]:
        """The options both forwards pass on: the step (when a schedule needs it),
        capacity, reduction, free bits, ignore_index, validate. Counts a
        training call towards the missing-step() warning."""
        scheduled = _validate.is_schedule(self.schedule) or _validate.is_schedule(self.capacity)
        if self.training and scheduled and not torch.compiler.is_compiling():
            # A controller moves with the KL it is fed, not with step().
            if _validate.is_schedule(self.capacity) or not isinstance(self.schedule, KLController):
                self._count_stepless_call()
            if not self._warned_past_end:
                self._check_schedule_end()
        return dict(
            step=self.current_step if scheduled else None,
            capacity=self.capacity,
            free_bits_group=self.free_bits_group,
            reduction=self.reduction,
            free_bits=self.free_bits,
            free_bits_mode=self.free_bits_mode,
            ignore_index=self.ignore_index,
            validate=self.validate,
        )

    def _count_stepless_call(self) -> None:
        # Through __dict__: nn.Module.__setattr__ costs microseconds per call.
        self.__dict__["_calls_since_step"] += 1
        if self._calls_since_step >= self.STEPLESS_CALLS_WARNING and not self._warned_stepless:
            self._warned_stepless = True
            warnings.warn(
                f"ELBOLoss: forward ran {self._calls_since_step} times in training mode without "
                "a step(); the schedule stays at step "
                f"{int(self.current_step)}. Call criterion.step() once per optimizer step "
                "(or set_step(n)).",
                stacklevel=3,
            )

    def _check_schedule_end(self) -> None:
        schedule = self.schedule
        end = cycles_end(schedule)
        if end is None or not isinstance(schedule, Schedule):
            return
        if self._host_step is None:  # once (a sync on GPU); then step() counts
            self.__dict__["_host_step"] = int(self.current_step)
        step = self._host_step
        if step is not None and step >= end:
            self._warned_past_end = True
            warnings.warn(
                past_end_message(schedule, step, end), ScheduleLengthWarning, stacklevel=3
            )

    @torch.no_grad()
    def step(self) -> None:
        """Advances the schedule by one step (call once per optimizer step)."""
        self.current_step.add_(1)
        self._calls_since_step = 0
        if self._host_step is not None:
            self.__dict__["_host_step"] = self._host_step + 1

    @torch.no_grad()
    def set_step(self, step: Union[int, torch.Tensor]) -> None:
        """Moves the schedule to `step` (an int, or a 0-d integer tensor, in
        [0, 2**63)), e.g. when resuming without a state_dict."""
        if isinstance(step, torch.Tensor):
            step = _tensor_step(step, torch)  # a 0-d integer tensor, checked
        value = _validate.as_step(step)
        if not 0 <= value < 2**63:
            raise ValueError(f"step must be >= 0 and < 2**63 (the int64 step counter), got {value}")
        self.current_step.fill_(value)
        self._calls_since_step = 0
        self._host_step = value

    @property
    def beta(self) -> float:
        """The KL weight at the current step (reads the step buffer: a sync on GPU)."""
        if _validate.is_schedule(self.schedule):
            return float(self.schedule(int(self.current_step)))
        return float(self.schedule)  # type: ignore[arg-type]  # a real number

    def _schedules_state(self) -> dict[str, Any]:
        def describe(s: Any) -> Any:
            if s is None or not _validate.is_schedule(s):
                return s
            if isinstance(s, KLController):  # its arguments; the running state apart
                return s.state_dict(running=False)
            return s.state_dict()  # field names: a mismatch can name what differs

        return {"schedule": describe(self.schedule), "capacity": describe(self.capacity)}

    def get_extra_state(self) -> dict[str, Any]:
        """The schedules' ``state_dict()``s, saved in the state_dict next to
        ``current_step`` (and a KLController's running state, as "controller")."""
        state = self._schedules_state()
        if isinstance(self.schedule, KLController):
            state["controller"] = self.schedule.state_dict()["state"]
        return state

    def set_extra_state(self, state: Any) -> None:
        """Checked in ``_load_from_state_dict`` (which reports a mismatch)."""

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        saved = state_dict.get(prefix + "_extra_state")
        self._host_step = None  # current_step is about to be overwritten
        running = saved.get("controller") if isinstance(saved, dict) else None
        if isinstance(saved, dict) and running is not None:
            saved = {key: value for key, value in saved.items() if key != "controller"}
        if saved is not None:
            differences = _schedule_differences(saved, self._schedules_state())
            if running is not None and not differences and isinstance(self.schedule, KLController):
                config = self.schedule.state_dict(running=False)
                self.schedule.load_state_dict({**config, "state": running})
            if differences:
                message = (
                    f"{prefix[:-1] or 'ELBOLoss'}: the checkpoint was saved with different "
                    f"schedules ({'; '.join(differences)})"
                )
                # torch passes strict=True to every module's loader and applies
                # the caller's `strict` to the key lists only afterwards: the
                # caller's value is read from its load_state_dict frame.
                caller_strict, stacklevel = _load_state_dict_call()
                if caller_strict:
                    error_msgs.append(
                        f"{message}: its current_step would index another schedule. Load with "
                        "strict=False to keep this loss's schedules and load only the step, or "
                        "construct the ELBOLoss with the checkpoint's schedules to resume them"
                    )
                else:
                    warnings.warn(
                        f"{message}: loaded its current_step and kept this loss's schedules "
                        "(construct the ELBOLoss with the checkpoint's to resume them)",
                        stacklevel=stacklevel,
                    )
                if caller_strict is None:
                    # Another loader (no nn.Module.load_state_dict on the
                    # stack): the post-hook lists the key as unexpected,
                    # which fails a strict load only.
                    self._schedule_mismatch = prefix + "_extra_state"
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @staticmethod
    def _report_schedule_mismatch(module: nn.Module, incompatible: Any) -> None:
        key = getattr(module, "_schedule_mismatch", None)
        if key is None:
            return
        module._schedule_mismatch = None  # type: ignore[assignment]
        incompatible.unexpected_keys.append(key)

    def extra_repr(self) -> str:
        return (
            f"schedule={self.schedule!r}, capacity={self.capacity!r}, "
            f"likelihood={self.likelihood!r}, "
            f"reduction={self.reduction!r}, free_bits={self.free_bits}, "
            f"free_bits_mode={self.free_bits_mode!r}, inplace={self.inplace}"
        )


class LinearELBOLoss(ELBOLoss):
    """``klanneal.linear_elbo_loss`` as a module: the decoder's output layer and the
    negative ELBO in one chunked op, the [N, V] logits never built.

    The ``ELBOLoss`` counterpart (the same step buffer, ``step()``, ``beta``
    and state_dict, so ``klanneal.integrations.lightning.KLAnnealing`` steps
    it too), called with the *input* of the output layer instead of its
    logits::

        criterion = LinearELBOLoss(model.out, klanneal.schedules.Cyclical(total_steps))
        ...
        hidden, mu, logvar = model.features(batch)       # hidden: [B, T, H]
        out = criterion(hidden, tokens, mu, logvar)      # = ELBOLoss()(model.out(hidden), ...)
        out.loss.backward()                               # grads of hidden, model.out, mu, logvar
        optimizer.step()
        criterion.step()

    The layer is held by reference, not registered as a submodule: its
    weight and bias are read at every call (so they follow the optimizer and
    the model's ``.to()``), stay the model's parameters and are not saved a
    second time in the criterion's state_dict.

    Args:
        linear: the decoder's output layer (an ``nn.Linear`` with V outputs),
            or None with ``weight``.
        schedule: a klanneal.schedules object, a list / 1-D array of beta per
            step (a klanneal.schedules.FromArray), or a float for a constant beta.
        weight: [V, H] projection instead of ``linear`` (e.g. tied embeddings).
        bias: [V] or None; only with ``weight``.
        capacity, reduction, free_bits, free_bits_mode, ignore_index,
            free_bits_group, chunk_size, validate: as in
            ``klanneal.linear_elbo_loss`` (and ``ELBOLoss``).

    Raises:
        TypeError, ValueError: an invalid option, neither or both of
            ``linear`` and ``weight``, or ``bias`` without ``weight``
            (checked here, at construction).
    """

    def __init__(
        self,
        linear: Optional[nn.Linear] = None,
        schedule: Union[float, Schedule] = 1.0,
        *,
        weight: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
        capacity: Union[None, float, Schedule] = None,
        reduction: str = "batchmean",
        free_bits: float = 0.0,
        free_bits_mode: str = "batch",
        ignore_index: int = -100,
        free_bits_group: Any = None,
        chunk_size: Optional[int] = None,
        validate: bool = True,
    ) -> None:
        super().__init__(
            schedule, capacity=capacity, reduction=reduction, free_bits=free_bits,
            free_bits_mode=free_bits_mode, ignore_index=ignore_index,
            free_bits_group=free_bits_group, validate=validate,
        )  # fmt: skip
        if (linear is None) == (weight is None):
            raise ValueError("pass the output layer as `linear` or as `weight` (and `bias`), once")
        if linear is not None and not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        if linear is not None and bias is not None:
            raise ValueError("bias is only used with weight (the bias of `linear` is its own)")
        if weight is not None and not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
        ):
            raise ValueError(f"chunk_size must be an int > 0 or None, got {chunk_size!r}")
        # Plain attributes (nn.Module would register a Linear as a submodule
        # and a Parameter as the criterion's own): see the class docstring.
        self.__dict__["linear"] = linear
        self.__dict__["_weight"] = weight
        self.__dict__["_bias"] = bias
        self.chunk_size = chunk_size

    def forward(
        self,
        hidden: torch.Tensor,
        target: torch.Tensor,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        prior_mu: Optional[torch.Tensor] = None,
        prior_logvar: Optional[torch.Tensor] = None,
        prior: Optional[KLTerm] = None,
    ) -> ELBOOutput:
        """Loss at the current step; see ``klanneal.linear_elbo_loss`` for shapes and the result."""
        linear = self.__dict__["linear"]
        weight = self.__dict__["_weight"] if linear is None else linear.weight
        bias = self.__dict__["_bias"] if linear is None else linear.bias
        out = linear_elbo_loss(
            hidden,
            weight,
            target,
            mu,
            logvar,
            self.schedule,
            bias=bias,
            prior_mu=prior_mu,
            prior_logvar=prior_logvar,
            prior=prior,
            chunk_size=self.chunk_size,
            **self._step_options(),
        )
        self._feed_controller(out, mu)
        return out

    def extra_repr(self) -> str:
        return (
            f"schedule={self.schedule!r}, capacity={self.capacity!r}, "
            f"reduction={self.reduction!r}, free_bits={self.free_bits}, "
            f"free_bits_mode={self.free_bits_mode!r}, chunk_size={self.chunk_size}"
        )


# The saved form of a closed-form schedule before its state_dict() was saved:
# {"type": name, "params": to_params()}. Which of the 8 slots holds each field
# (schedules.py's layout), so that such a checkpoint is compared field by field.
_PARAMS_SLOTS = {
    "Constant": {"beta": 2},
    "Monotonic": {"warmup_steps": 4, "start": 2, "stop": 3},
    "Cyclical": {
        "total_steps": 4,
        "n_cycles": 5,
        "ratio": 6,
        "start": 2,
        "stop": 3,
        "shape": 1,
        "zero_ratio": 7,
    },
    "Capacity": {"c_max": 3, "warmup_steps": 4},
}
_INTEGER_FIELDS = ("warmup_steps", "total_steps", "n_cycles")
_ABSENT = object()


def _from_params(saved: Any) -> Any:
    """A schedule saved as {"type", "params"} as its state_dict(); anything else as it is."""
    if not (isinstance(saved, dict) and set(saved) == {"type", "params"}):
        return saved
    slots, params = _PARAMS_SLOTS.get(saved["type"]), saved["params"]
    if slots is None or not isinstance(params, (list, tuple)) or len(params) != 8:
        return saved
    from klanneal.schedules import SHAPES

    state: dict[str, Any] = {"type": saved["type"]}
    for name, slot in slots.items():
        value = params[slot]
        if name == "shape":
            value = SHAPES[int(value)] if int(value) in range(len(SHAPES)) else value
        elif name in _INTEGER_FIELDS and float(value).is_integer():
            value = int(value)
        state[name] = value
    return state


def _schedule_differences(saved: Any, mine: dict[str, Any]) -> list[str]:
    """What differs between a saved ELBOLoss extra state and this loss's, one
    "path: checkpoint X, this loss Y" per field (empty when they agree)."""
    if not isinstance(saved, dict):
        return [f"the checkpoint's entry is {saved!r}, not an ELBOLoss's"]
    saved = {key: _from_params(value) for key, value in saved.items()}
    return _differences("", saved, mine)


def _differences(path: str, saved: Any, mine: Any) -> list[str]:
    if saved == mine:
        return []
    if (
        isinstance(saved, dict)
        and isinstance(mine, dict)
        and saved.get("type", _ABSENT) == mine.get("type", _ABSENT)
    ):
        found = []
        for key in [*mine, *(k for k in saved if k not in mine)]:
            if key != "type":
                name = f"{path}.{key}" if path else str(key)
                found += _differences(name, saved.get(key, _ABSENT), mine.get(key, _ABSENT))
        return found
    return [f"{path}: checkpoint {_show(saved)}, this loss {_show(mine)}"]


def _show(value: Any) -> str:
    """A saved schedule as its constructor call, Cyclical(total_steps=1000, ...)."""
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, dict) and "type" in value:
        fields = ", ".join(f"{k}={_show(v)}" for k, v in value.items() if k != "type")
        return f"{value['type']}({fields})"
    return repr(value)


def _load_state_dict_call() -> tuple[Optional[bool], int]:
    """The ``strict`` of the ``nn.Module.load_state_dict`` call that runs the
    caller (None if another loader runs it), and the ``stacklevel`` that
    points a warning from the caller at that call's caller."""
    frame: Optional[types.FrameType] = sys._getframe(1)
    depth = 1
    while frame is not None:
        if frame.f_code is nn.Module.load_state_dict.__code__:
            return bool(frame.f_locals.get("strict", True)), depth + 1
        frame, depth = frame.f_back, depth + 1
    return None, 2
