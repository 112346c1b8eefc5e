"""Schedule lengths against the run's: ELBOLoss past a cyclical schedule's end,
Cyclical.for_trainer, and the length checks the Lightning callback uses."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from klanneal._sizing import length_mismatch, schedule_length
from klanneal.nn import ELBOLoss
from klanneal.schedules import (
    Capacity,
    Constant,
    Cyclical,
    FromArray,
    KLController,
    LinearWarmup,
    Logistic,
    Monotonic,
    ScheduleLengthWarning,
)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(4, 6, generator=g),
        torch.randint(0, 6, (4,), generator=g),
        torch.randn(4, 2, generator=g),
        torch.randn(4, 2, generator=g),
    )


def _calls(criterion, n):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(n):
            criterion(*_inputs())
            criterion.step()
    return [w for w in record if w.category is ScheduleLengthWarning]


def test_elbo_loss_warns_once_the_first_time_past_a_cyclical_schedules_end():
    criterion = ELBOLoss(Cyclical(total_steps=5, n_cycles=2))
    record = _calls(criterion, 9)
    assert len(record) == 1
    assert str(record[0].message).startswith(
        "ELBOLoss: step 5 is past the end of its schedule Cyclical(total_steps=5"
    )
    assert "its 2 cycles ended at step 5 and beta holds stop=1.0" in str(record[0].message)


def test_the_end_counts_an_offset_and_steps_set_or_loaded():
    assert len(_calls(ELBOLoss(Cyclical(6, 2).offset(2)), 4)) == 0
    assert "step 4 is past the end" in str(_calls(ELBOLoss(Cyclical(6, 2).offset(2)), 5)[0].message)
    moved = ELBOLoss(Cyclical(100, 4))
    moved.set_step(99)
    assert "step 100 is past" in str(_calls(moved, 2)[0].message)
    loaded = ELBOLoss(Cyclical(100, 4))
    _calls(loaded, 1)  # the step is being counted: a load must reset that count
    saved = ELBOLoss(Cyclical(100, 4))
    saved.set_step(150)
    loaded.load_state_dict(saved.state_dict())
    assert "step 150 is past" in str(_calls(loaded, 1)[0].message)


def test_no_warning_for_ramps_evaluation_or_within_the_cycles():
    assert _calls(ELBOLoss(Monotonic(3)), 6) == []  # a ramp holds stop by design
    assert _calls(ELBOLoss(Cyclical(6, 2)), 6) == []
    assert _calls(ELBOLoss(KLController(1.0)), 3) == []
    evaluating = ELBOLoss(Cyclical(2, 1)).eval()
    assert _calls(evaluating, 4) == []


def test_schedule_lengths():
    assert schedule_length(Cyclical(40, 4)) == 40
    assert schedule_length(Monotonic(7)) == schedule_length(Capacity(3.0, 7)) == 7
    assert schedule_length(Constant(0.5)) == 0
    assert schedule_length(LinearWarmup(7.5)) == 8
    assert schedule_length(FromArray(np.zeros(5))) == 4
    assert schedule_length(Monotonic(7).offset(3)) == 4
    assert schedule_length(Monotonic(7).offset(30)) == 0
    assert schedule_length(Logistic()) is None
    assert schedule_length(KLController(1.0)) is None
    assert schedule_length(0.5) is None


def test_length_mismatches():
    assert length_mismatch(Cyclical(8, 2), 8) is None
    assert length_mismatch(Monotonic(4), 8) is None  # ramps, then holds stop
    assert length_mismatch(Monotonic(8), 8) is None  # ramps over the whole run
    assert length_mismatch(FromArray(np.zeros(8)), 8) is None
    assert length_mismatch(Logistic(), 8) is None
    assert "only 0.50 of its 2 cycles fit" in length_mismatch(Cyclical(16, 2), 4)
    assert "end at step 8" in length_mismatch(Cyclical(8, 2), 10)
    assert "never reach its final value" in length_mismatch(Monotonic(9), 8)
    assert "its last 2 values are never used" in length_mismatch(FromArray(np.zeros(10)), 8)
    assert "its last value is used for the rest" in length_mismatch(FromArray(np.zeros(6)), 8)


class _Planned:
    """Stands for a Lightning Trainer: only its planned steps."""

    def __init__(self, steps: float) -> None:
        self._steps = steps

    @property
    def estimated_stepping_batches(self) -> float:
        return self._steps


def test_for_trainer_takes_the_planned_steps():
    schedule = Cyclical.for_trainer(_Planned(120), n_cycles=3, ratio=0.25)
    assert schedule == Cyclical(120, n_cycles=3, ratio=0.25)


def test_for_trainer_errors():
    with pytest.raises(TypeError, match="trainer must be a Lightning Trainer"):
        Cyclical.for_trainer(object())
    with pytest.raises(ValueError, match="the trainer plans inf optimizer steps"):
        Cyclical.for_trainer(_Planned(math.inf))
    with pytest.raises(ValueError, match="the trainer plans 0 optimizer steps"):
        Cyclical.for_trainer(_Planned(0))
    with pytest.raises(ValueError, match="n_cycles must be <= 3"):
        Cyclical.for_trainer(_Planned(3), n_cycles=4)
