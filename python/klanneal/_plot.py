"""The plot of labelled schedules: ``klanneal.schedules.plot_schedules``, drawn
by ``python -m klanneal schedule`` (klanneal._cli) and the examples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import numpy as np

from klanneal._closed_form import Capacity, Schedule

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_schedules"]

# Evaluating every step of a long schedule is cheap, plotting it is not: a
# line of more points than this is drawn from evenly spaced steps.
_MAX_PLOT_POINTS = 20_000


def plot_schedules(
    curves: Sequence[tuple[str, Schedule]], steps: int, title: Optional[str] = None
) -> Figure:
    """A matplotlib figure of labelled schedules over steps ``0 .. steps - 1``.

    Beta schedules share the left axis; a :class:`klanneal.schedules.Capacity`
    target C(t) is in nats, a different quantity on a different scale, so it
    is drawn on its own right-hand axis (the only axis when nothing else is
    plotted). Lines of more than 20,000 points are drawn from evenly spaced
    steps. Needs matplotlib.

    Args:
        curves: ``(label, schedule)`` pairs.
        steps: Number of steps (>= 1).
        title: Figure title (default "klanneal schedules").

    Returns:
        The figure (the caller saves or shows it and closes it).
    """
    import matplotlib.pyplot as plt

    xs = np.unique(np.linspace(0, steps - 1, min(steps, _MAX_PLOT_POINTS)).astype(np.int64))
    fig, beta_ax = plt.subplots(figsize=(8, 3.5))
    Curves = list[tuple[str, Schedule]]
    betas: Curves = [(label, s) for label, s in curves if not isinstance(s, Capacity)]
    capacities: Curves = [(label, s) for label, s in curves if isinstance(s, Capacity)]
    axes = []
    if betas:
        axes.append((beta_ax, betas, "beta"))
    if capacities:
        capacity_ax = beta_ax.twinx() if betas else beta_ax
        axes.append((capacity_ax, capacities, "capacity C(t) (nats)"))
    handles = []
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * len(curves))
    for ax, group, ylabel in axes:
        for label, schedule in group:
            values = np.asarray(schedule.values(xs))
            (line,) = ax.plot(xs, values, label=label, linewidth=1.5, color=next(colors))
            handles.append(line)
        ax.set_ylabel(ylabel)
    beta_ax.set_xlabel("training step")
    beta_ax.set_title(title or "klanneal schedules")
    beta_ax.grid(alpha=0.3)
    beta_ax.legend(handles=handles, loc="best", fontsize="small")
    fig.tight_layout()
    return fig
