"""Learning-rate schedulers that follow a beta schedule's cycles.

``CyclicalCosineLR`` (exposed as ``klanneal.schedules.CyclicalCosineLR``,
imported lazily there, so ``klanneal.schedules`` itself does not import
torch) and ``Fu2019LR`` (``klanneal.recipes.fu2019(...).lr_scheduler``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from klanneal._closed_form import Cyclical, Schedule
from klanneal._fu2019 import SCHEDULES, fu2019_lr

__all__ = ["CyclicalCosineLR", "Fu2019LR"]


class CyclicalCosineLR(LRScheduler):
    """Cosine learning-rate restarts aligned with the cycles of a beta schedule.

    A per-step cosine (our own scheduler, not the authors': their released
    code sets the rate once per epoch, ten levels per cycle, never 0; that is
    ``klanneal.recipes.fu2019(...).lr_scheduler``): the
    learning rate restarts at the start of every beta cycle and decays over
    the cycle as ``lr = base_lr * (min_factor + (1 - min_factor) * 0.5 *
    (1 + cos(pi * tau)))``, with ``tau`` in [0, 1) the position inside the
    cycle, computed exactly as the schedule computes it (so the learning rate
    is at its peak on exactly the steps where beta restarts). From
    ``schedule.total_steps`` on, the schedule holds beta at ``stop`` and the
    learning rate holds ``base_lr * min_factor``.

    Step it once per optimizer step, after ``optimizer.step()``, like the
    rest of torch's schedulers (and :class:`klanneal.schedules.BetaScheduler`)::

        schedule = Cyclical(total_steps=steps, n_cycles=4, ratio=0.5, start=0.1)
        lr_scheduler = CyclicalCosineLR(optimizer, schedule)
        for step in range(steps):
            ...
            optimizer.step()
            lr_scheduler.step()

    ``state_dict()`` / ``load_state_dict()`` resume the sequence exactly.

    Args:
        optimizer: The wrapped optimizer; its ``lr`` of each group is the peak.
        schedule: A :class:`klanneal.schedules.Cyclical` (the schedule whose
            cycles the restarts follow).
        min_factor: Learning rate at the end of each cycle, as a fraction of
            the peak, in [0, 1].
        last_epoch: The step already taken (-1 for a fresh start).

    Raises:
        TypeError: ``schedule`` is not a Schedule, or a schedule without
            cycles (Constant, Monotonic, Capacity).
        ValueError: ``min_factor`` outside [0, 1], or ``last_epoch`` < -1.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        min_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a klanneal Schedule, got {type(schedule).__name__}")
        if not isinstance(schedule, Cyclical):
            raise TypeError(
                f"schedule must have cycles (a klanneal.schedules.Cyclical); "
                f"{type(schedule).__name__} has none, so there is nothing to restart at"
            )
        self.schedule = schedule
        self.min_factor = _checked_min_factor(min_factor, "min_factor")
        super().__init__(optimizer, _checked_last_epoch(last_epoch, "last_epoch"))

    def position(self, step: int) -> float:
        """tau in [0, 1): where ``step`` lies in its cycle (1.0 from ``total_steps`` on)."""
        total, n_cycles = int(self.schedule.total_steps), int(self.schedule.n_cycles)
        step = max(0, int(step))
        if step >= total:
            return 1.0
        # Integer arithmetic: the same cycle boundaries as the C++ schedule's.
        scaled = step * n_cycles
        cycle = scaled // total
        return (scaled - cycle * total) / total

    def factor(self, step: int) -> float:
        """The learning rate at ``step`` as a fraction of the peak."""
        tau = self.position(step)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * tau))

    def get_lr(self) -> list[float | torch.Tensor]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float | torch.Tensor]:
        return self.get_lr()

    def state_dict(self) -> dict[str, Any]:
        """torch's scheduler state plus the schedule's parameters."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "schedule")}
        state["schedule"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next :meth:`step` continues exactly.

        Every field is checked as the constructor checks its argument, before
        any is set: a state that would give another learning rate (a
        ``min_factor`` above 1, a fractional ``last_epoch``, ``base_lrs`` for
        another number of parameter groups) or replace the optimizer is refused.

        Raises:
            ValueError: ``state_dict`` is not a dict from :meth:`state_dict`
                (a key missing or unknown), the saved schedule differs from
                this scheduler's, or a value is out of range.
            TypeError: A value of the wrong type.
        """
        if not isinstance(state_dict, dict) or "schedule" not in state_dict:
            raise ValueError(
                "state_dict must be a dict from CyclicalCosineLR.state_dict (with its "
                f"'schedule'), got {type(state_dict).__name__}"
                + (f" with keys {sorted(state_dict)}" if isinstance(state_dict, dict) else "")
            )
        state = dict(state_dict)
        saved = state.pop("schedule")
        if saved != self.schedule.state_dict():
            raise ValueError(
                f"state_dict was saved with schedule {saved!r}, "
                f"this scheduler follows {self.schedule.state_dict()!r}"
            )
        mine = self.state_dict()
        missing = sorted({"min_factor", "base_lrs", "last_epoch"} - set(state))
        unknown = sorted(set(state) - set(mine), key=str)
        if missing or unknown:
            raise ValueError(
                f"state_dict must be a dict from CyclicalCosineLR.state_dict: missing keys "
                f"{missing}, unknown keys {unknown}"
            )
        n_groups = len(self.optimizer.param_groups)
        for key, value in state.items():
            name = f"state_dict[{key!r}]"
            if key == "min_factor":
                state[key] = _checked_min_factor(value, name)
            elif key == "last_epoch":
                state[key] = _checked_last_epoch(value, name)
            elif key in ("base_lrs", "_last_lr"):
                state[key] = _checked_lrs(value, n_groups, name)
            elif key == "_step_count":
                state[key] = _checked_int(value, 0, name)
            elif type(value) is not type(mine[key]):  # torch's other bookkeeping (bools)
                raise TypeError(
                    f"{name} must be a {type(mine[key]).__name__}, got {type(value).__name__}"
                )
        self.__dict__.update(state)


def _checked_min_factor(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    factor = float(value)
    if not 0.0 <= factor <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {factor}")
    return factor


def _checked_int(value: Any, low: int, name: str, note: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}{note}, got {value}")
    return int(value)


def _checked_last_epoch(value: Any, name: str) -> int:
    return _checked_int(value, -1, name, " (-1: a fresh start)")


def _checked_lrs(value: Any, n_groups: int, name: str) -> list[Any]:
    """One finite learning rate >= 0 (a number or a 0-d tensor) per parameter group."""
    if not isinstance(value, (list, tuple)) or len(value) != n_groups:
        got = f"{len(value)} values" if isinstance(value, (list, tuple)) else type(value).__name__
        raise ValueError(
            f"{name} must be a list of {n_groups} learning rates (one per parameter group of "
            f"the optimizer), got {got}"
        )
    for lr in value:
        given: Any = lr  # checked at run time: a state_dict may hold anything
        tensor = isinstance(given, torch.Tensor) and given.dim() == 0
        if not (tensor or isinstance(given, numbers.Real)) or isinstance(given, bool):
            raise TypeError(f"{name} must hold numbers, got {type(given).__name__}")
        number = float(given)
        if not (math.isfinite(number) and number >= 0):
            raise ValueError(f"{name} must hold finite learning rates >= 0, got {number}")
    return list(value)


class Fu2019LR(LRScheduler):
    """The learning rate of Fu et al. (2019)'s released language-model scripts,
    per training step: built by ``klanneal.recipes.fu2019(...).lr_scheduler``.

    Cyclical: ``base_lr * 0.5 * (1 + cos(pi * k / 10))`` for the ``k``-th tenth
    of a cycle (the authors' ``k``-th epoch of a 10-epoch cycle), with the
    authors' expression, so the rates are the same floats; monotonic: the base
    rate. Step it once per training step, after ``optimizer.step()``.

    Args:
        optimizer: The wrapped optimizer; each group's ``lr`` is its base rate.
        total_steps: The run's length in steps (>= 4).
        schedule: "cyclical" or "monotonic".
        last_epoch: The step already taken (-1 for a fresh start).

    Raises:
        TypeError, ValueError: An argument of the wrong type or out of range.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        schedule: str = "cyclical",
        last_epoch: int = -1,
    ) -> None:
        total: Any = total_steps  # checked at run time: a caller may pass anything
        if isinstance(total, bool) or not isinstance(total, numbers.Integral):
            raise TypeError(f"total_steps must be an int, got {type(total).__name__}")
        if total < 4:
            raise ValueError(f"total_steps must be >= 4 (one per cycle), got {total}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        given: Any = last_epoch
        if isinstance(given, bool) or not isinstance(given, numbers.Integral):
            raise TypeError(f"last_epoch must be an int, got {type(given).__name__}")
        if given < -1:
            raise ValueError(f"last_epoch must be >= -1 (-1: a fresh start), got {given}")
        self.total_steps: int = int(total)
        self.schedule: str = schedule
        super().__init__(optimizer, int(given))

    def get_lr(self) -> list[float | torch.Tensor]:
        if self.schedule == "monotonic":
            return list(self.base_lrs)
        step = max(0, self.last_epoch)
        return [fu2019_lr(float(base), step, self.total_steps) for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float | torch.Tensor]:
        return self.get_lr()
