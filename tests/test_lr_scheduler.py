"""klanneal.schedules.CyclicalCosineLR: restarts aligned with the beta cycles, resume."""

from __future__ import annotations

import math

import pytest
import torch

from klanneal.schedules import Constant, Cyclical, CyclicalCosineLR, Monotonic


def _optimizer(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(scheduler: CyclicalCosineLR, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize(("total", "cycles"), [(40, 4), (37, 4), (1000, 3), (20, 5)])
def test_restarts_fall_exactly_where_beta_restarts(total, cycles):
    schedule = Cyclical(total_steps=total, n_cycles=cycles, ratio=0.5, start=0.1)
    lrs = _lrs(CyclicalCosineLR(_optimizer(), schedule), total)
    betas = [schedule(t) for t in range(total)]
    beta_restarts = [t for t in range(total) if t == 0 or betas[t] < betas[t - 1]]
    # Restarts: the steps where the learning rate jumps up (it only falls inside a cycle).
    lr_restarts = [t for t in range(total) if t == 0 or lrs[t] > lrs[t - 1]]
    assert beta_restarts == lr_restarts
    assert len(lr_restarts) == cycles
    if total % cycles == 0:  # whole-step periods: each restart is exactly the peak
        assert [lrs[t] for t in lr_restarts] == [1e-3] * cycles


def test_values_follow_the_cosine_and_min_factor():
    schedule = Cyclical(total_steps=40, n_cycles=4)
    sched = CyclicalCosineLR(_optimizer(2.0), schedule, min_factor=0.25)
    lrs = _lrs(sched, 45)
    for t in range(40):
        tau = (t % 10) / 10
        expected = 2.0 * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * tau)))
        assert lrs[t] == pytest.approx(expected, rel=1e-12)
    # After the schedule's last step beta holds `stop`, the learning rate its minimum.
    assert lrs[40:] == [pytest.approx(0.5)] * 5


def test_state_dict_resumes_exactly():
    schedule = Cyclical(total_steps=50, n_cycles=4, ratio=0.5)
    straight = _lrs(CyclicalCosineLR(_optimizer(), schedule), 50)
    first = CyclicalCosineLR(_optimizer(), schedule)
    head = _lrs(first, 23)
    state = first.state_dict()
    assert state["schedule"] == schedule.state_dict()
    opt = _optimizer()
    second = CyclicalCosineLR(opt, schedule)
    second.load_state_dict(state)
    opt.param_groups[0]["lr"] = second.get_last_lr()[0]
    assert head + _lrs(second, 27) == straight
    other = CyclicalCosineLR(_optimizer(), Cyclical(total_steps=60, n_cycles=4))
    with pytest.raises(ValueError, match="saved with schedule"):
        other.load_state_dict(state)


def test_saved_through_torch_save(tmp_path):
    schedule = Cyclical(total_steps=20, n_cycles=2)
    sched = CyclicalCosineLR(_optimizer(), schedule)
    _lrs(sched, 7)
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    again = CyclicalCosineLR(_optimizer(), schedule)
    again.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert again.last_epoch == 7


@pytest.mark.parametrize(
    ("schedule", "error", "fragment"),
    [
        (Constant(1.0), TypeError, "has none"),
        (Monotonic(10), TypeError, "has none"),
        (0.5, TypeError, "klanneal Schedule"),
    ],
)
def test_a_schedule_without_cycles_is_rejected(schedule, error, fragment):
    with pytest.raises(error, match=fragment):
        CyclicalCosineLR(_optimizer(), schedule)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_min_factor_is_checked(bad):
    with pytest.raises(ValueError, match="min_factor"):
        CyclicalCosineLR(_optimizer(), Cyclical(10), min_factor=bad)
    with pytest.raises(TypeError, match="min_factor"):
        CyclicalCosineLR(_optimizer(), Cyclical(10), min_factor="0.1")


def test_last_epoch_and_state_dict_are_checked():
    # Both were accepted: a fractional, bool or < -1 last_epoch ran with a
    # plausible rate; load_state_dict(None) was a bare TypeError and another
    # scheduler's state (no 'schedule') was copied in without a check.
    for bad, error in ((2.5, TypeError), (True, TypeError), (-5, ValueError)):
        with pytest.raises(error, match="last_epoch"):
            CyclicalCosineLR(_optimizer(), Cyclical(10), last_epoch=bad)
    scheduler = CyclicalCosineLR(_optimizer(), Cyclical(10))
    other = torch.optim.lr_scheduler.StepLR(_optimizer(), step_size=3)
    for state in (None, other.state_dict()):
        with pytest.raises(ValueError, match="state_dict must be a dict from CyclicalCosineLR"):
            scheduler.load_state_dict(state)


def _saved_state(n_groups: int = 1) -> dict:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(n_groups)]
    scheduler = CyclicalCosineLR(torch.optim.SGD(groups, lr=0.1), Cyclical(10))
    scheduler.optimizer.step()
    scheduler.step()
    return scheduler.state_dict()


@pytest.mark.parametrize(
    ("change", "error", "fragment"),
    [
        ({"min_factor": 5.0}, ValueError, r"'min_factor'\] must be in \[0, 1\], got 5.0"),
        ({"min_factor": "0.1"}, TypeError, r"state_dict\['min_factor'\] must be a float"),
        ({"last_epoch": 2.5}, TypeError, r"state_dict\['last_epoch'\] must be an int, got float"),
        ({"last_epoch": "abc"}, TypeError, r"state_dict\['last_epoch'\] must be an int, got str"),
        ({"last_epoch": True}, TypeError, r"state_dict\['last_epoch'\] must be an int"),
        ({"last_epoch": -2}, ValueError, r"state_dict\['last_epoch'\] must be >= -1"),
        ({"base_lrs": []}, ValueError, r"state_dict\['base_lrs'\] must be a list of 1 learning"),
        ({"base_lrs": 0.1}, ValueError, r"state_dict\['base_lrs'\] must be a list of 1 learning"),
        ({"base_lrs": ["0.1"]}, TypeError, r"state_dict\['base_lrs'\] must hold numbers"),
        ({"base_lrs": [float("nan")]}, ValueError, r"finite learning rates >= 0, got nan"),
        ({"base_lrs": [-1.0]}, ValueError, r"finite learning rates >= 0, got -1.0"),
        ({"_last_lr": [0.1, 0.1]}, ValueError, r"state_dict\['_last_lr'\] must be a list of 1"),
        ({"_step_count": -1}, ValueError, r"state_dict\['_step_count'\] must be >= 0"),
        ({"_is_initial": 1}, TypeError, r"state_dict\['_is_initial'\] must be a bool, got int"),
        ({"optimizer": None}, ValueError, r"unknown keys \['optimizer'\]"),
        ({"schedule_": 1}, ValueError, r"unknown keys \['schedule_'\]"),
    ],
)
def test_load_state_dict_checks_every_field(change, error, fragment):
    # Regression: every field but 'schedule' was copied in unchecked
    # (self.__dict__.update): min_factor=5.0 gave a learning rate above the
    # peak, last_epoch=2.5 ran, last_epoch="abc" and base_lrs=[] failed later
    # with unrelated errors, and "optimizer": None replaced the optimizer.
    scheduler = CyclicalCosineLR(_optimizer(), Cyclical(10))
    before = dict(scheduler.__dict__)
    with pytest.raises(error, match=fragment):
        scheduler.load_state_dict({**_saved_state(), **change})
    assert scheduler.__dict__ == before  # nothing was set


def test_load_state_dict_needs_the_scheduler_fields():
    state = _saved_state()
    del state["base_lrs"]
    with pytest.raises(ValueError, match=r"missing keys \['base_lrs'\]"):
        CyclicalCosineLR(_optimizer(), Cyclical(10)).load_state_dict(state)


def test_load_state_dict_accepts_its_own_states():
    # Several parameter groups, tensor learning rates, numpy scalars.
    import numpy as np

    state = _saved_state(n_groups=2)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(2)]
    scheduler = CyclicalCosineLR(torch.optim.SGD(groups, lr=0.1), Cyclical(10))
    scheduler.load_state_dict({**state, "min_factor": np.float64(0.5), "last_epoch": np.int64(3)})
    assert scheduler.last_epoch == 3 and type(scheduler.last_epoch) is int
    assert scheduler.min_factor == 0.5 and type(scheduler.min_factor) is float
    scheduler.load_state_dict({**state, "base_lrs": [torch.tensor(0.1), 0.2]})
    assert scheduler.get_lr()[1] == pytest.approx(0.2 * scheduler.factor(1))
