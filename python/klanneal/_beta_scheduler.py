"""``klanneal.schedules.BetaScheduler``: a schedule stepped like torch's LR schedulers."""

from __future__ import annotations

from typing import Any

from klanneal._closed_form import Schedule
from klanneal._schedule_args import _MAX_STEP, _as_int


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
