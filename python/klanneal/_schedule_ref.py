"""The pure-Python reference of the C++ ``schedule_value``: what the schedule
objects evaluate without the extension, and the oracle of the C++ values."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    pass

from klanneal._schedule_args import SHAPES, FloatArray

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
