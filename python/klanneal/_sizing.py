"""How long a schedule runs, against how long training runs.

A schedule sized for another run is a silent bug: a ramp longer than the
run never reaches its stop value, cycles longer than the run do not fit,
and cycles shorter than it end early and hold ``stop`` for the rest. These
helpers give a schedule's length, the optimizer steps a Lightning trainer
plans, and the warnings that ``klanneal.nn.ELBOLoss`` and
``klanneal.integrations.lightning.KLAnnealing`` raise.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from klanneal._closed_form import Capacity, Constant, Cyclical, Monotonic, Schedule
from klanneal._host_schedules import FromArray, LinearWarmup, Offset

# Defined below the schedule objects, which use it (Cyclical.for_trainer); re-exported.
from klanneal._schedule_args import planned_steps

__all__ = ["ScheduleLengthWarning", "cycles_end", "planned_steps", "schedule_length"]


class ScheduleLengthWarning(UserWarning):
    """A schedule's length does not match the training run's."""


def schedule_length(schedule: Any) -> Optional[int]:
    """The step from which ``schedule`` holds its final value: ``total_steps``
    (Cyclical), ``warmup_steps`` (Monotonic, Capacity), ``ceil(x0)``
    (LinearWarmup), the table's length minus one (FromArray), the inner
    length minus the offset (Offset); 0 for a Constant; None for a schedule
    without one (Logistic, a KLController, anything else)."""
    if isinstance(schedule, Cyclical):
        return schedule.total_steps
    if isinstance(schedule, (Monotonic, Capacity)):
        return schedule.warmup_steps
    if isinstance(schedule, Constant):
        return 0
    if isinstance(schedule, LinearWarmup):
        return math.ceil(schedule.x0)
    if isinstance(schedule, FromArray):
        return schedule.length - 1
    if isinstance(schedule, Offset):
        inner = schedule_length(schedule.schedule)
        return None if inner is None else max(0, inner - schedule.steps)
    return None


def _cyclical(schedule: Any) -> Optional[Cyclical]:
    """The Cyclical inside ``schedule`` (itself or under Offsets), else None."""
    while isinstance(schedule, Offset):
        schedule = schedule.schedule
    return schedule if isinstance(schedule, Cyclical) else None


def cycles_end(schedule: Any) -> Optional[int]:
    """The step at which the cycles of a cyclical schedule (or an Offset of
    one) end, after which it holds ``stop``; None for any other schedule."""
    if _cyclical(schedule) is None:
        return None
    return schedule_length(schedule)


def past_end_message(schedule: Schedule, step: int, end: int) -> str:
    """ELBOLoss's warning the first time it is called past a cyclical schedule's end."""
    cyclical = _cyclical(schedule)
    assert cyclical is not None
    return (
        f"ELBOLoss: step {step} is past the end of its schedule {schedule!r}: its "
        f"{cyclical.n_cycles} cycles ended at step {end} and beta holds stop={cyclical.stop} "
        "from here. Size the schedule to the run's optimizer steps (total_steps, or "
        "Cyclical.for_trainer(trainer, ...) under Lightning)"
    )


def length_mismatch(schedule: Any, planned: int) -> Optional[str]:
    """What goes wrong when ``schedule`` runs for ``planned`` optimizer steps
    (steps ``0 .. planned - 1``; None when nothing does): a cyclical schedule
    whose ``total_steps`` is not ``planned`` (cycles that do not fit, or end
    early), a table of another length than ``planned``, a ramp that ends
    after the run (beta never reaches its final value)."""
    if isinstance(schedule, FromArray):
        if schedule.length == planned:
            return None
        return (
            f"its table of {schedule.length} values is indexed by the {planned} optimizer "
            "steps the trainer plans: "
            + (
                "its last value is used for the rest"
                if schedule.length < planned
                else f"its last {schedule.length - planned} values are never used"
            )
        )
    length = schedule_length(schedule)
    if length is None or length == planned:
        return None
    cyclical = _cyclical(schedule)
    if cyclical is not None:
        period = cyclical.total_steps / cyclical.n_cycles
        if planned < length:
            return (
                f"only {planned / period:.2f} of its {cyclical.n_cycles} cycles fit in the "
                f"{planned} optimizer steps the trainer plans (it spans {length})"
            )
        return (
            f"its {cyclical.n_cycles} cycles end at step {length} and beta holds "
            f"stop={cyclical.stop} for the last {planned - length} of the {planned} optimizer "
            "steps the trainer plans"
        )
    if planned < length:
        return (
            f"beta would never reach its final value: it gets there at step {length}, past "
            f"the {planned} optimizer steps the trainer plans"
        )
    return None
