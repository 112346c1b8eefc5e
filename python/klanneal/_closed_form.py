"""The closed-form schedule objects: ``Schedule`` and ``Constant``,
``Monotonic``, ``Cyclical``, ``Capacity``, evaluated by the C++
``schedule_value`` (or, without the extension, by its pure-Python
transcription ``klanneal._schedule_ref``). Public as ``klanneal.schedules.*``;
the schedules evaluated in Python (``klanneal._host_schedules``) subclass
``Schedule``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

from klanneal._schedule_args import (
    _MAX_STEP,
    SHAPES,
    FloatArray,
    StepsLike,
    _as_float,
    _as_int,
    _as_ratio,
    _as_step,
    _as_zero_ratio,
    _check_span,
    _loaded_native,
    planned_steps,
)
from klanneal._schedule_ref import _n_threads, schedule_value_ref, schedule_values_ref

__all__ = ["Capacity", "Constant", "Cyclical", "Monotonic", "Schedule"]


class Schedule:
    """Base class of the closed-form schedules: a pure function of the step.

    Every schedule is described by the 8 floats of :meth:`to_params` and
    evaluated by the C++ ``schedule_value`` (the same code the CUDA kernels
    and the fused ELBO op use), so ``schedule(k)``, ``schedule.values(...)``
    and the GPU agree bit for bit for linear ramps (sigmoid/cosine on the GPU
    may differ in the last bit: device exp/cos). Past its ramp(s) every
    schedule holds ``stop`` forever.

    Subclasses list their constructor arguments in ``_fields`` and validate
    them in ``_configure``; ``state_dict``/``load_state_dict``, ``__repr__``
    and ``__eq__`` are built from those.
    """

    _fields: tuple[str, ...] = ()
    _kind: int = -1
    # Evaluated by the C++ schedule_value (False: klanneal._host_schedules).
    _native = True

    def __init__(self) -> None:
        raise TypeError("Schedule is abstract: use Constant, Monotonic, Cyclical or Capacity")

    def _configure(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def _set_params(self, params: list[float]) -> None:
        self._params = [float(x) for x in params]
        # What the fused ELBO op packs per call (no list copy per call).
        self._params_tuple = tuple(self._params)
        native = _loaded_native()
        # _configure has validated every argument; the C++ check guards the
        # boundary the kernels see, and there is none without the extension.
        if native is not None:
            native.check_schedule_params(self._params)

    def to_params(self) -> list[float]:
        """The 8 floats ``[kind, shape, start, stop, total_steps, n_cycles, ratio,
        zero_ratio]`` of the C++ ``ScheduleParams`` (what the kernels receive)."""
        return list(self._params)

    def __call__(self, step: int | np.integer[Any] | torch.Tensor) -> float:
        """Value at ``step``.

        Args:
            step: Integer >= 0 (Python int, numpy integer or 0-d integer tensor).

        Returns:
            The value as a Python float.

        Raises:
            TypeError: ``step`` is not an integer.
            ValueError: ``step < 0``.
        """
        native = _loaded_native()
        if native is None:
            return schedule_value_ref(self._params, _as_step(step))
        return float(native.schedule_value(self._params_tuple, _as_step(step)))

    def values(self, n_or_steps: StepsLike) -> FloatArray | torch.Tensor:
        """Values at many steps at once, vectorised in C++ (threads) or CUDA.

        Args:
            n_or_steps: An int ``n`` (steps ``0 .. n-1``); an integer numpy
                array or sequence of steps (any shape); or an integer torch
                tensor (a CPU tensor is evaluated in C++, a CUDA tensor by a
                kernel on ``torch.cuda.current_stream()``).

        Returns:
            float64 numpy array of the steps' shape, or for a tensor a float64
            tensor on its device. ``values(n)[k] == self(k)`` exactly.
            Without the extension the values come from
            :func:`schedule_values_ref` (a Python loop, on the CPU).

        Raises:
            TypeError: Steps are not integers.
            ValueError: ``n < 0`` or a negative step (checking a CUDA tensor
                for negative steps synchronises with the device).
            RuntimeError: A CUDA tensor but klanneal was built without CUDA.
        """
        torch_module = sys.modules.get("torch")
        if torch_module is not None and isinstance(n_or_steps, torch_module.Tensor):
            return self._values_tensor(n_or_steps)
        if isinstance(n_or_steps, (int, np.integer)) and not isinstance(n_or_steps, bool):
            n = _as_int("n", n_or_steps, 0, 2**62)
            native = _loaded_native()
            if native is None:
                return schedule_values_ref(self._params, np.arange(n, dtype=np.int64))
            result: FloatArray = native.schedule_values_range(self._params, 0, n, _n_threads())
            return result
        return self._values_array(np.asarray(n_or_steps))

    def _values_array(self, steps: npt.NDArray[Any]) -> FloatArray:
        if steps.size == 0:
            return np.zeros(steps.shape, dtype=np.float64)
        if steps.dtype == np.uint64:  # beyond int64: clamp, the value is `stop` anyway
            steps = np.minimum(steps, np.uint64(_MAX_STEP))
        elif steps.dtype.kind not in "iu":
            raise TypeError(f"steps must be integers, got an array of dtype {steps.dtype}")
        flat = np.ascontiguousarray(steps, dtype=np.int64).reshape(-1)
        native = _loaded_native()
        if native is None:
            if flat.min() < 0:
                index = int(np.argmax(flat < 0))
                raise ValueError(f"steps must be >= 0, got {int(flat[index])} at index {index}")
            return schedule_values_ref(self._params, flat).reshape(steps.shape)
        result: FloatArray = native.schedule_values(self._params, flat, _n_threads()).reshape(
            steps.shape
        )
        return result

    def _values_tensor(self, steps: torch.Tensor) -> torch.Tensor:
        import torch  # already imported: the caller holds a tensor

        if steps.dtype.is_floating_point or steps.dtype.is_complex or steps.dtype == torch.bool:
            raise TypeError(f"steps must be an integer tensor, got dtype {steps.dtype}")
        if steps.device.type == "cpu":
            # uint64 as it is: _values_array clamps it (int64 would wrap).
            steps = steps.detach()
            steps_np = (steps if steps.dtype == torch.uint64 else steps.to(torch.int64)).numpy()
            return torch.from_numpy(self._values_array(steps_np))
        native = _loaded_native()
        if steps.device.type != "cuda" or native is None or steps.dtype == torch.uint64:
            return self._values_tensor(steps.cpu()).to(steps.device)
        if not hasattr(native, "schedule_values_cuda"):
            raise RuntimeError(
                "klanneal was built without CUDA kernels; rebuild with KLANNEAL_CUDA=ON "
                "or pass a CPU tensor"
            )
        steps = steps.detach().to(torch.int64).contiguous()
        if steps.numel() > 0 and bool((steps < 0).any()):
            raise ValueError(f"steps must be >= 0, got {int(steps.min())}")
        out = torch.empty(steps.shape, dtype=torch.float64, device=steps.device)
        with torch.cuda.device(steps.device):
            stream = torch.cuda.current_stream(steps.device).cuda_stream
            native.schedule_values_cuda(
                self._params, steps.data_ptr(), out.data_ptr(), steps.numel(), stream
            )
        return out

    def offset(self, steps: int = 1) -> Schedule:
        """This schedule evaluated at ``step + steps``
        (:class:`~klanneal.schedules.Offset`): for code that updates beta
        before using it, where the batch at step ``s`` sees the value of ``s + 1``."""
        # Offset is a Schedule defined on top of this module: imported on use.
        from klanneal._host_schedules import Offset

        return Offset(self, steps)

    def _kwargs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._fields}

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (type name and constructor arguments); safe for
        ``torch.save`` / ``torch.load(weights_only=True)``."""
        return {"type": type(self).__name__, **self._kwargs()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the arguments saved by :meth:`state_dict` (validated again).

        Raises:
            ValueError: The state belongs to another schedule type, or a key is
                missing or unknown, or a value is invalid.
        """
        state = dict(state_dict)
        kind = state.pop("type", None)
        if kind != type(self).__name__:
            raise ValueError(f"state_dict is for a {kind!r} schedule, not {type(self).__name__!r}")
        missing = [name for name in self._fields if name not in state]
        unknown = sorted(set(state) - set(self._fields))
        if missing or unknown:
            raise ValueError(f"state_dict: missing keys {missing}, unknown keys {unknown}")
        self._configure(**state)

    @staticmethod
    def from_state_dict(state_dict: dict[str, Any]) -> Schedule:
        """Build the schedule a :meth:`state_dict` describes.

        Raises:
            ValueError: Unknown schedule type or invalid state.
        """
        from klanneal._host_schedules import LinearWarmup, Logistic, Offset

        kind = state_dict.get("type") if isinstance(state_dict, dict) else None
        classes = {
            cls.__name__: cls
            for cls in (Constant, Monotonic, Cyclical, Capacity, Logistic, LinearWarmup)
        }
        if kind == "Offset":
            inner = Schedule.from_state_dict(state_dict.get("schedule"))  # type: ignore[arg-type]
            result = Offset(inner, 0)
            result.load_state_dict(state_dict)
            return result
        if kind == "FromArray":
            raise ValueError(
                "a FromArray state_dict holds only the table's identity (length, digest), not "
                "its values: construct FromArray(values) and load the state into it"
            )
        if kind not in classes:
            raise ValueError(f"state_dict 'type' must be one of {sorted(classes)}, got {kind!r}")
        schedule = classes[kind].__new__(classes[kind])
        schedule.load_state_dict(state_dict)
        return schedule

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._kwargs() == other._kwargs()

    __hash__ = None  # type: ignore[assignment]  # unhashable: load_state_dict mutates it


class Constant(Schedule):
    """``beta`` at every step.

    Args:
        beta: The value (finite).

    Raises:
        ValueError: ``beta`` is not finite.
    """

    _fields = ("beta",)
    _kind = 0

    def __init__(self, beta: float = 1.0) -> None:
        self._configure(beta=beta)

    def _configure(self, beta: float) -> None:
        beta = _as_float("beta", beta)
        self.beta = beta
        self._set_params([self._kind, 0, beta, beta, 0, 1, 1, 0])


class Monotonic(Schedule):
    """Linear warm-up from ``start`` to ``stop`` over ``warmup_steps``, then ``stop``.

    The classic KL annealing of Bowman et al. (2016):
    ``start + (stop - start) * step / warmup_steps`` for
    ``step < warmup_steps``, ``stop`` from then on (``warmup_steps=0``:
    ``stop`` throughout).

    Args:
        warmup_steps: Length of the ramp in steps, an integer >= 0.
        start: Value at step 0 (finite).
        stop: Value at and after ``warmup_steps`` (finite; may be below
            ``start`` for a decreasing ramp).

    Raises:
        ValueError: Negative or non-integer ``warmup_steps``, non-finite
            ``start``/``stop``.
    """

    _fields = ("warmup_steps", "start", "stop")
    _kind = 1

    def __init__(self, warmup_steps: int, start: float = 0.0, stop: float = 1.0) -> None:
        self._configure(warmup_steps=warmup_steps, start=start, stop=stop)

    def _configure(self, warmup_steps: int, start: float, stop: float) -> None:
        warmup_steps = _as_int("warmup_steps", warmup_steps, 0)
        start, stop = _as_float("start", start), _as_float("stop", stop)
        _check_span(start, stop)
        self.warmup_steps, self.start, self.stop = warmup_steps, start, stop
        self._set_params([self._kind, 0, start, stop, warmup_steps, 1, 1, 0])


class Cyclical(Schedule):
    """Cyclical annealing (Fu et al. 2019): ``n_cycles`` ramps over ``total_steps``.

    Each period of ``total_steps / n_cycles`` steps holds ``start`` for its
    first ``zero_ratio``, ramps from ``start`` to ``stop`` over the next
    ``ratio`` (shape ``"linear"``, ``"sigmoid"`` or ``"cosine"``; every shape
    starts exactly at ``start`` and ends exactly at ``stop``), then holds
    ``stop``. From ``total_steps`` on the value is ``stop``. The position in
    the period is computed exactly, so a period of a whole number of steps
    repeats bit for bit. With such a period the linear shape equals the
    paper's ``frange_cycle_linear`` up to its float accumulation; with a
    fractional one (``total_steps=10, n_cycles=4``) the two differ: a period
    here starts at its exact position ``c * total_steps / n_cycles``, while
    ``frange_cycle_linear`` restarts each cycle at ``int(c * period)`` and
    can skip the hold (use :func:`frange_cycle_linear` itself for the
    paper's array). ``zero_ratio=0.25, ratio=0.25`` is Optimus' schedule.

    Args:
        total_steps: Length of the cyclical part, an integer >= 1.
        n_cycles: Number of cycles, an integer in [1, total_steps].
        ratio: Fraction of each period spent ramping, in (0, 1].
        start: Value at the start of each ramp (finite).
        stop: Value at the end of each ramp and after ``total_steps`` (finite).
        shape: ``"linear"``, ``"sigmoid"`` (the paper's ``1/(1+exp(-(12u-6)))``
            over the ramp's position u, rescaled to run exactly from
            ``start`` to ``stop``), ``"cosine"`` or ``"logistic"`` (the same
            curve not rescaled, as the notebook's ``frange_cycle_sigmoid``
            and Sentence-VAE's logistic annealing: it starts 0.25% of the
            way and jumps the last 0.25% to ``stop`` at the ramp's end).
        zero_ratio: Fraction of each period held at ``start`` before the ramp,
            in [0, 1), with ``ratio + zero_ratio <= 1``.

    Raises:
        ValueError: An argument out of range (the message names it), an
            unknown ``shape``, or ``total_steps * n_cycles > 2**52``.
    """

    _fields = ("total_steps", "n_cycles", "ratio", "start", "stop", "shape", "zero_ratio")
    _kind = 2

    def __init__(
        self,
        total_steps: int,
        n_cycles: int = 4,
        ratio: float = 0.5,
        start: float = 0.0,
        stop: float = 1.0,
        shape: str = "linear",
        zero_ratio: float = 0.0,
    ) -> None:
        self._configure(
            total_steps=total_steps,
            n_cycles=n_cycles,
            ratio=ratio,
            start=start,
            stop=stop,
            shape=shape,
            zero_ratio=zero_ratio,
        )

    def _configure(
        self,
        total_steps: int,
        n_cycles: int,
        ratio: float,
        start: float,
        stop: float,
        shape: str,
        zero_ratio: float,
    ) -> None:
        total_steps = _as_int("total_steps", total_steps, 1, 2**52)
        n_cycles = _as_int("n_cycles", n_cycles, 1, total_steps)
        if total_steps * n_cycles > 2**52:
            raise ValueError(
                f"total_steps * n_cycles must be <= 2**52, got {total_steps} * {n_cycles}"
            )
        ratio = _as_ratio("ratio", ratio)
        zero_ratio = _as_zero_ratio("zero_ratio", zero_ratio)
        if ratio + zero_ratio > 1.0:
            raise ValueError(f"ratio + zero_ratio must be <= 1, got {ratio} + {zero_ratio}")
        start, stop = _as_float("start", start), _as_float("stop", stop)
        _check_span(start, stop)
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}; got {shape!r}")
        self.total_steps, self.n_cycles = total_steps, n_cycles
        self.ratio, self.zero_ratio = ratio, zero_ratio
        self.start, self.stop, self.shape = start, stop, shape
        self._set_params(
            [self._kind, SHAPES.index(shape), start, stop, total_steps, n_cycles, ratio, zero_ratio]
        )

    @property
    def period(self) -> float:
        """Steps per cycle, ``total_steps / n_cycles``."""
        return self.total_steps / self.n_cycles

    @classmethod
    def for_trainer(cls, trainer: Any, **kwargs: Any) -> Cyclical:
        """A Cyclical spanning the optimizer steps a Lightning ``trainer``
        plans (``trainer.estimated_stepping_batches``), e.g. in
        ``configure_optimizers``: ``self.criterion.schedule =
        Cyclical.for_trainer(self.trainer, n_cycles=4)``.

        Args:
            trainer: a Lightning Trainer that is fitting (its planned steps are known).
            kwargs: the other arguments of :class:`Cyclical`.

        Raises:
            TypeError: ``trainer`` is not a Lightning Trainer.
            ValueError: it plans no finite number of steps, or an argument is invalid.
        """
        return cls(planned_steps(trainer), **kwargs)


class Capacity(Schedule):
    """Target KL C(t) of the capacity objective ``gamma * |KL - C(t)|`` (Burgess et al. 2018).

    Grows linearly from 0 to ``c_max`` nats over ``warmup_steps``, then holds
    ``c_max``.

    Args:
        c_max: Final capacity in nats, finite and >= 0.
        warmup_steps: Steps to reach ``c_max``, an integer >= 0.

    Raises:
        ValueError: Negative or non-finite ``c_max``, negative or non-integer
            ``warmup_steps``.
    """

    _fields = ("c_max", "warmup_steps")
    _kind = 3

    def __init__(self, c_max: float, warmup_steps: int) -> None:
        self._configure(c_max=c_max, warmup_steps=warmup_steps)

    def _configure(self, c_max: float, warmup_steps: int) -> None:
        c_max = _as_float("c_max", c_max)
        if c_max < 0.0:
            raise ValueError(f"c_max must be >= 0, got {c_max}")
        warmup_steps = _as_int("warmup_steps", warmup_steps, 0)
        self.c_max, self.warmup_steps = c_max, warmup_steps
        self._set_params([self._kind, 0, 0.0, c_max, warmup_steps, 1, 1, 0])
