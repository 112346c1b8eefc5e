"""Command line: ``python -m klanneal schedule ...`` plots beta schedules.

Example::

    python -m klanneal schedule --shape cyclical --n-cycles 4 --ratio 0.5 \\
        --steps 40000 --out schedule.png
    python -m klanneal schedule --shape cyclical --ramp linear --ramp cosine \\
        --shape monotonic --steps 40000 --out compare.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from klanneal import schedules

# Evaluating every step of a long schedule is cheap, plotting it is not: a
# line of more points than this is drawn from evenly spaced steps.
_MAX_PLOT_POINTS = 20_000
_MISSING_MATPLOTLIB = 2  # exit status, as for a usage error


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="python -m klanneal", description="klanneal command line tools"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plot = commands.add_parser(
        "schedule",
        help="plot one or more beta schedules to a PNG",
        description=(
            "Plot beta schedules over --steps training steps. Repeat --shape (and, for "
            "cyclical, --ramp) to draw several schedules in one figure."
        ),
    )
    plot.add_argument(
        "--shape",
        action="append",
        choices=("constant", "monotonic", "cyclical", "capacity"),
        help="schedule to plot (repeatable; default: cyclical)",
    )
    plot.add_argument("--steps", type=int, default=40_000, help="training steps to plot")
    plot.add_argument("--n-cycles", type=int, default=4, help="cyclical: number of cycles")
    plot.add_argument(
        "--ratio", type=float, default=0.5, help="cyclical: fraction of a period spent ramping"
    )
    plot.add_argument(
        "--zero-ratio",
        type=float,
        default=0.0,
        help="cyclical: fraction of a period held at --start before the ramp",
    )
    plot.add_argument(
        "--ramp",
        action="append",
        choices=schedules.SHAPES,
        help="cyclical: ramp shape (repeatable; default: linear)",
    )
    plot.add_argument("--start", type=float, default=0.0, help="value at the start of a ramp")
    plot.add_argument("--stop", type=float, default=1.0, help="value at the end of a ramp")
    plot.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="monotonic/capacity: warm-up steps (default: a cyclical ramp's length)",
    )
    plot.add_argument("--beta", type=float, default=1.0, help="constant: the value")
    plot.add_argument("--c-max", type=float, default=25.0, help="capacity: final capacity (nats)")
    plot.add_argument("--title", default=None, help="figure title")
    plot.add_argument("--out", default="schedule.png", help="output PNG path")
    return parser, {"schedule": plot}


def _schedules_from_args(args: argparse.Namespace) -> list[tuple[str, schedules.Schedule]]:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    warmup = args.warmup
    if warmup is None:
        warmup = max(1, round(args.steps / max(args.n_cycles, 1) * args.ratio))
    built: list[tuple[str, schedules.Schedule]] = []
    for shape in args.shape or ["cyclical"]:
        if shape == "constant":
            built.append((f"constant {args.beta:g}", schedules.Constant(args.beta)))
        elif shape == "monotonic":
            built.append(
                (f"monotonic ({warmup} steps)", schedules.Monotonic(warmup, args.start, args.stop))
            )
        elif shape == "capacity":
            built.append(
                (f"capacity C(t), c_max={args.c_max:g}", schedules.Capacity(args.c_max, warmup))
            )
        else:
            for ramp in args.ramp or ["linear"]:
                schedule = schedules.Cyclical(
                    args.steps,
                    args.n_cycles,
                    args.ratio,
                    args.start,
                    args.stop,
                    ramp,
                    args.zero_ratio,
                )
                built.append((f"cyclical {ramp} ({args.n_cycles} cycles)", schedule))
    return built


def _plot(
    out: str, steps: int, curves: list[tuple[str, schedules.Schedule]], title: str | None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = np.unique(np.linspace(0, steps - 1, min(steps, _MAX_PLOT_POINTS)).astype(np.int64))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for label, schedule in curves:
        ax.plot(xs, schedule.values(xs), label=label, linewidth=1.5)
    ax.set_xlabel("training step")
    has_capacity = any(isinstance(s, schedules.Capacity) for _, s in curves)
    ax.set_ylabel("beta (capacity: nats)" if has_capacity else "beta")
    ax.set_title(title or "klanneal schedules")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _schedule_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        curves = _schedules_from_args(args)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "error: plotting needs matplotlib, which is not installed; install it with "
            "`pip install matplotlib` (or klanneal's extra: `pip install 'klanneal[bench]'`)",
            file=sys.stderr,
        )
        return _MISSING_MATPLOTLIB
    _plot(args.out, args.steps, curves, args.title)
    for label, schedule in curves:
        print(f"{label}: {schedule!r}")
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a usage error (argparse exits
        with it) or when matplotlib is missing.
    """
    parser, subparsers = _build_parser()
    args = parser.parse_args(argv)
    return _schedule_command(args, subparsers[args.command])
