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
