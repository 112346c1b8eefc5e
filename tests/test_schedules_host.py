"""Schedules evaluated in Python/PyTorch: FromArray, Offset, Logistic, LinearWarmup.

Logistic and LinearWarmup are checked against Sentence-VAE's
kl_anneal_function (timbmg/Sentence-VAE, train.py), transcribed below.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import klanneal
from klanneal import schedules as S


def sentence_vae_kl_anneal_function(anneal_function, step, k, x0):
    if anneal_function == "logistic":
        return float(1 / (1 + np.exp(-k * (step - x0))))
    elif anneal_function == "linear":
        return min(1, step / x0)


STEPS = list(range(0, 12001, 7)) + [2499, 2500, 2501, 10**6]


@pytest.mark.parametrize(("k", "x0"), [(0.0025, 2500), (0.01, 100), (1e-4, 0)])
def test_logistic_is_sentence_vaes_logistic(k, x0):
    schedule = S.Logistic(k=k, x0=x0)
    want = np.array([sentence_vae_kl_anneal_function("logistic", s, k, x0) for s in STEPS])
    got = np.array([schedule(s) for s in STEPS])
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)
    np.testing.assert_allclose(schedule.values(np.array(STEPS)), want, rtol=1e-15, atol=0)
    tensor = schedule.values(torch.tensor(STEPS))
    np.testing.assert_allclose(tensor.numpy(), want, rtol=1e-15, atol=0)
    # Not rescaled: it starts above 0 and never quite reaches 1.
    assert schedule(0) == pytest.approx(1 / (1 + np.exp(k * x0)))


@pytest.mark.parametrize("x0", [2500, 7, 0.5])
def test_linear_warmup_is_sentence_vaes_linear(x0):
    schedule = S.LinearWarmup(x0=x0)
    for s in STEPS:
        assert schedule(s) == sentence_vae_kl_anneal_function("linear", s, 0.0025, x0)


def test_from_array_indexes_by_step_and_holds_the_last_value():
    values = S.frange_cycle_linear(100, 0.1, 1.0, 4, 0.45)
    schedule = S.FromArray(values)
    assert [schedule(s) for s in range(100)] == values.tolist()
    assert schedule(100) == schedule(10**12) == values[-1]
    np.testing.assert_array_equal(schedule.values(150)[:100], values)
    assert schedule.values(torch.tensor([3, 500])).tolist() == [values[3], values[-1]]
    # A copy: changing the caller's array changes nothing.
    values[0] = 5.0
    assert schedule(0) == 0.1
    assert S.FromArray([0.5, 1]) == S.FromArray(np.array([0.5, 1.0]))
    assert S.FromArray([0.5, 1]) != S.FromArray([0.5, 0.9])


def test_the_authors_beta_sequence_through_an_array_and_an_offset():
    # The authors' cyclical loop (beta += step before use, from 0.1, 1 at each
    # cycle's last step) is frange_cycle_linear(T, 0.1, 1, 4, 0.45) read at
    # step + 1: the offset on a FromArray, evaluated by ELBOLoss.
    n = 200
    values = S.frange_cycle_linear(n, 0.1, 1.0, 4, 0.45)
    schedule = S.FromArray(values).offset(1)
    criterion = klanneal.nn.ELBOLoss(schedule)
    seen = []
    for _ in range(n - 1):
        seen.append(criterion.beta)
        criterion.step()
    assert seen == values[1:].tolist()


def test_offset_on_every_schedule_kind():
    for schedule in (
        S.Cyclical(100, 4),
        S.Monotonic(10, 0.1),
        S.Constant(0.3),
        S.Logistic(0.1, 20),
        S.FromArray([0.0, 0.5, 1.0]),
    ):
        shifted = schedule.offset(3)
        assert [shifted(s) for s in range(40)] == [schedule(s + 3) for s in range(40)]
        np.testing.assert_array_equal(shifted.values(40), schedule.values(43)[3:])
        got = shifted.values(torch.arange(40))
        np.testing.assert_array_equal(got.numpy(), schedule.values(43)[3:])
        if not isinstance(schedule, S.FromArray):  # a table's state has no values
            assert S.Schedule.from_state_dict(shifted.state_dict()) == shifted


@pytest.mark.parametrize(
    "schedule",
    [S.FromArray(np.linspace(0, 1, 30)), S.Cyclical(30, 2).offset(1), S.Logistic(0.3, 10)],
    ids=["array", "offset", "logistic"],
)
def test_host_schedules_in_elbo_loss_match_their_value(schedule):
    torch.manual_seed(0)
    x = torch.randn(3, 5, requires_grad=True)
    y = torch.rand(3, 5)
    mu, logvar = torch.randn(3, 2), torch.randn(3, 2)
    for step in (0, 9, 29, 400):
        want = klanneal.elbo_loss(x, y, mu, logvar, schedule(step), likelihood="bernoulli")
        for s in (step, torch.tensor(step)):
            got = klanneal.elbo_loss(x, y, mu, logvar, schedule, step=s, likelihood="bernoulli")
            torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=0)
            assert float(got.beta) == pytest.approx(schedule(step), rel=1e-7)
        ref = klanneal.elbo_loss_ref(
            x, y, mu, logvar, schedule, step=torch.tensor(step), likelihood="bernoulli"
        )
        torch.testing.assert_close(ref.loss, want.loss, rtol=1e-6, atol=0)


def test_arrays_are_accepted_as_schedules():
    values = [0.0, 0.25, 0.5]
    criterion = klanneal.nn.ELBOLoss(np.array(values))
    assert isinstance(criterion.schedule, S.FromArray)
    criterion.set_step(2)
    assert criterion.beta == 0.5
    assert isinstance(klanneal.nn.ELBOLoss(values).schedule, S.FromArray)
    assert isinstance(klanneal.nn.ELBOLoss(torch.tensor(values)).schedule, S.FromArray)
    assert S.BetaScheduler(values).beta == 0.0
    x, y = torch.randn(2, 3), torch.rand(2, 3)
    mu = logvar = torch.zeros(2, 1)
    out = klanneal.elbo_loss(x, y, mu, logvar, values, step=1, likelihood="bernoulli")
    assert float(out.beta) == 0.25


def test_from_array_state_dict_is_its_identity():
    a = klanneal.nn.ELBOLoss(S.FromArray([0.1, 0.2, 0.3]))
    a.step()
    state = a.state_dict()
    assert state["_extra_state"]["schedule"]["length"] == 3
    b = klanneal.nn.ELBOLoss(S.FromArray([0.1, 0.2, 0.3]))
    b.load_state_dict(state)
    assert int(b.current_step) == 1
    with pytest.raises(ValueError, match="construct FromArray"):
        S.Schedule.from_state_dict(S.FromArray([1.0]).state_dict())
    with pytest.raises(ValueError, match="another table"):
        S.FromArray([1.0, 2.0]).load_state_dict(S.FromArray([1.0]).state_dict())
    sched = S.BetaScheduler(S.FromArray([0.1, 0.2, 0.3]))
    sched.step()
    other = S.BetaScheduler(S.FromArray([0.1, 0.2, 0.3]))
    other.load_state_dict(sched.state_dict())
    assert other.beta == 0.2


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: S.FromArray([]), ValueError, "at least one value"),
        (lambda: S.FromArray([0.1, -0.5]), ValueError, r"values\[1\] = -0.5"),
        (lambda: S.FromArray([0.1, float("nan")]), ValueError, r"values\[1\] = nan"),
        (lambda: S.FromArray("0.5"), TypeError, "1-D sequence"),
        (lambda: S.FromArray(0.5), TypeError, "1-D sequence"),
        (lambda: S.FromArray(np.zeros((2, 2))), TypeError, "2 dimension"),
        (lambda: S.FromArray(["a", "b"]), TypeError, "real numbers"),
        (lambda: S.Cyclical(10).offset(-1), ValueError, "steps must be >= 0"),
        (lambda: S.Offset(0.5), TypeError, "klanneal.schedules object"),
        (lambda: S.Logistic(k=0), ValueError, "k must be > 0"),
        (lambda: S.Logistic(x0=-1), ValueError, "x0 must be finite and >= 0"),
        (lambda: S.LinearWarmup(x0=0), ValueError, "x0 must be > 0"),
        (lambda: S.LinearWarmup(x0="1"), TypeError, "x0 must be a real number"),
        (lambda: S.FromArray([1.0])(-1), ValueError, "step must be >= 0"),
        (lambda: S.FromArray([1.0]).values(np.array([0.5])), TypeError, "integers"),
        (lambda: S.FromArray([1.0]).to_params(), TypeError, "no closed-form parameters"),
    ],
)
def test_host_schedule_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_host_schedule_is_not_a_capacity_and_needs_a_step():
    x, y = torch.randn(2, 3), torch.rand(2, 3)
    mu = logvar = torch.zeros(2, 1)
    with pytest.raises(TypeError, match="capacity: .* is evaluated in Python"):
        klanneal.elbo_loss(
            x, y, mu, logvar, 1.0, step=0, capacity=S.Logistic(), likelihood="bernoulli"
        )
    with pytest.raises(ValueError, match="step is required"):
        klanneal.elbo_loss(x, y, mu, logvar, S.Logistic(), likelihood="bernoulli")
    for step in (torch.tensor(1.0), torch.tensor([1])):
        with pytest.raises(TypeError, match="0-d integer tensor"):
            klanneal.elbo_loss(x, y, mu, logvar, S.Logistic(), step=step, likelihood="bernoulli")


@pytest.mark.parametrize(
    "call",
    [
        lambda: S.frange_cycle_linear(0.0, 1.0, 40000, 4, 0.5),
        lambda: S.frange_cycle_linear(40000.0),
        lambda: S.frange_cycle_linear(100, 0.0, 1.0, 4.0),
        lambda: S.frange_cycle_sigmoid(100.0),
        lambda: S.frange_cycle_cosine(100.0),
        lambda: S.frange_cycle_zero_linear(np.float64(100)),
    ],
)
def test_frange_refuses_a_float_length_as_the_published_code_does(call):
    # The published function: np.ones(40000.0) raises TypeError.
    with pytest.raises(TypeError, match="must be an integer, got float"):
        call()
    with pytest.raises(TypeError):
        np.ones(40000.0)
