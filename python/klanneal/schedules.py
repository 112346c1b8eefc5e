"""KL-weight (beta) schedules for VAE training, computed in klanneal's C++ core.

Two families:

* ``frange_cycle_*``: the array functions of the cyclical-annealing paper's
  code (Fu et al., NAACL 2019) and of Optimus (Li et al., EMNLP 2020),
  returning float64 numpy arrays. ``frange_cycle_linear`` and
  ``frange_cycle_zero_linear`` are bit-identical to the published Python.
* Schedule objects (``Constant``, ``Monotonic``, ``Cyclical``, ``Capacity``):
  closed-form, O(1) per step, the same C++ formula on CPU and GPU, and the
  stateful ``BetaScheduler`` wrapper with the protocol of torch's LR
  schedulers. Without the extension (or with ``KLANNEAL_DISABLE_NATIVE=1``)
  they are evaluated by :func:`schedule_value_ref`, a line-by-line Python
  transcription of the C++ formula; the ``frange_cycle_*`` arrays need the
  extension.
* Schedules evaluated in Python/PyTorch (``FromArray``, ``Offset`` via
  ``schedule.offset(k)``, ``Logistic``, ``LinearWarmup``; defined in
  ``klanneal._host_schedules``): tables of values and other codebases'
  formulas, taken everywhere a schedule is.

Example:
    >>> from klanneal.schedules import BetaScheduler, Cyclical
    >>> schedule = Cyclical(total_steps=40_000, n_cycles=4, ratio=0.5)
    >>> schedule(0), schedule(2_500), schedule(5_000)
    (0.0, 0.5, 1.0)
    >>> scheduler = BetaScheduler(schedule)  # scheduler.beta == schedule(0)
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import numpy.typing as npt

from klanneal._env import native_disabled

if TYPE_CHECKING:
    import torch

__all__ = [
    "SHAPES",
    "BetaScheduler",
    "Capacity",
    "Constant",
    "Cyclical",
    "CyclicalCosineLR",  # noqa: F822 - defined lazily by __getattr__
    "FromArray",
    "KLController",  # noqa: F822 - defined lazily by __getattr__
    "LinearWarmup",
    "Logistic",
    "Monotonic",
    "Offset",
    "Schedule",
    "ScheduleLengthWarning",
    "frange_cycle_cosine",
    "frange_cycle_linear",
    "frange_cycle_sigmoid",
    "frange_cycle_zero_linear",
    "schedule_value_ref",
    "schedule_values_ref",
]

#: Ramp shapes of ``Cyclical``, in the order of the C++ ``RampShape`` enum.
SHAPES = ("linear", "sigmoid", "cosine", "logistic")

_MAX_COUNT = 2**53  # n_iter, n_cycle: exact as float64, like Python's int/int
_MAX_STEP = 2**62  # steps beyond this are clamped: every schedule holds `stop` long before

StepsLike = Union[int, Sequence[int], "npt.NDArray[np.integer[Any]]", "torch.Tensor"]
FloatArray = npt.NDArray[np.float64]


def _loaded_native() -> ModuleType | None:
    """klanneal._C, or None when it failed to import or KLANNEAL_DISABLE_NATIVE is set."""
    from klanneal import _C

    if _C is None or native_disabled():
        return None
    return _C


def _native(function: str) -> ModuleType:
    native = _loaded_native()
    if native is None:
        raise ImportError(
            f"klanneal.schedules.{function} needs the compiled extension klanneal._C, which "
            "failed to import or is disabled by KLANNEAL_DISABLE_NATIVE; reinstall klanneal "
            "(`make install` or `pip install .`); the schedule objects (Cyclical, ...) work "
            "without it"
        )
    return native


# ---- argument checks ---------------------------------------------------------


def _as_int(name: str, value: Any, minimum: int, maximum: int = _MAX_COUNT) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        result = operator.index(value)
    except TypeError:
        if not isinstance(value, (float, np.floating)):
            raise TypeError(
                f"{name} must be an integer, got {type(value).__name__} {value!r}"
            ) from None
        if not (math.isfinite(value) and float(value).is_integer()):
            raise ValueError(f"{name} must be a whole number, got {value!r}") from None
        result = int(value)
    if result < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {result}")
    if result > maximum:
        limit = f"2**{maximum.bit_length() - 1}" if maximum > 2**20 else str(maximum)
        raise ValueError(f"{name} must be <= {limit}, got {result}")
    return result


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {result}")
    return result


def _as_ratio(name: str, value: Any) -> float:
    result = _as_float(name, value)
    if not 0.0 < result <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {result}")
    return result


def _as_zero_ratio(name: str, value: Any) -> float:
    result = _as_float(name, value)
    if not 0.0 <= result < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {result}")
    return result


def _check_span(start: float, stop: float) -> None:
    if not math.isfinite(stop - start):
        raise ValueError(f"stop - start must be finite, got stop={stop}, start={start}")


def _check_ramp_length(n_iter: int, n_cycle: int, name: str, ratio: float) -> None:
    # The published code divides by period*ratio; ZeroDivisionError there.
    if n_iter > 0 and (n_iter / n_cycle) * ratio == 0.0:
        raise ValueError(
            f"{name}={ratio} is too small: (n_iter / n_cycle) * {name} underflows to 0"
        )


def _frange_args(n_iter: Any, start: Any, stop: Any, n_cycle: Any) -> tuple[int, float, float, int]:
    # The published functions raise TypeError for a float length or cycle
    # count (np.ones(40000.0), range(4.0)); so do these, rather than read
    # frange_cycle_linear(0.0, 1.0, 40000, ...) (the notebook's argument
    # order, often copied) as a schedule of length 0.
    for name, value in (("n_iter", n_iter), ("n_cycle", n_cycle)):
        if isinstance(value, (float, np.floating)):
            raise TypeError(
                f"{name} must be an integer, got float {value!r} (the arguments are "
                "(n_iter, start, stop, n_cycle, ratio), as in the published code)"
            )
    return (
        _as_int("n_iter", n_iter, 0),
        _as_float("start", start),
        _as_float("stop", stop),
        _as_int("n_cycle", n_cycle, 1),
    )


# ---- reference-exact arrays ----------------------------------------------------


def frange_cycle_linear(
    n_iter: int, start: float = 0.0, stop: float = 1.0, n_cycle: int = 4, ratio: float = 0.5
) -> FloatArray:
    """The paper's linear cyclical schedule, bit-identical to the published code.

    Equal (``np.array_equal``, float accumulation included) to::

        def frange_cycle_linear(n_iter, start=0.0, stop=1.0, n_cycle=4, ratio=0.5):
            L = np.ones(n_iter) * stop
            period = n_iter/n_cycle
            step = (stop-start)/(period*ratio)
            for c in range(n_cycle):
                v, i = start, 0
                while v <= stop and (int(i+c*period) < n_iter):
                    L[int(i+c*period)] = v
                    v += step
                    i += 1
            return L

    for every valid argument. Deviations: ``n_iter == 0`` returns an empty
    array (the published code raises ZeroDivisionError), and the cost is
    O(n_iter + n_cycle) where the published loop is O(n_cycle * n_iter)
    (``start == stop``, whose ramp never ends).

    Args:
        n_iter: Length of the schedule, an integer >= 0.
        start: First value of each ramp (finite).
        stop: Last value of each ramp and the value held after it (finite).
            ``start > stop`` gives ``stop`` everywhere, as published.
        n_cycle: Number of cycles, an integer >= 1 (may exceed ``n_iter``).
        ratio: Fraction of each period spent ramping, in (0, 1].

    Returns:
        float64 array of shape ``[n_iter]``.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: ``n_iter < 0``, ``n_cycle < 1``, ``ratio`` outside (0, 1]
            or so small that ``n_iter / n_cycle * ratio`` underflows, or a
            non-finite or non-integer value.
    """
    n_iter, start, stop, n_cycle = _frange_args(n_iter, start, stop, n_cycle)
    ratio = _as_ratio("ratio", ratio)
    _check_ramp_length(n_iter, n_cycle, "ratio", ratio)
    result: FloatArray = _native("frange_cycle_linear").frange_cycle_linear(
        n_iter, start, stop, n_cycle, ratio
    )
    return result


def _frange_mapped(
    kind: str, n_iter: Any, start: Any, stop: Any, n_cycle: Any, ratio: Any
) -> FloatArray:
    n_iter, start, stop, n_cycle = _frange_args(n_iter, start, stop, n_cycle)
    ratio = _as_ratio("ratio", ratio)
    _check_span(start, stop)
    _check_ramp_length(n_iter, n_cycle, "ratio", ratio)
    name = f"frange_cycle_{kind}"
    result: FloatArray = getattr(_native(name), name)(n_iter, start, stop, n_cycle, ratio)
    return result


def frange_cycle_sigmoid(
    n_iter: int, start: float = 0.0, stop: float = 1.0, n_cycle: int = 4, ratio: float = 0.5
) -> FloatArray:
    """The authors' notebook sigmoid schedule, bounds-checked and honouring start/stop.

    Runs the loop of :func:`frange_cycle_linear` and writes
    ``start + (stop - start) * f((v - start) / (stop - start))`` with
    ``f(u) = 1 / (1 + exp(-(12u - 6)))``. For ``start=0, stop=1`` this is the
    notebook's ``1/(1+np.exp(-(v*12.-6.)))`` (up to the last bit of the
    platform's ``exp``). Deviations from the notebook:

    * the loop also stops at ``int(i + c*period) >= n_iter`` (the notebook
      has no such check and raises IndexError);
    * ``start``/``stop`` set the range of the values (the notebook always
      maps onto (0, 1)); values are clamped to [start, stop], and
      ``start == stop`` gives ``start``;
    * unwritten entries hold ``stop`` (the notebook initialises them to 1).

    Note that, like the notebook's, the ramp starts at ``f(0) ~ 0.0025`` and
    ends near ``f(1) ~ 0.9975`` of the range; :class:`Cyclical` with
    ``shape="sigmoid"`` rescales it to hit ``start`` and ``stop`` exactly.

    Args:
        n_iter: Length of the schedule, an integer >= 0.
        start: Lower end of the range (finite).
        stop: Upper end of the range (finite); ``start > stop`` gives ``stop``
            everywhere.
        n_cycle: Number of cycles, an integer >= 1.
        ratio: Fraction of each period spent ramping, in (0, 1].

    Returns:
        float64 array of shape ``[n_iter]``.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: As :func:`frange_cycle_linear`, or ``stop - start``
            overflows.
    """
    return _frange_mapped("sigmoid", n_iter, start, stop, n_cycle, ratio)


def frange_cycle_cosine(
    n_iter: int, start: float = 0.0, stop: float = 1.0, n_cycle: int = 4, ratio: float = 0.5
) -> FloatArray:
    """The authors' notebook cosine schedule, bounds-checked and honouring start/stop.

    As :func:`frange_cycle_sigmoid` with ``f(u) = 0.5 - 0.5 * cos(pi * u)``
    (the notebook's ``0.5-.5*math.cos(v*math.pi)`` for ``start=0, stop=1``),
    with the same deviations from the notebook: bounds check, ``start``/
    ``stop`` honoured (values clamped to [start, stop]), unwritten entries
    hold ``stop`` rather than 1.

    Args:
        n_iter: Length of the schedule, an integer >= 0.
        start: Lower end of the range (finite).
        stop: Upper end of the range (finite).
        n_cycle: Number of cycles, an integer >= 1.
        ratio: Fraction of each period spent ramping, in (0, 1].

    Returns:
        float64 array of shape ``[n_iter]``.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: As :func:`frange_cycle_sigmoid`.
    """
    return _frange_mapped("cosine", n_iter, start, stop, n_cycle, ratio)


def frange_cycle_zero_linear(
    n_iter: int,
    start: float = 0.0,
    stop: float = 1.0,
    n_cycle: int = 4,
    ratio_increase: float = 0.25,
    ratio_zero: float = 0.25,
) -> FloatArray:
    """Optimus' schedule: hold ``start``, ramp linearly to ``stop``, hold ``stop``.

    Each period holds ``start`` for its first ``ratio_zero``, ramps over the
    next ``ratio_increase`` and then holds ``stop``. Bit-identical to the
    Optimus code (same loop as :func:`frange_cycle_linear`, writing ``start``
    while ``i < period*ratio_zero`` without advancing ``v``); ``n_iter == 0``
    returns an empty array instead of raising ZeroDivisionError.

    Args:
        n_iter: Length of the schedule, an integer >= 0.
        start: Value held first and at the start of each ramp (finite).
        stop: Value at the end of each ramp and held after it (finite).
        n_cycle: Number of cycles, an integer >= 1.
        ratio_increase: Fraction of each period spent ramping, in (0, 1].
        ratio_zero: Fraction of each period held at ``start``, in [0, 1).

    Returns:
        float64 array of shape ``[n_iter]``.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: As :func:`frange_cycle_linear`, ``ratio_zero`` outside
            [0, 1), or ``ratio_increase + ratio_zero > 1``.
    """
    n_iter, start, stop, n_cycle = _frange_args(n_iter, start, stop, n_cycle)
    ratio_increase = _as_ratio("ratio_increase", ratio_increase)
    ratio_zero = _as_zero_ratio("ratio_zero", ratio_zero)
    if ratio_increase + ratio_zero > 1.0:
        raise ValueError(
            f"ratio_increase + ratio_zero must be <= 1, got {ratio_increase} + {ratio_zero}"
        )
    _check_ramp_length(n_iter, n_cycle, "ratio_increase", ratio_increase)
    result: FloatArray = _native("frange_cycle_zero_linear").frange_cycle_zero_linear(
        n_iter, start, stop, n_cycle, ratio_increase, ratio_zero
    )
    return result


# ---- pure-Python reference of the C++ schedule_value ---------------------------
#
# A transcription of csrc/include/klanneal/schedule.h, operation for
# operation: Python floats are IEEE doubles and Python never fuses a * b + c
# into an FMA (the C++ side compiles with -ffp-contract=off for the same
# reason), and math.exp / math.cos call the platform's libm like std::exp /
# std::cos, so on one machine the two agree bit for bit (tested). This is what
# the schedule objects evaluate when klanneal._C is missing or disabled, and
# the oracle the C++ values are tested against.

_KIND_CONSTANT, _KIND_MONOTONIC, _KIND_CYCLICAL, _KIND_CAPACITY = 0, 1, 2, 3
_SHAPE_LINEAR, _SHAPE_SIGMOID, _SHAPE_COSINE, _SHAPE_LOGISTIC = (SHAPES.index(s) for s in SHAPES)
_PI = 3.14159265358979323846  # == math.pi, spelled as in schedule.h


def _ramp_shape(shape: int, u: float) -> float:
    if shape == _SHAPE_SIGMOID:
        lo = 1.0 / (1.0 + math.exp(6.0))
        hi = 1.0 / (1.0 + math.exp(-6.0))
        s = 1.0 / (1.0 + math.exp(-(12.0 * u - 6.0)))
        return (s - lo) / (hi - lo)
    if shape == _SHAPE_LOGISTIC:
        return 1.0 / (1.0 + math.exp(-(12.0 * u - 6.0)))
    if shape == _SHAPE_COSINE:
        return 0.5 - 0.5 * math.cos(_PI * u)
    return u


def _ramp_between(start: float, stop: float, r: float) -> float:
    v = start + (stop - start) * r
    lo, hi = (start, stop) if start < stop else (stop, start)
    return lo if v < lo else (hi if v > hi else v)


def schedule_value_ref(params: Sequence[float], step: int) -> float:
    """The C++ ``schedule_value`` in pure Python: a schedule's value at one step.

    Args:
        params: The 8 floats of :meth:`Schedule.to_params` (a valid schedule;
            they are not checked here).
        step: Integer step; negative steps are clamped to 0, as in C++.

    Returns:
        The value, bit-identical to the C++ result on the same machine
        (sigmoid/cosine ramps use the platform's ``exp``/``cos``, as C++ does).
    """
    kind, shape = int(params[0]), int(params[1])
    start, stop, total_steps, n_cycles, ratio, zero_ratio = (float(v) for v in params[2:8])
    t = 0.0 if step < 0 else float(step)
    if kind == _KIND_CONSTANT:
        return start
    if kind in (_KIND_MONOTONIC, _KIND_CAPACITY):
        if not t < total_steps:  # also a warm-up of 0 steps
            return stop
        return _ramp_between(start, stop, t / total_steps)
    if kind == _KIND_CYCLICAL:
        if not t < total_steps:
            return stop
        # Integer-valued doubles below 2**52: the cycle and the position in it
        # are exact, so cycle boundaries fall on exactly the right step.
        scaled = t * n_cycles
        cycle = float(math.floor(scaled / total_steps))
        tau = (scaled - cycle * total_steps) / total_steps
        if tau < zero_ratio:
            return start
        u = (tau - zero_ratio) / ratio
        if u >= 1.0:
            return stop
        return _ramp_between(start, stop, _ramp_shape(shape, u))
    return stop


def _n_threads() -> int:
    """Threads for a native fill: torch.get_num_threads() when torch is loaded
    (torch.set_num_threads is honoured), else 0 (every hardware thread)."""
    torch_module = sys.modules.get("torch")
    return int(torch_module.get_num_threads()) if torch_module is not None else 0


def schedule_values_ref(params: Sequence[float], steps: npt.ArrayLike) -> FloatArray:
    """:func:`schedule_value_ref` at every step of an integer array.

    Args:
        params: The 8 floats of :meth:`Schedule.to_params`.
        steps: Integer steps, any shape (negative ones are clamped to 0).

    Returns:
        float64 array of the steps' shape, element for element equal to
        :func:`schedule_value_ref`.
    """
    steps_array = np.asarray(steps)
    flat = steps_array.reshape(-1).tolist()
    values = np.array([schedule_value_ref(params, k) for k in flat], dtype=np.float64)
    return values.reshape(steps_array.shape)


# ---- closed-form schedule objects -----------------------------------------------


def _as_step(step: Any) -> int:
    if type(step) is not int:
        torch_module = sys.modules.get("torch")
        if torch_module is not None and isinstance(step, torch_module.Tensor):
            step = _tensor_step(step, torch_module)
        elif isinstance(step, bool):
            raise TypeError(f"step must be an integer, got {step!r}")
    try:
        result = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an integer, got {type(step).__name__} {step!r}") from None
    if result < 0:
        raise ValueError(f"step must be >= 0, got {result}")
    return min(result, _MAX_STEP)


def _tensor_step(step: torch.Tensor, torch_module: Any) -> int:
    """A 0-d integer tensor step as an int (operator.index would also take a
    bool tensor as 1, a 1-element tensor of any shape, and fail on a uint64
    one above 2**63 - 1)."""
    dtype = step.dtype
    if step.dim() != 0 or dtype.is_floating_point or dtype.is_complex or dtype == torch_module.bool:
        raise TypeError(
            "step must be an integer or a 0-d integer tensor, got a tensor of shape "
            f"{tuple(step.shape)} and dtype {dtype}"
        )
    if step.is_meta:
        raise ValueError("step: a meta tensor has no value to evaluate the schedule at")
    return int(step.item())


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
        from klanneal._sizing import planned_steps

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


# ---- stateful wrapper ---------------------------------------------------------------


class BetaScheduler:
    """Steps a schedule like torch's LR schedulers step a learning rate.

    Call :meth:`step` once per optimizer step (after ``optimizer.step()``),
    not once per batch: with gradient accumulation over k batches the
    schedule then advances once per k batches, as the learning rate does.
    Construction performs the first step, so ``.last_step == 0`` and
    ``.beta == schedule(0)``::

        scheduler = BetaScheduler(Cyclical(total_steps=40_000))
        for batch in loader:
            loss = recon + scheduler.beta * kl
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()

    ``state_dict()`` / ``load_state_dict()`` save and restore the schedule
    and the step, so a resumed run continues the sequence exactly.

    Args:
        schedule: A :class:`Schedule`, or a sequence / 1-D array of values
            (a :class:`FromArray`).
        last_step: Step already taken (-1 for a fresh start, like torch's
            ``last_epoch``); construction moves to ``last_step + 1``.

    Raises:
        TypeError: ``schedule`` is not a Schedule.
        ValueError: ``last_step < -1``.
    """

    def __init__(self, schedule: Schedule, last_step: int = -1) -> None:
        from klanneal._host_schedules import as_schedule

        schedule = as_schedule(schedule)  # a list or array of values: FromArray
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a klanneal Schedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.last_step = _as_int("last_step", last_step, -1, _MAX_STEP)
        self.beta = 0.0
        self.step()

    def step(self) -> None:
        """Advance one step and update :attr:`beta` (= ``schedule(last_step)``)."""
        self.last_step += 1
        self.beta = self.schedule(self.last_step)

    def get_last_beta(self) -> float:
        """The current beta, ``schedule(last_step)`` (torch's ``get_last_lr``)."""
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        """``{"schedule": schedule.state_dict(), "last_step": int}``: plain Python,
        safe for ``torch.save`` / ``torch.load(weights_only=True)``."""
        return {"schedule": self.schedule.state_dict(), "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next :meth:`step` continues exactly.

        The schedule is loaded in place when it has the saved type, otherwise
        replaced by the saved one.

        Raises:
            ValueError: A key is missing or a value is invalid.
        """
        if not isinstance(state_dict, dict):
            raise ValueError(
                f"state_dict must be a dict (from BetaScheduler.state_dict), got "
                f"{type(state_dict).__name__}"
            )
        for key in ("schedule", "last_step"):
            if key not in state_dict:
                raise ValueError(f"state_dict is missing {key!r}")
        last_step = _as_int("last_step", state_dict["last_step"], 0, _MAX_STEP)
        saved = state_dict["schedule"]
        if isinstance(saved, dict) and saved.get("type") == type(self.schedule).__name__:
            self.schedule.load_state_dict(saved)
        else:
            self.schedule = Schedule.from_state_dict(saved)
        self.last_step = last_step
        self.beta = self.schedule(last_step)

    def __repr__(self) -> str:
        return f"BetaScheduler({self.schedule!r}, last_step={self.last_step}, beta={self.beta!r})"


def plot_schedules(curves: Sequence[tuple[str, Schedule]], steps: int, title: Any = None) -> Any:
    """A matplotlib figure of labelled schedules over steps ``0 .. steps - 1``.

    The plot of ``python -m klanneal schedule`` (one code path for the CLI
    and the examples): beta schedules share the left axis, a
    :class:`Capacity` target (nats) gets its own right-hand axis. Needs
    matplotlib. The caller saves or shows the figure and closes it.

    Args:
        curves: ``(label, schedule)`` pairs.
        steps: Number of steps (>= 1).
        title: Figure title (default "klanneal schedules").
    """
    from klanneal._cli import plot_schedules as plot

    return plot(curves, steps, title)


def __getattr__(name: str) -> Any:
    # CyclicalCosineLR subclasses torch's LRScheduler and KLController holds
    # tensors: imported on first use, so that importing the schedules does
    # not import torch.
    if name == "CyclicalCosineLR":
        from klanneal._lr import CyclicalCosineLR

        return CyclicalCosineLR
    if name == "KLController":  # a feedback controller on torch tensors
        from klanneal._controller import KLController

        return KLController
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Schedules evaluated in Python/PyTorch (tables, offsets, Sentence-VAE's
# forms): defined in their own module, which needs Schedule above.
from klanneal._host_schedules import (  # noqa: E402, F401 - re-exported
    FromArray,
    LinearWarmup,
    Logistic,
    Offset,
)
from klanneal._sizing import ScheduleLengthWarning  # noqa: E402, F401 - re-exported
