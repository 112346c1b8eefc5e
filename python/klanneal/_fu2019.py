"""The authors' loops of the fu2019 recipe in closed form: beta and the
learning rate at a step (see klanneal.recipes, whose docstring derives them).
Shared by ``klanneal.recipes`` and the learning-rate scheduler
``klanneal._lr.Fu2019LR``; plain numpy, no torch."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

#: The constants of the authors' scripts.
N_CYCLES = 4  # num_epochs 40 / cycle 10
CYCLE_EPOCHS = 10  # --cycle: the learning rate's levels per cycle
BETA_START = 0.1  # args.beta at a cycle's (or the run's) start
CYCLICAL_RAMP = 0.45  # (1 - 0.1) / (1 / warmup 5 epochs) = 4.5 of 10 epochs
MONOTONIC_RAMP = 0.225  # (1 - 0.1) / (1 / warmup 10 epochs) = 9 of 40 epochs
SCHEDULES = ("cyclical", "monotonic")


def _cycle_start(cycle: npt.NDArray[np.int64], total: int) -> npt.NDArray[np.int64]:
    """The first step of each cycle: ceil(cycle * total / M), in integers."""
    result: npt.NDArray[np.int64] = -((-cycle * total) // N_CYCLES)
    return result


def fu2019_betas(total_steps: int, schedule: str) -> FloatArray:
    """Beta at steps ``0 .. total_steps - 1`` (see klanneal.recipes' docstring)."""
    steps = np.arange(total_steps, dtype=np.int64)
    if schedule == "monotonic":
        ramp = MONOTONIC_RAMP * total_steps
        betas: FloatArray = np.minimum(1.0, BETA_START + (1.0 - BETA_START) * (steps + 1) / ramp)
        return betas
    cycle = (steps * N_CYCLES) // total_steps
    position = steps - _cycle_start(cycle, total_steps)
    ramp = CYCLICAL_RAMP * total_steps / N_CYCLES
    betas = np.minimum(1.0, BETA_START + (1.0 - BETA_START) * (position + 1) / ramp)
    return betas


def fu2019_lr_level(step: int, total_steps: int) -> int:
    """The tenth of its cycle that ``step`` falls in (the authors' epoch within a cycle)."""
    step = min(step, total_steps - 1)
    cycle = (step * N_CYCLES) // total_steps
    position = step - int(_cycle_start(np.int64(cycle), total_steps))
    return (CYCLE_EPOCHS * position * N_CYCLES) // total_steps


def fu2019_lr(base_lr: float, step: int, total_steps: int) -> float:
    """The cyclical run's learning rate at ``step``, with the authors' expression."""
    tmp = float(fu2019_lr_level(step, total_steps)) / CYCLE_EPOCHS
    return float(base_lr * 0.5 * (1 + np.cos(tmp * np.pi)))
