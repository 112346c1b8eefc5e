"""KL-weight (beta) schedules for VAE training, computed in klanneal's C++ core.

Two families:

* ``frange_cycle_*``: the array functions of the cyclical-annealing paper's
  code (Fu et al., NAACL 2019) and of Optimus (Li et al., EMNLP 2020),
  returning float64 numpy arrays. ``frange_cycle_linear`` and
  ``frange_cycle_zero_linear`` are bit-identical to the published Python.
* Schedule objects (``Constant``, ``Monotonic``, ``Cyclical``, ``Capacity``;
  defined in ``klanneal._closed_form``): closed-form, O(1) per step, the same
  C++ formula on CPU and GPU, and the stateful ``BetaScheduler`` wrapper with
  the protocol of torch's LR schedulers. Without the extension (or with
  ``KLANNEAL_DISABLE_NATIVE=1``) they are evaluated by
  :func:`schedule_value_ref`, a line-by-line Python transcription of the C++
  formula; the ``frange_cycle_*`` arrays need the extension.
* Schedules evaluated in Python/PyTorch (``FromArray``, ``Offset`` via
  ``schedule.offset(k)``, ``Logistic``, ``LinearWarmup``; defined in
  ``klanneal._host_schedules``): tables of values and other codebases'
  formulas, taken everywhere a schedule is.

This module defines nothing of its own but the lazy ``CyclicalCosineLR`` and
``KLController``: it gathers the public names of the modules above (and
``plot_schedules``, ``klanneal._plot``), none of which imports it back.

Example:
    >>> from klanneal.schedules import BetaScheduler, Cyclical
    >>> schedule = Cyclical(total_steps=40_000, n_cycles=4, ratio=0.5)
    >>> schedule(0), schedule(2_500), schedule(5_000)
    (0.0, 0.5, 1.0)
    >>> scheduler = BetaScheduler(schedule)  # scheduler.beta == schedule(0)
"""

from __future__ import annotations

from typing import Any

from klanneal._beta_scheduler import BetaScheduler
from klanneal._closed_form import Capacity, Constant, Cyclical, Monotonic, Schedule
from klanneal._frange import (
    frange_cycle_cosine,
    frange_cycle_linear,
    frange_cycle_sigmoid,
    frange_cycle_zero_linear,
)
from klanneal._host_schedules import FromArray, LinearWarmup, Logistic, Offset
from klanneal._plot import plot_schedules  # noqa: F401 - re-exported
from klanneal._schedule_args import SHAPES
from klanneal._schedule_ref import schedule_value_ref, schedule_values_ref
from klanneal._sizing import ScheduleLengthWarning

__all__ = [
    "SHAPES",
    "BetaScheduler",
    "Capacity",
    "Constant",
    "Cyclical",
    "CyclicalCosineLR",  # noqa: F822 - defined lazily by __getattr__
    "FromArray",
    "KLController",  # noqa: F822 - defined lazily by __getattr__
    "LinearWarmup",
    "Logistic",
    "Monotonic",
    "Offset",
    "Schedule",
    "ScheduleLengthWarning",
    "frange_cycle_cosine",
    "frange_cycle_linear",
    "frange_cycle_sigmoid",
    "frange_cycle_zero_linear",
    "schedule_value_ref",
    "schedule_values_ref",
]


def __getattr__(name: str) -> Any:
    # CyclicalCosineLR subclasses torch's LRScheduler and KLController holds
    # tensors: imported on first use, so that importing the schedules does
    # not import torch.
    if name == "CyclicalCosineLR":
        from klanneal._lr import CyclicalCosineLR

        return CyclicalCosineLR
    if name == "KLController":  # a feedback controller on torch tensors
        from klanneal._controller import KLController

        return KLController
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
