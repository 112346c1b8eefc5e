"""Schedules evaluated in Python/PyTorch rather than by the C++ ``schedule_value``.

``FromArray`` (a table of values indexed by the step), ``Offset`` (any
schedule evaluated at ``step + k``: code that updates beta before using it),
``Logistic`` and ``LinearWarmup`` (Sentence-VAE's two ``kl_anneal_function``
forms). They are ``klanneal.schedules.Schedule`` objects, so ``elbo_loss``,
``ELBOLoss``, ``LinearELBOLoss``, ``BetaScheduler`` and the Lightning callback
take them as they take the closed-form ones; the difference is where they are
evaluated: at a step tensor they become a 0-d float64 beta tensor computed
with torch ops on the step's device (no host sync, traceable by
``torch.compile``), which the fused op then reads like any tensor beta.
"""

from __future__ import annotations

import hashlib
import math
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from klanneal._closed_form import Schedule
from klanneal._schedule_args import _MAX_STEP, StepsLike, _as_int, _as_step

if TYPE_CHECKING:
    import torch

FloatArray = npt.NDArray[np.float64]


class HostSchedule(Schedule):
    """A schedule with no C++ parameters: evaluated by :meth:`_value` (an int
    step), :meth:`_values` (an int64 array) and :meth:`_at` (a step tensor).

    Subclasses set ``_fields`` (their ``state_dict`` keys) and implement those
    three and :meth:`bounds`.
    """

    _native = False

    def _value(self, step: int) -> float:
        raise NotImplementedError

    def _values(self, steps: npt.NDArray[np.int64]) -> FloatArray:
        return np.array([self._value(int(k)) for k in steps.reshape(-1)], dtype=np.float64).reshape(
            steps.shape
        )

    def _at(self, step: torch.Tensor) -> torch.Tensor:
        """The value at a 0-d int64 step tensor, as a 0-d float64 tensor on its device."""
        raise NotImplementedError

    def bounds(self) -> tuple[float, float]:
        """The smallest and largest value the schedule takes."""
        raise NotImplementedError

    def to_params(self) -> list[float]:
        raise TypeError(
            f"{type(self).__name__} is evaluated in Python, not by the C++ schedule_value: "
            "it has no closed-form parameters"
        )

    def __call__(self, step: int | np.integer[Any] | torch.Tensor) -> float:
        """Value at ``step`` (an integer >= 0, numpy integer or 0-d integer tensor).

        Raises:
            TypeError: ``step`` is not an integer.
            ValueError: ``step < 0``.
        """
        return self._value(_as_step(step))

    def values(self, n_or_steps: StepsLike) -> FloatArray | torch.Tensor:
        """Values at many steps: an int ``n`` (steps ``0 .. n-1``), an integer
        array or sequence, or an integer tensor (a float64 tensor on its device).

        Raises:
            TypeError: Steps are not integers.
            ValueError: A negative step.
        """
        torch_module = sys.modules.get("torch")
        if torch_module is not None and isinstance(n_or_steps, torch_module.Tensor):
            steps_t = n_or_steps
            if not _is_integer_dtype(steps_t.dtype, torch_module):
                raise TypeError(f"steps must be an integer tensor, got dtype {steps_t.dtype}")
            flat = steps_t.detach().cpu().to(torch_module.int64).numpy()
            result: torch.Tensor = torch_module.from_numpy(self._checked_values(flat))
            return result.to(steps_t.device)
        if isinstance(n_or_steps, (int, np.integer)) and not isinstance(n_or_steps, bool):
            n = _as_int("n", n_or_steps, 0, 2**62)
            return self._values(np.arange(n, dtype=np.int64))
        steps = np.asarray(n_or_steps)
        if steps.size == 0:
            return np.zeros(steps.shape, dtype=np.float64)
        if steps.dtype == np.uint64:
            steps = np.minimum(steps, np.uint64(_MAX_STEP))
        elif steps.dtype.kind not in "iu":
            raise TypeError(f"steps must be integers, got an array of dtype {steps.dtype}")
        return self._checked_values(steps.astype(np.int64))

    def _checked_values(self, steps: npt.NDArray[np.int64]) -> FloatArray:
        if steps.size and steps.min() < 0:
            index = int(np.argmax(steps.reshape(-1) < 0))
            raise ValueError(
                f"steps must be >= 0, got {int(steps.reshape(-1)[index])} at index {index}"
            )
        return self._values(np.minimum(steps, _MAX_STEP))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.state_dict() == other.state_dict()

    def __repr__(self) -> str:
        state = self.state_dict()
        state.pop("type")
        args = ", ".join(f"{k}={v!r}" for k, v in state.items())
        return f"{type(self).__name__}({args})"


def _is_integer_dtype(dtype: Any, torch_module: Any) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch_module.bool)


def _digest(values: FloatArray) -> str:
    """A short identity of the table: sha256 of its float64 bytes (16 hex digits)."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<f8").tobytes()).hexdigest()[:16]


class FromArray(HostSchedule):
    """A table of values indexed by the step: ``values[step]``, then the last
    value for every step past the end.

    For code that computes its beta sequence itself (``frange_cycle_linear``
    arrays, a transcription of a training script's loop): ELBOLoss, elbo_loss
    and the Lightning callback keep the step counter and the checkpointing.
    ``state_dict`` records the table's identity (its length and a digest of
    its float64 values), not the values: loading checks that the table is the
    same one.

    Args:
        values: 1-D sequence, numpy array or tensor of finite values >= 0,
            at least one (copied as float64).

    Raises:
        TypeError: ``values`` is not 1-D numbers (a string, a scalar, complex).
        ValueError: Empty, or a value negative or not finite (named by index).
    """

    _fields = ("length", "digest")

    def __init__(self, values: Any) -> None:
        torch_module = sys.modules.get("torch")
        if torch_module is not None and isinstance(values, torch_module.Tensor):
            values = values.detach().cpu().double().numpy()
        if isinstance(values, (str, bytes)) or np.ndim(values) != 1:
            raise TypeError(
                "values must be a 1-D sequence, numpy array or tensor of numbers, got "
                f"{type(values).__name__} with {np.ndim(values)} dimension(s)"
            )
        array = np.asarray(values)
        if array.dtype == object or array.dtype.kind not in "biuf":
            raise TypeError(f"values must be real numbers, got dtype {array.dtype}")
        table = np.array(array, dtype=np.float64)  # a copy: the caller's array may change
        if table.size == 0:
            raise ValueError("values must hold at least one value")
        bad = ~(np.isfinite(table) & (table >= 0))
        if bad.any():
            index = int(np.argmax(bad))
            raise ValueError(
                f"values[{index}] = {float(table[index])!r}: a KL weight must be finite and >= 0"
            )
        table.flags.writeable = False
        self._table = table
        # The table as a tensor per device (other devices: made on first use).
        import torch  # the klanneal package imports it anyway

        self._tensors: dict[Any, torch.Tensor] = {torch.device("cpu"): torch.tensor(table)}
        self.length = int(table.size)
        self.digest = _digest(table)

    @property
    def table(self) -> FloatArray:
        """The values (read-only float64 array)."""
        return self._table

    def _value(self, step: int) -> float:
        return float(self._table[min(step, self.length - 1)])

    def _values(self, steps: npt.NDArray[np.int64]) -> FloatArray:
        result: FloatArray = self._table[np.minimum(steps, self.length - 1)]
        return result

    def _at(self, step: torch.Tensor) -> torch.Tensor:
        import torch

        device = step.device
        table = self._tensors.get(device)
        if table is None:
            table = self._tensors[torch.device("cpu")].to(device)
            # Cached by eager calls only: torch.compile guards on this dict,
            # so a traced call that filled it would recompile the next one.
            if not torch.compiler.is_compiling():
                self._tensors[device] = table
        # index_select with a 1-element index: a 0-d index tensor is read as
        # an int (a data-dependent guard under torch.compile).
        return table.index_select(0, step.clamp(0, self.length - 1).reshape(1)).reshape(())

    def bounds(self) -> tuple[float, float]:
        return float(self._table.min()), float(self._table.max())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check that ``state_dict`` describes this table (the values are not saved).

        Raises:
            ValueError: Another schedule type, or another table (length or digest).
        """
        state = dict(state_dict)
        kind = state.pop("type", None)
        if kind != "FromArray":
            raise ValueError(f"state_dict is for a {kind!r} schedule, not 'FromArray'")
        if state != {"length": self.length, "digest": self.digest}:
            raise ValueError(
                f"state_dict describes another table (length {state.get('length')!r}, digest "
                f"{state.get('digest')!r}; this one: length {self.length}, digest "
                f"{self.digest!r}): FromArray saves only the table's identity, so construct "
                "it with the checkpoint's values"
            )

    def __repr__(self) -> str:
        return f"FromArray(length={self.length}, digest={self.digest!r})"


class Offset(HostSchedule):
    """``schedule`` evaluated at ``step + steps``: for training code that
    updates beta *before* using it (``beta += increment`` at the top of the
    loop), so that the batch at step ``s`` sees the value of step ``s + 1``.

    ``Schedule.offset(k)`` builds one. Every schedule, closed-form or not, can
    be offset.

    Args:
        schedule: any klanneal.schedules object (not a Capacity).
        steps: int >= 0 (0 is the schedule itself).
    """

    _fields = ("schedule", "steps")

    def __init__(self, schedule: Schedule, steps: int = 1) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(
                f"schedule must be a klanneal.schedules object, got {type(schedule).__name__}"
            )
        self.schedule = schedule
        self.steps = _as_int("steps", steps, 0, 2**53)

    def _value(self, step: int) -> float:
        return float(self.schedule(min(step + self.steps, _MAX_STEP)))

    def _values(self, steps: npt.NDArray[np.int64]) -> FloatArray:
        result: FloatArray = np.asarray(
            self.schedule.values(np.minimum(steps + self.steps, _MAX_STEP)), dtype=np.float64
        )
        return result

    def _at(self, step: torch.Tensor) -> torch.Tensor:
        inner = self.schedule
        shifted = step + self.steps
        if isinstance(inner, HostSchedule):
            return inner._at(shifted)
        result: torch.Tensor = inner.values(shifted)  # type: ignore[assignment]
        return result

    def bounds(self) -> tuple[float, float]:
        return schedule_bounds(self.schedule)

    def state_dict(self) -> dict[str, Any]:
        return {"type": "Offset", "schedule": self.schedule.state_dict(), "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the offset and the inner schedule's state.

        Raises:
            ValueError: Another schedule type, missing or unknown keys, invalid values.
        """
        state = dict(state_dict)
        kind = state.pop("type", None)
        if kind != "Offset":
            raise ValueError(f"state_dict is for a {kind!r} schedule, not 'Offset'")
        if set(state) != {"schedule", "steps"}:
            raise ValueError(
                f"state_dict: expected keys ['schedule', 'steps'], got {sorted(state)}"
            )
        self.schedule.load_state_dict(state["schedule"])
        self.steps = _as_int("steps", state["steps"], 0, 2**53)

    def __repr__(self) -> str:
        return f"Offset({self.schedule!r}, steps={self.steps})"


class Logistic(HostSchedule):
    """``1 / (1 + exp(-k (step - x0)))``: the logistic KL annealing of
    Bowman et al. (2016) as Sentence-VAE writes it (``kl_anneal_function
    ('logistic', step, k, x0)``), not rescaled: it starts at
    ``1 / (1 + exp(k x0))`` (0.0019 for the defaults) and tends to 1.

    Args:
        k: steepness > 0 (Sentence-VAE's default 0.0025).
        x0: the step where it crosses 0.5, >= 0 (default 2500).
    """

    _fields = ("k", "x0")

    def __init__(self, k: float = 0.0025, x0: float = 2500) -> None:
        self._configure(k, x0)

    def _configure(self, k: float, x0: float) -> None:
        self.k = _positive("k", k)
        self.x0 = nonnegative("x0", x0)

    def _value(self, step: int) -> float:
        # Sentence-VAE: float(1 / (1 + np.exp(-k * (step - x0)))), the same operations.
        with np.errstate(over="ignore"):
            return float(1 / (1 + np.exp(-self.k * (step - self.x0))))

    def _values(self, steps: npt.NDArray[np.int64]) -> FloatArray:
        with np.errstate(over="ignore"):
            result: FloatArray = 1 / (1 + np.exp(-self.k * (steps - self.x0)))
        return result

    def _at(self, step: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.sigmoid(self.k * (step.to(torch.float64) - self.x0))

    def bounds(self) -> tuple[float, float]:
        return self._value(0), 1.0


class LinearWarmup(HostSchedule):
    """``min(1, step / x0)``: Sentence-VAE's ``kl_anneal_function('linear',
    step, k, x0)``, from 0 at step 0 to 1 at step ``x0``.

    Args:
        x0: the step where beta reaches 1, > 0 (Sentence-VAE's default 2500).
    """

    _fields = ("x0",)

    def __init__(self, x0: float = 2500) -> None:
        self._configure(x0)

    def _configure(self, x0: float) -> None:
        self.x0 = _positive("x0", x0)

    def _value(self, step: int) -> float:
        return float(min(1, step / self.x0))

    def _values(self, steps: npt.NDArray[np.int64]) -> FloatArray:
        result: FloatArray = np.minimum(1.0, steps / self.x0)
        return result

    def _at(self, step: torch.Tensor) -> torch.Tensor:
        return (step.double() / self.x0).clamp(max=1.0)

    def bounds(self) -> tuple[float, float]:
        return 0.0, 1.0


def _positive(name: str, value: Any) -> float:
    result = nonnegative(name, value)
    if result == 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return result


def nonnegative(name: str, value: Any) -> float:
    """A finite real number >= 0 as a float (TypeError / ValueError naming it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    result = float(value)
    if not (math.isfinite(result) and result >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return result


def schedule_bounds(schedule: Schedule) -> tuple[float, float]:
    """The smallest and largest value of any schedule (closed-form: its start and stop)."""
    if isinstance(schedule, HostSchedule):
        return schedule.bounds()
    start, stop = schedule.to_params()[2:4]
    return min(start, stop), max(start, stop)


def is_value_table(value: Any) -> bool:
    """A list, tuple, 1-D numpy array or 1-D tensor: a table of beta per step."""
    if isinstance(value, (list, tuple)):
        return True
    if isinstance(value, np.ndarray):
        return value.ndim == 1
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(value, torch_module.Tensor) and value.dim() == 1


def as_schedule(value: Any) -> Any:
    """``FromArray(value)`` for a table of values (see :func:`is_value_table`),
    anything else unchanged (checked by the caller)."""
    return FromArray(value) if is_value_table(value) else value


def resolve_host_beta(beta: HostSchedule, step: Any, device: Any) -> Any:
    """``beta`` at ``step`` for the fused op: a float at an int step, a 0-d
    float64 tensor at a step tensor (computed on ``device`` without a sync).

    Raises:
        ValueError: No step, or a negative int step.
        TypeError: A step that is not an int or a 0-d integer tensor.
    """
    import torch

    if step is None:
        raise ValueError("step is required when beta is a schedule")
    if isinstance(step, torch.Tensor):
        if step.dim() != 0 or not _is_integer_dtype(step.dtype, torch):
            raise TypeError(
                "step must be an int or a 0-d integer tensor, got a tensor of shape "
                f"{tuple(step.shape)} and dtype {step.dtype}"
            )
        return beta._at(step.detach().reshape(()).to(device=device, dtype=torch.int64))
    return beta(step)
