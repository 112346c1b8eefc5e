"""klanneal.schedules: reference parity, schedule properties, resume, errors."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import klanneal
from klanneal import _closed_form, schedules
from klanneal.schedules import (
    BetaScheduler,
    Capacity,
    Constant,
    Cyclical,
    Monotonic,
    Schedule,
    frange_cycle_cosine,
    frange_cycle_linear,
    frange_cycle_sigmoid,
    frange_cycle_zero_linear,
)

# ---- the published functions, copied verbatim (n_iter == 0 aside) ---------------


def published_frange_cycle_linear(n_iter, start=0.0, stop=1.0, n_cycle=4, ratio=0.5):
    if n_iter == 0:  # the published code raises ZeroDivisionError; klanneal returns []
        return np.ones(0)
    L = np.ones(n_iter) * stop
    period = n_iter / n_cycle
    step = (stop - start) / (period * ratio)  # linear schedule
    for c in range(n_cycle):
        v, i = start, 0
        while v <= stop and (int(i + c * period) < n_iter):
            L[int(i + c * period)] = v
            v += step
            i += 1
    return L


def optimus_frange_cycle_zero_linear(
    n_iter, start=0.0, stop=1.0, n_cycle=4, ratio_increase=0.25, ratio_zero=0.25
):
    if n_iter == 0:
        return np.ones(0)
    L = np.ones(n_iter) * stop
    period = n_iter / n_cycle
    step = (stop - start) / (period * ratio_increase)
    for c in range(n_cycle):
        v, i = start, 0
        while v <= stop and (int(i + c * period) < n_iter):
            if i < period * ratio_zero:
                L[int(i + c * period)] = start
            else:
                L[int(i + c * period)] = v
                v += step
            i += 1
    return L


# The authors' notebook (argument order theirs). It has no bounds check and
# raises IndexError where the last ramp reaches n_epoch.
def notebook_frange_cycle_sigmoid(start, stop, n_epoch, n_cycle=4, ratio=0.5):
    L = np.ones(n_epoch)
    period = n_epoch / n_cycle
    step = (stop - start) / (period * ratio)  # step is in [0,1]
    for c in range(n_cycle):
        v, i = start, 0
        while v <= stop:
            L[int(i + c * period)] = 1.0 / (1.0 + np.exp(-(v * 12.0 - 6.0)))
            v += step
            i += 1
    return L


def notebook_frange_cycle_cosine(start, stop, n_epoch, n_cycle=4, ratio=0.5):
    L = np.ones(n_epoch)
    period = n_epoch / n_cycle
    step = (stop - start) / (period * ratio)  # step is in [0,1]
    for c in range(n_cycle):
        v, i = start, 0
        while v <= stop:
            L[int(i + c * period)] = 0.5 - 0.5 * math.cos(v * math.pi)
            v += step
            i += 1
    return L


# ---- frange_cycle_linear parity -----------------------------------------------------

_SPANS = [
    (0.0, 1.0),
    (0.1, 0.3),  # 0.3 - 0.1 is not 0.2 in binary
    (-1.0, 2.0),
    (-3.0, -1.0),
    (0.5, 0.5),  # start == stop: the published ramp never ends
    (1.0, 0.0),  # start > stop: nothing written
    (1.0, 1.0 + 2.0**-52),  # step below half an ulp of v: the ramp stalls
]
_SMALL = [1, 2, 3, 7, 10, 13, 41, 100, 101]
_CYCLES = [1, 2, 3, 4, 7, 150]  # 150 > n_iter for every _SMALL n_iter
_RATIOS = [1.0, 0.5, 0.3, 1e-3]


def _linear_cases():
    cases = [(0, 0.0, 1.0, 4, 0.5)]
    for n_iter, n_cycle, ratio, (start, stop) in itertools.product(
        _SMALL, _CYCLES, _RATIOS, _SPANS
    ):
        # A deterministic ~third of the product keeps the runtime small while
        # every value of every axis still appears many times.
        if (n_iter * 7 + n_cycle * 3 + int(ratio * 1000) + int(start * 10)) % 3 == 0:
            cases.append((n_iter, start, stop, n_cycle, ratio))
    cases += [
        # i + c*period rounds up across a power of two and skips an index
        # (1 + 14.999999999999998 == 16.0): that entry keeps an earlier value.
        (30, 0.0, 1.0, 22, 1.0),
        (30, 0.5, 0.5, 22, 1.0),
        (45, 0.0, 1.0, 33, 0.7),
        (45, 0.2, 0.2, 33, 0.7),
        (68, 0.0, 1.0, 28, 1.0),
        (68, 1.0, 1.0 + 2.0**-52, 28, 1.0),
        (997, 0.0, 1.0, 4, 0.5),  # prime
        (1000, 0.0, 1.0, 3, 1.0),
        (4096, 0.0, 1.0, 1, 1.0),
        (100_000, 0.0, 1.0, 4, 0.5),
        (100_000, 0.0, 1.0, 7, 1.0),
        (100_003, -0.5, 0.25, 6, 0.9),
        (100_000, 0.0, 1.0, 3, 1e-9),  # one write per cycle
    ]
    return cases


_LINEAR_CASES = _linear_cases()


def test_parity_list_is_large():
    assert len(_LINEAR_CASES) >= 200


@pytest.mark.parametrize("n_iter,start,stop,n_cycle,ratio", _LINEAR_CASES)
def test_frange_cycle_linear_matches_the_published_code(n_iter, start, stop, n_cycle, ratio):
    expected = published_frange_cycle_linear(n_iter, start, stop, n_cycle, ratio)
    got = frange_cycle_linear(n_iter, start, stop, n_cycle, ratio)
    assert got.dtype == np.float64 and got.shape == (n_iter,)
    np.testing.assert_array_equal(got, expected)


_finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)


@st.composite
def _linear_args(draw):
    n_iter = draw(st.integers(min_value=0, max_value=3000))
    n_cycle = draw(st.one_of(st.integers(1, 12), st.integers(1, 5000)))
    ratio = draw(st.one_of(st.just(1.0), st.floats(min_value=1e-4, max_value=1.0)))
    start = draw(_finite)
    stop = draw(st.one_of(_finite, st.just(start), st.just(start + 1.0)))
    # Where the step is below an ulp of v the published ramp stalls (start ==
    # stop is the extreme case) and its loop costs O(n_cycle * n_iter).
    if n_iter and (stop - start) / (n_iter / n_cycle * ratio) <= 2 * np.spacing(
        max(abs(start), abs(stop))
    ):
        n_cycle = min(n_cycle, 40)
    return n_iter, start, stop, n_cycle, ratio


@settings(max_examples=80, deadline=None)
@given(_linear_args())
def test_frange_cycle_linear_matches_the_published_code_on_drawn_arguments(args):
    np.testing.assert_array_equal(frange_cycle_linear(*args), published_frange_cycle_linear(*args))


def test_frange_cycle_linear_start_equal_stop_is_fast():
    # The published loop runs every cycle to n_iter here: 1e4 * 1e5 steps.
    got = frange_cycle_linear(100_000, 0.25, 0.25, 10_000, 0.5)
    np.testing.assert_array_equal(got, np.full(100_000, 0.25))


def test_frange_cycle_linear_huge_n_cycle_is_fast():
    # One write per cycle, nearly all overwritten: replayed in O(n_iter).
    got = frange_cycle_linear(10, 0.0, 1.0, 2**50, 0.5)
    np.testing.assert_array_equal(got, np.zeros(10))


# ---- frange_cycle_zero_linear parity ---------------------------------------------


def _zero_linear_cases():
    cases = []
    for n_iter, n_cycle, (inc, zero), (start, stop) in itertools.product(
        [0, 1, 5, 13, 40, 101, 1000],
        [1, 3, 4, 9, 60],
        [(0.25, 0.25), (0.5, 0.0), (1.0, 0.0), (0.3, 0.7), (0.1, 0.55)],
        [(0.0, 1.0), (-1.0, 0.5), (0.5, 0.5), (2.0, 1.0)],
    ):
        if (n_iter + n_cycle + int(inc * 10) + int(start)) % 4 == 0:
            cases.append((n_iter, start, stop, n_cycle, inc, zero))
    return cases + [(100_000, 0.0, 1.0, 4, 0.25, 0.25), (30, 0.0, 1.0, 22, 0.5, 0.5)]


@pytest.mark.parametrize("args", _zero_linear_cases())
def test_frange_cycle_zero_linear_matches_optimus(args):
    np.testing.assert_array_equal(
        frange_cycle_zero_linear(*args), optimus_frange_cycle_zero_linear(*args)
    )


@settings(max_examples=40, deadline=None)
@given(
    n_iter=st.integers(0, 2000),
    n_cycle=st.integers(1, 40),
    inc=st.floats(min_value=1e-3, max_value=1.0),
    zero_fraction=st.floats(min_value=0.0, max_value=1.0),
    start=_finite,
    delta=st.floats(min_value=-1.0, max_value=10.0),
)
def test_frange_cycle_zero_linear_matches_optimus_on_drawn_arguments(
    n_iter, n_cycle, inc, zero_fraction, start, delta
):
    zero = min((1.0 - inc) * zero_fraction, math.nextafter(1.0, 0.0))
    args = (n_iter, start, start + delta, n_cycle, inc, zero)
    np.testing.assert_array_equal(
        frange_cycle_zero_linear(*args), optimus_frange_cycle_zero_linear(*args)
    )


# ---- sigmoid / cosine ---------------------------------------------------------------


_NOTEBOOK = {
    "sigmoid": (frange_cycle_sigmoid, notebook_frange_cycle_sigmoid),
    "cosine": (frange_cycle_cosine, notebook_frange_cycle_cosine),
}


@pytest.mark.parametrize("kind", sorted(_NOTEBOOK))
@pytest.mark.parametrize(
    "n_iter,n_cycle,ratio",
    [(1, 1, 0.5), (10, 4, 0.5), (100, 4, 0.5), (101, 3, 0.8), (997, 7, 0.3), (40_000, 4, 0.5)],
)
def test_frange_cycle_sigmoid_cosine_match_the_notebook(kind, n_iter, n_cycle, ratio):
    ours, notebook = _NOTEBOOK[kind]
    got = ours(n_iter, 0.0, 1.0, n_cycle, ratio)
    # numpy's exp may differ from the C library's in the last bit; 0.5-0.5*cos
    # near 0 turns one ulp of cos into ~6e-17 absolute.
    np.testing.assert_allclose(
        got, notebook(0.0, 1.0, n_iter, n_cycle, ratio), rtol=5e-16, atol=1e-16
    )


@pytest.mark.parametrize("kind", sorted(_NOTEBOOK))
def test_frange_cycle_sigmoid_cosine_avoid_the_notebook_index_error(kind):
    ours, notebook = _NOTEBOOK[kind]
    with pytest.raises(IndexError):  # the last ramp reaches index n_epoch
        notebook(0.0, 1.0, 8, 4, 1.0)
    got = ours(8, 0.0, 1.0, 4, 1.0)
    assert got.shape == (8,) and np.all((got >= 0.0) & (got <= 1.0))


@pytest.mark.parametrize("kind", sorted(_NOTEBOOK))
@pytest.mark.parametrize("start,stop", [(0.2, 0.7), (-3.0, -1.0), (-1e3, 1e3), (0.1, 0.3)])
def test_frange_cycle_sigmoid_cosine_stay_within_start_stop(kind, start, stop):
    ours, _ = _NOTEBOOK[kind]
    got = ours(1003, start, stop, 5, 0.6)
    assert np.all((got >= start) & (got <= stop))
    assert got[-1] == stop  # past the last ramp: unwritten, holds stop
    # The ramp rises through most of the range, as for [0, 1].
    unit = ours(1003, 0.0, 1.0, 5, 0.6)
    assert got.min() == pytest.approx(start + (stop - start) * unit.min(), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("kind", sorted(_NOTEBOOK))
def test_frange_cycle_sigmoid_cosine_degenerate_ranges(kind):
    ours, _ = _NOTEBOOK[kind]
    np.testing.assert_array_equal(ours(50, 0.4, 0.4, 3, 0.5), np.full(50, 0.4))
    np.testing.assert_array_equal(ours(50, 0.9, 0.1, 3, 0.5), np.full(50, 0.1))
    assert ours(0, 0.0, 1.0, 3, 0.5).shape == (0,)


# ---- schedule objects ---------------------------------------------------------------


@st.composite
def _cyclical(draw, divisible: bool = False, zero: bool | None = None):
    n_cycles = draw(st.integers(1, 12))
    if divisible:
        total_steps = n_cycles * draw(st.integers(1, 150))
    else:
        total_steps = draw(st.integers(n_cycles, 1500))
    ratio = draw(st.one_of(st.just(1.0), st.floats(min_value=1e-3, max_value=1.0)))
    use_zero = draw(st.booleans()) if zero is None else zero
    zero_ratio = draw(st.floats(0.0, 1.0)) * (1.0 - ratio) if use_zero else 0.0
    zero_ratio = min(zero_ratio, math.nextafter(1.0, 0.0))
    start = draw(st.floats(-10.0, 10.0))
    stop = draw(st.one_of(st.floats(-10.0, 10.0), st.just(start)))
    shape = draw(st.sampled_from(schedules.SHAPES))
    return Cyclical(total_steps, n_cycles, ratio, start, stop, shape, zero_ratio)


_any_schedule = st.one_of(
    _cyclical(),
    st.builds(Monotonic, st.integers(0, 500), st.floats(-10, 10), st.floats(-10, 10)),
    st.builds(Capacity, st.floats(0, 100), st.integers(0, 500)),
    st.builds(Constant, st.floats(-10, 10)),
)


def _ends(schedule: Schedule) -> tuple[float, float]:
    params = schedule.to_params()
    return params[2], params[3]


@settings(max_examples=60, deadline=None)
@given(_any_schedule)
def test_values_stay_within_start_and_stop(schedule):
    start, stop = _ends(schedule)
    values = schedule.values(1600)
    assert np.all((values >= min(start, stop)) & (values <= max(start, stop)))
    assert values[-1] == stop  # past total_steps / warm-up: hold stop


@settings(max_examples=60, deadline=None)
@given(_any_schedule, st.lists(st.integers(0, 3000), max_size=30))
def test_values_equal_calls_exactly(schedule, steps):
    dense = schedule.values(1600)
    for k in list(range(0, 1600, 37)) + [1599]:
        assert dense[k] == schedule(k)
    sparse = schedule.values(np.array(steps, dtype=np.int64))
    assert sparse.tolist() == [schedule(k) for k in steps]


@settings(max_examples=50, deadline=None)
@given(_cyclical(divisible=True))
def test_cyclical_is_periodic(schedule):
    period = schedule.total_steps // schedule.n_cycles
    values = schedule.values(schedule.total_steps)
    np.testing.assert_array_equal(values[period:], values[:-period])


@settings(max_examples=50, deadline=None)
@given(_cyclical())
def test_cyclical_is_monotone_within_each_cycle(schedule):
    steps = np.arange(schedule.total_steps)
    values = schedule.values(steps)
    cycle = steps * schedule.n_cycles // schedule.total_steps  # exact cycle index
    sign = 1.0 if schedule.stop >= schedule.start else -1.0
    for c in range(schedule.n_cycles):
        assert np.all(sign * np.diff(values[cycle == c]) >= 0.0)


@settings(max_examples=50, deadline=None)
@given(_cyclical(zero=False))
def test_each_cycle_starts_at_start(schedule):
    if schedule.shape == "logistic":  # starts 0.25% of the way: test_logistic_shape
        return
    # Steps where a cycle begins exactly: t * n_cycles divisible by total_steps.
    first = [
        c * schedule.total_steps // schedule.n_cycles
        for c in range(schedule.n_cycles)
        if c * schedule.total_steps % schedule.n_cycles == 0
    ]
    assert schedule.values(np.array(first)).tolist() == [schedule.start] * len(first)
    assert schedule(schedule.total_steps) == schedule.stop


@pytest.mark.parametrize(
    "total_steps,n_cycles,ratio", [(40, 4, 0.5), (1000, 4, 0.5), (997, 1, 1.0), (999, 3, 0.3)]
)
def test_cyclical_linear_follows_frange_cycle_linear(total_steps, n_cycles, ratio):
    # Same schedule, closed form against float accumulation.
    reference = frange_cycle_linear(total_steps, 0.0, 1.0, n_cycles, ratio)
    got = Cyclical(total_steps, n_cycles, ratio).values(total_steps)
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-12)


def test_cyclical_with_zero_ratio_follows_optimus():
    reference = frange_cycle_zero_linear(1000, 0.0, 1.0, 4, 0.2, 0.4)
    got = Cyclical(1000, 4, ratio=0.2, zero_ratio=0.4).values(1000)
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [s for s in schedules.SHAPES if s != "logistic"])
def test_cyclical_shapes_hit_start_and_stop(shape):
    schedule = Cyclical(400, 4, 0.5, start=0.25, stop=0.75, shape=shape)
    values = schedule.values(400)
    assert values[0] == 0.25 and values[100] == 0.25 and values[50] == 0.75
    assert values[25] == pytest.approx(0.5, abs=1e-12)  # every shape is symmetric


def test_logistic_shape_is_the_unscaled_sigmoid_of_the_notebook():
    # frange_cycle_sigmoid of the authors' notebook writes 1/(1+exp(-(12u-6)))
    # over the ramp without rescaling (Sentence-VAE's logistic form): the
    # logistic shape is that, held at stop after the ramp.
    schedule = Cyclical(400, 4, 0.5, start=0.0, stop=1.0, shape="logistic")
    values = schedule.values(400)
    u = np.arange(50) / 50
    np.testing.assert_allclose(values[:50], 1 / (1 + np.exp(-(12 * u - 6))), rtol=1e-15)
    assert values[0] == pytest.approx(0.0024726231566347743, rel=1e-15)
    assert values[25] == pytest.approx(0.5, abs=1e-15)
    assert values[50:100].tolist() == [1.0] * 50 and values[100] == values[0]
    sigmoid = Cyclical(400, 4, 0.5, shape="sigmoid").values(400)
    assert sigmoid[0] == 0.0 and sigmoid[49] > values[49]


def test_monotonic_capacity_constant_values():
    np.testing.assert_allclose(Monotonic(4, 0.0, 2.0).values(6), [0, 0.5, 1, 1.5, 2, 2])
    np.testing.assert_allclose(Capacity(25.0, 5).values(7), [0, 5, 10, 15, 20, 25, 25])
    assert Monotonic(0, 0.3, 0.6).values(3).tolist() == [0.6, 0.6, 0.6]
    assert Constant(0.3).values(np.array([0, 10**12])).tolist() == [0.3, 0.3]
    assert Monotonic(10, 1.0, 0.0)(5) == 0.5  # decreasing ramps are allowed


def test_values_accepts_sequences_arrays_and_shapes():
    schedule = Cyclical(100, 2, 0.5)
    assert schedule.values([0, 25, 50]).tolist() == [0.0, 1.0, 0.0]
    grid = schedule.values(np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert grid.shape == (2, 3) and grid.dtype == np.float64
    assert schedule.values([]).shape == (0,)
    assert schedule.values(0).shape == (0,)
    assert schedule(2**70) == 1.0 and schedule.values(np.array([2**64 - 1], np.uint64))[0] == 1.0


def test_values_of_torch_tensors():
    schedule = Cyclical(1000, 4, 0.5, shape="cosine")
    steps = torch.tensor([[0, 10], [125, 999]], dtype=torch.int32)
    got = schedule.values(steps)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64 and got.shape == (2, 2)
    assert got.flatten().tolist() == [schedule(k) for k in (0, 10, 125, 999)]
    assert schedule(torch.tensor(125)) == schedule(125)


def test_values_many_steps_with_threads():
    # Large enough for several worker threads: chunk boundaries must not show.
    schedule = Cyclical(300_001, 7, 0.6, shape="sigmoid", zero_ratio=0.1)
    dense = schedule.values(300_005)
    steps = np.arange(300_005)[::-1].copy()
    np.testing.assert_array_equal(schedule.values(steps), dense[::-1])
    for k in (0, 65_535, 65_536, 150_000, 300_000, 300_004):
        assert dense[k] == schedule(k)


def test_state_dict_round_trip_repr_and_equality():
    schedule = Cyclical(1000, 3, 0.4, 0.1, 0.9, "sigmoid", 0.2)
    clone = Schedule.from_state_dict(schedule.state_dict())
    assert clone == schedule and clone is not schedule and clone.to_params() == schedule.to_params()
    assert repr(schedule) == (
        "Cyclical(total_steps=1000, n_cycles=3, ratio=0.4, start=0.1, stop=0.9, "
        "shape='sigmoid', zero_ratio=0.2)"
    )
    other = Cyclical(10)
    other.load_state_dict(schedule.state_dict())
    assert other == schedule and other(123) == schedule(123)
    assert Monotonic(10) != Capacity(1.0, 10) and Constant(0.5) == Constant(0.5)
    assert len(schedule.to_params()) == 8


# ---- BetaScheduler ------------------------------------------------------------------


def test_beta_scheduler_follows_the_schedule():
    schedule = Cyclical(40, 2, 0.5)
    scheduler = BetaScheduler(schedule)
    assert scheduler.last_step == 0 and scheduler.beta == schedule(0)
    betas = []
    for _ in range(50):
        scheduler.step()
        betas.append(scheduler.get_last_beta())
    assert betas == [schedule(k) for k in range(1, 51)] and scheduler.last_step == 50
    assert BetaScheduler(schedule, last_step=9).beta == schedule(10)


@pytest.mark.parametrize("via_torch_save", [False, True])
def test_beta_scheduler_resumes_exactly(via_torch_save):
    schedule = Cyclical(1000, 4, 0.5, shape="cosine", zero_ratio=0.1)
    uninterrupted = BetaScheduler(schedule)
    expected = []
    for _ in range(600):
        uninterrupted.step()
        expected.append(uninterrupted.beta)

    first = BetaScheduler(Cyclical(1000, 4, 0.5, shape="cosine", zero_ratio=0.1))
    seen = []
    for _ in range(250):
        first.step()
        seen.append(first.beta)
    state = first.state_dict()
    if via_torch_save:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)

    resumed = BetaScheduler(Monotonic(5))  # another schedule: replaced on load
    resumed.load_state_dict(state)
    assert resumed.last_step == 250 and resumed.beta == seen[-1]
    for _ in range(350):
        resumed.step()
        seen.append(resumed.beta)
    assert seen == expected
    assert resumed.schedule == schedule


# ---- errors: one test per path ------------------------------------------------------

_FRANGE_ERRORS = [
    (lambda: frange_cycle_linear(-1), ValueError, "n_iter must be >= 0"),
    (lambda: frange_cycle_linear(10.5), TypeError, "n_iter must be an integer, got float"),
    (lambda: frange_cycle_linear("10"), TypeError, "n_iter must be an integer"),
    (lambda: frange_cycle_linear(2**60), ValueError, "n_iter must be <= 2**53"),
    (lambda: frange_cycle_linear(10, n_cycle=0), ValueError, "n_cycle must be >= 1"),
    (lambda: frange_cycle_linear(10, ratio=0.0), ValueError, "ratio must be in (0, 1]"),
    (lambda: frange_cycle_linear(10, ratio=1.5), ValueError, "ratio must be in (0, 1]"),
    (lambda: frange_cycle_linear(10, ratio=math.nan), ValueError, "ratio must be finite"),
    (lambda: frange_cycle_linear(10, start=math.inf), ValueError, "start must be finite"),
    (lambda: frange_cycle_linear(10, stop=-math.inf), ValueError, "stop must be finite"),
    (lambda: frange_cycle_linear(1, n_cycle=2**53, ratio=5e-324), ValueError, "too small"),
    (lambda: frange_cycle_sigmoid(10, -1e308, 1e308), ValueError, "stop - start must be finite"),
    (lambda: frange_cycle_cosine(10, ratio=2.0), ValueError, "ratio must be in (0, 1]"),
    (
        lambda: frange_cycle_zero_linear(10, ratio_zero=1.0),
        ValueError,
        "ratio_zero must be in [0, 1)",
    ),
    (
        lambda: frange_cycle_zero_linear(10, ratio_increase=0.0),
        ValueError,
        "ratio_increase must be in (0, 1]",
    ),
    (
        lambda: frange_cycle_zero_linear(10, ratio_increase=0.8, ratio_zero=0.3),
        ValueError,
        "ratio_increase + ratio_zero must be <= 1",
    ),
]

_SCHEDULE_ERRORS = [
    (lambda: Cyclical(0), ValueError, "total_steps must be >= 1"),
    (lambda: Cyclical(10, n_cycles=0), ValueError, "n_cycles must be >= 1"),
    (lambda: Cyclical(10, n_cycles=11), ValueError, "n_cycles must be <= 10"),
    (lambda: Cyclical(2**40, n_cycles=2**13), ValueError, "total_steps * n_cycles"),
    (lambda: Cyclical(10, ratio=0.0), ValueError, "ratio must be in (0, 1]"),
    (lambda: Cyclical(10, zero_ratio=-0.1), ValueError, "zero_ratio must be in [0, 1)"),
    (lambda: Cyclical(10, ratio=0.6, zero_ratio=0.5), ValueError, "ratio + zero_ratio"),
    (lambda: Cyclical(10, shape="exp"), ValueError, "shape must be one of linear, sigmoid, cosine"),
    (lambda: Cyclical(10, start=math.nan), ValueError, "start must be finite"),
    (lambda: Cyclical(10, start=-1e308, stop=1e308), ValueError, "stop - start must be finite"),
    (lambda: Monotonic(-1), ValueError, "warmup_steps must be >= 0"),
    (lambda: Monotonic(1.5), ValueError, "warmup_steps must be a whole number"),
    (lambda: Capacity(-1.0, 10), ValueError, "c_max must be >= 0"),
    (lambda: Capacity(math.inf, 10), ValueError, "c_max must be finite"),
    (lambda: Constant(True), TypeError, "beta must be a real number"),
    (lambda: Cyclical(10)(-1), ValueError, "step must be >= 0"),
    (lambda: Cyclical(10)(1.0), TypeError, "step must be an integer"),
    # A bool tensor was taken as step 1, a 1-element 1-d tensor as its element.
    (lambda: Cyclical(10)(torch.tensor(True)), TypeError, "0-d integer tensor"),
    (lambda: Cyclical(10)(torch.tensor([5])), TypeError, "0-d integer tensor, got a tensor"),
    (lambda: Cyclical(10)(torch.tensor(5.0)), TypeError, "dtype torch.float32"),
    (lambda: Cyclical(10)(torch.tensor(-1)), ValueError, "step must be >= 0"),
    (lambda: Cyclical(10)(torch.empty((), dtype=torch.int64, device="meta")), ValueError, "meta"),
    (lambda: Cyclical(10).values(-1), ValueError, "n must be >= 0"),
    (lambda: Cyclical(10).values([3, -2]), ValueError, "steps must be >= 0, got -2 at index 1"),
    (lambda: Cyclical(10).values([0.5]), TypeError, "steps must be integers"),
    (
        lambda: Cyclical(10).values(torch.zeros(2)),
        TypeError,
        "steps must be an integer tensor",
    ),
    (
        lambda: Cyclical(10).load_state_dict(Monotonic(3).state_dict()),
        ValueError,
        "state_dict is for a 'Monotonic' schedule, not 'Cyclical'",
    ),
    (
        lambda: Monotonic(3).load_state_dict({"type": "Monotonic", "start": 0.0}),
        ValueError,
        "missing keys ['warmup_steps', 'stop']",
    ),
    (lambda: Schedule.from_state_dict({"type": "Linear"}), ValueError, "'type' must be one of"),
    (lambda: Schedule(), TypeError, "Schedule is abstract"),
    (lambda: BetaScheduler(lambda step: 0.0), TypeError, "schedule must be a klanneal Schedule"),
    (lambda: BetaScheduler(Constant(1.0), last_step=-2), ValueError, "last_step must be >= -1"),
    (
        lambda: BetaScheduler(Constant(1.0)).load_state_dict({"schedule": {}}),
        ValueError,
        "state_dict is missing 'last_step'",
    ),
    (lambda: BetaScheduler(Constant(1.0)).load_state_dict(None), ValueError, "must be a dict"),
    # The C++ checks behind the Python ones.
    (lambda: klanneal._C.schedule_value([2.0] * 7, 0), ValueError, "expected 8 floats"),
    (lambda: klanneal._C.schedule_value([9, 0, 0, 1, 1, 1, 1, 0], 0), ValueError, "kind must be"),
    (
        lambda: klanneal._C.schedule_value([2, 0, 0, 1, 10, 4, 0.7, 0.7], 0),
        ValueError,
        "ratio + zero_ratio",
    ),
    (lambda: klanneal._C.frange_cycle_linear(5, 0.0, 1.0, 0, 0.5), ValueError, "n_cycle"),
]


@pytest.mark.parametrize("call,error,fragment", _FRANGE_ERRORS + _SCHEDULE_ERRORS)
def test_bad_arguments_raise(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)


def test_missing_extension_raises_import_error(monkeypatch):
    monkeypatch.setattr(klanneal, "_C", None)
    with pytest.raises(ImportError, match="frange_cycle_linear needs the compiled extension"):
        frange_cycle_linear(10)


# ---- the pure-Python reference of schedule_value -----------------------------------

# One of every kind, shape and corner: decreasing ramps, a warm-up of 0
# steps, a period that is not a whole number of steps, one step per cycle.
_EVERY_KIND = [
    Constant(0.3),
    Monotonic(1000, 0.1, 0.9),
    Monotonic(977, 1.0, 0.0),
    Monotonic(0),
    Capacity(25.0, 3333),
    Capacity(1.5, 0),
    *(
        Cyclical(total_steps, n_cycles, ratio, start, stop, shape, zero_ratio)
        for shape in schedules.SHAPES
        for total_steps, n_cycles, ratio, start, stop, zero_ratio in [
            (1000, 4, 0.5, 0.0, 1.0, 0.0),
            (40_000, 7, 0.3, -1.0, 2.5, 0.25),
            (997, 13, 1.0, 1.0, 0.0, 0.0),
            (3, 3, 1.0, 0.0, 1.0, 0.0),
            (1001, 10, 1e-3, 0.0, 1.0, 0.999 - 1e-3),
        ]
    ),
]


def _many_steps(schedule: Schedule) -> np.ndarray:
    length = int(schedule.to_params()[4])  # total_steps / warm-up
    rng = np.random.default_rng(length)
    dense = np.arange(min(length + 10, 50_000), dtype=np.int64)
    return np.concatenate([dense, rng.integers(0, 2**62, 1000), [2**62]])


@pytest.mark.parametrize("schedule", _EVERY_KIND, ids=repr)
def test_python_reference_equals_the_cpp_values_exactly(schedule):
    steps = _many_steps(schedule)
    native = klanneal._C.schedule_values(schedule.to_params(), steps)
    reference = schedules.schedule_values_ref(schedule.to_params(), steps)
    assert reference.dtype == np.float64
    np.testing.assert_array_equal(reference, native)
    for k in steps[::97]:
        assert schedules.schedule_value_ref(schedule.to_params(), int(k)) == schedule(int(k))


@settings(max_examples=80, deadline=None)
@given(_any_schedule, st.lists(st.integers(0, 2**62), max_size=20))
def test_python_reference_equals_the_cpp_values_on_drawn_schedules(schedule, extra):
    steps = np.array(list(range(0, 1600, 7)) + extra, dtype=np.int64)
    native = klanneal._C.schedule_values(schedule.to_params(), steps)
    np.testing.assert_array_equal(
        schedules.schedule_values_ref(schedule.to_params(), steps), native
    )


def test_python_reference_clamps_negative_steps_like_cpp():
    params = Monotonic(10, 0.25, 1.0).to_params()
    assert schedules.schedule_value_ref(params, -5) == 0.25


@pytest.mark.parametrize("disable", ["env", "missing"])
def test_schedules_work_without_the_extension(monkeypatch, disable):
    expected = {
        repr(s): (s(123), s.values(1200), s.values(np.array([[5, 0], [7, 999]])))
        for s in _EVERY_KIND
    }
    if disable == "env":
        monkeypatch.setenv("KLANNEAL_DISABLE_NATIVE", "1")
    else:
        monkeypatch.setattr(klanneal, "_C", None)
    calls = []
    # The schedule objects are defined in klanneal._closed_form (schedules re-exports them).
    monkeypatch.setattr(
        _closed_form, "schedule_value_ref", _counting(schedules.schedule_value_ref, calls)
    )
    for schedule in _EVERY_KIND:
        # Constructed without the extension too: validation is in Python.
        rebuilt = Schedule.from_state_dict(schedule.state_dict())
        value, dense, grid = expected[repr(schedule)]
        assert rebuilt(123) == value
        np.testing.assert_array_equal(rebuilt.values(1200), dense)
        np.testing.assert_array_equal(rebuilt.values(np.array([[5, 0], [7, 999]])), grid)
        assert torch.equal(rebuilt.values(torch.arange(1200)), torch.from_numpy(dense))
    assert calls, "the Python reference was not used"
    scheduler = BetaScheduler(Cyclical(100, 2))
    for _ in range(10):
        scheduler.step()
    assert scheduler.beta == 0.4  # 10 steps into a 25-step ramp
    with pytest.raises(ValueError, match="steps must be >= 0, got -3 at index 1"):
        Monotonic(10).values(np.array([2, -3]))
    with pytest.raises(ValueError, match="ratio must be in"):
        Cyclical(100, ratio=0.0)
    with pytest.raises(ImportError, match="needs the compiled extension"):
        frange_cycle_sigmoid(10)


def _counting(function, calls):
    def wrapper(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    return wrapper


def test_scheduled_beta_in_the_loss_without_the_extension(monkeypatch):
    logits = torch.randn(3, 4, 7, dtype=torch.float64)
    tokens = torch.randint(0, 7, (3, 4))
    mu, logvar = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    schedule = Cyclical(100, 2, shape="cosine")
    native = klanneal.elbo_loss(logits, tokens, mu, logvar, schedule, step=torch.tensor(13))
    monkeypatch.setenv("KLANNEAL_DISABLE_NATIVE", "1")
    for step in (13, torch.tensor(13)):
        fallback = klanneal.elbo_loss(logits, tokens, mu, logvar, schedule, step=step)
        assert float(fallback.beta) == schedule(13) == float(native.beta)
        torch.testing.assert_close(fallback.loss, native.loss)


# ---- CUDA ------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", schedules.SHAPES)
def test_values_on_cuda_match_the_cpu(shape):
    schedule = Cyclical(100_003, 5, 0.6, 0.1, 0.9, shape, 0.1)
    steps = torch.arange(0, 200_000, 3, dtype=torch.int64)
    cpu = schedule.values(steps)
    gpu = schedule.values(steps.cuda())
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float64
    if shape == "linear":
        assert torch.equal(gpu.cpu(), cpu)
    else:  # device exp/cos may differ in the last bit
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-15, atol=1e-15)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        schedule.values(torch.tensor([1, -1], device="cuda"))


def test_uint64_steps_beyond_int64_clamp_as_numpy_ones_do():
    # Regression: a torch.uint64 step tensor went through int64, so 2**63
    # came out as a negative step ("steps must be >= 0") or failed to convert.
    schedule = Cyclical(10)
    for big in (2**63, 2**64 - 1):
        want = schedule.values(np.array([big, 3], dtype=np.uint64))
        got = schedule.values(torch.tensor([big, 3], dtype=torch.uint64))
        np.testing.assert_array_equal(got.numpy(), want)
        assert schedule(torch.tensor(big, dtype=torch.uint64)) == schedule(2**63 - 1)
    assert schedule(torch.tensor(4, dtype=torch.int32)) == schedule(4)
