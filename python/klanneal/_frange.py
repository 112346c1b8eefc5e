"""The ``frange_cycle_*`` arrays: the published functions of the cyclical-annealing
paper's code (Fu et al., NAACL 2019) and of Optimus, computed in C++ and
bit-identical to the published Python where stated."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    pass

from klanneal._schedule_args import (
    FloatArray,
    _as_float,
    _as_int,
    _as_ratio,
    _as_zero_ratio,
    _check_ramp_length,
    _check_span,
    _native,
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
