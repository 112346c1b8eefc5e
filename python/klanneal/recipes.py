"""Training recipes of published experiments, as library objects.

``fu2019``: the language-model experiment of Fu et al. (NAACL 2019), as the
authors' released scripts run it (haofuml/cyclical_annealing,
``language_model/train_text_cyc_ptb.py`` and ``train_text_bl_ptb.py``).
What those scripts do, per training batch (``N`` batches per epoch, 40 epochs):

* cyclical: every 10 epochs (a cycle; 4 in all) beta is reset to 0.1; before
  each batch ``beta = min(1, beta + 1 / (5 N))``, so the batch at position
  ``j`` (0-based) of its cycle sees ``min(1, 0.1 + (j + 1) / (5 N))``: the
  ramp reaches 1 after 4.5 of the 10 epochs (45% of a cycle) and holds 1 to
  the cycle's end. The learning rate is set once per epoch, for the ``k``-th
  epoch of a cycle (k = 0..9) ``lr * 0.5 * (1 + cos(pi * k / 10))``: ten
  levels per cycle, the lowest ``0.0245 lr``, never 0.
* monotonic: beta starts at 0.1 and before each batch ``beta = min(1, beta +
  1 / (10 N))``: 1 after 9 of the 40 epochs (22.5% of the run); the learning
  rate is constant.

At 40 epochs the schedules below equal a transcription of those loops on
every step (beta within 1e-12, the learning rate bit for bit; the loops'
running sums and our closed form differ by their rounding). At another budget
they keep the same shape in units of cycles, which is **our generalisation**:
M = 4 cycles of ``total_steps / 4`` steps, in each beta from 0.1 up by 0.9
over 45% of the cycle, increment before use; the monotonic ramp reaching 1
at 22.5% of the run; the learning rate constant over each tenth of a cycle
(a tenth of a cycle is the authors' epoch). Step boundaries are rounded to
whole steps as ``floor(step * M / total_steps)`` (cycle) and
``floor(10 * j * M / total_steps)`` (tenth) do.

Past ``total_steps`` beta and the learning rate hold their last values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from klanneal._fu2019 import (  # noqa: F401 - the recipe's constants, re-exported
    BETA_START,
    CYCLE_EPOCHS,
    CYCLICAL_RAMP,
    MONOTONIC_RAMP,
    N_CYCLES,
    SCHEDULES,
    FloatArray,
    fu2019_betas,
    fu2019_lr,
    fu2019_lr_level,
)
from klanneal._schedule_args import _as_int
from klanneal.schedules import FromArray

__all__ = ["Fu2019", "fu2019"]


@dataclass(frozen=True)
class Fu2019:
    """The fu2019 recipe for one run: ``beta`` (a schedule of the 0-based
    training step) and :meth:`lr_scheduler`. Built by :func:`fu2019`.

    Attributes:
        steps_per_epoch: batches per epoch (the authors' ``len(train_data)``).
        epochs: the budget in epochs (the paper: 40).
        schedule: "cyclical" or "monotonic".
        total_steps: ``round(epochs * steps_per_epoch)``.
        beta: a :class:`klanneal.schedules.FromArray` of the run's betas, to
            pass as ``ELBOLoss(beta)``, ``elbo_loss(..., beta, step=step)`` or
            to the Lightning callback's loss.
    """

    steps_per_epoch: int
    epochs: float
    schedule: str
    total_steps: int
    beta: FromArray

    @property
    def n_cycles(self) -> int:
        """4 for the cyclical schedule, 1 for the monotonic one."""
        return N_CYCLES if self.schedule == "cyclical" else 1

    def lr_factor(self, step: int) -> float:
        """The learning rate at ``step`` as a fraction of the base (1 for monotonic)."""
        if self.schedule == "monotonic":
            return 1.0
        return fu2019_lr(1.0, _as_int("step", step, 0, 2**62), self.total_steps)

    def lr_scheduler(self, optimizer: Any, last_epoch: int = -1) -> Any:
        """A torch LR scheduler for ``optimizer``, stepped once per training step
        (after ``optimizer.step()``), as torch's schedulers are. Cyclical: the
        authors' per-epoch cosine levels (each param group from its own
        ``initial_lr``); monotonic: a constant learning rate."""
        from klanneal._lr import Fu2019LR

        return Fu2019LR(optimizer, self.total_steps, self.schedule, last_epoch=last_epoch)


def fu2019(steps_per_epoch: int, epochs: float = 40, schedule: str = "cyclical") -> Fu2019:
    """The paper's language-model recipe (Fu et al. 2019) for a data set of
    ``steps_per_epoch`` batches per epoch.

    Args:
        steps_per_epoch: integer >= 1.
        epochs: the budget, > 0 (the paper's 40; fractional budgets allowed,
            as long as the run has at least 4 steps; below 40 steps some of the
            ten learning-rate levels of a cycle get no step).
        schedule: "cyclical" (train_text_cyc_ptb.py) or "monotonic"
            (train_text_bl_ptb.py).

    Returns:
        A :class:`Fu2019` with ``.beta`` and ``.lr_scheduler(optimizer)``.

    Raises:
        TypeError: A non-integer ``steps_per_epoch`` or a non-number ``epochs``.
        ValueError: Out of range, an unknown schedule, or fewer than 4 steps.
    """
    steps_per_epoch = _as_int("steps_per_epoch", steps_per_epoch, 1, 2**40)
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float, np.integer, np.floating)):
        raise TypeError(f"epochs must be a number, got {type(epochs).__name__}")
    if not 0 < float(epochs) < float("inf"):
        raise ValueError(f"epochs must be finite and > 0, got {epochs!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    total = round(float(epochs) * steps_per_epoch)
    if total < N_CYCLES:
        raise ValueError(
            f"fu2019 needs at least {N_CYCLES} steps (one per cycle), got {epochs} epochs x "
            f"{steps_per_epoch} = {total}"
        )
    return Fu2019(
        steps_per_epoch, float(epochs), schedule, total, FromArray(fu2019_betas(total, schedule))
    )
