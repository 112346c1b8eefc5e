"""Command line: ``python -m klanneal schedule ...`` plots beta schedules.

Example::

    python -m klanneal schedule --shape cyclical --n-cycles 4 --ratio 0.5 \\
        --steps 40000 --out schedule.png
    python -m klanneal schedule --shape cyclical --ramp linear --ramp cosine \\
        --shape monotonic --steps 40000 --out compare.png
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from klanneal import schedules
from klanneal._plot import plot_schedules

_MISSING_MATPLOTLIB = 2  # exit status, as for a usage error

# The schedule options, their defaults and the shapes they apply to. They
# are parsed with default None, so that an option given for a shape it does
# not apply to is rejected instead of silently ignored.
_DEFAULTS: dict[str, Any] = {
    "n_cycles": 4,
    "ratio": 0.5,
    "zero_ratio": 0.0,
    "ramp": None,
    "start": 0.0,
    "stop": 1.0,
    "warmup": None,
    "beta": 1.0,
    "c_max": 25.0,
}
_APPLIES_TO = {
    "n_cycles": ("cyclical",),
    "ratio": ("cyclical",),
    "zero_ratio": ("cyclical",),
    "ramp": ("cyclical",),
    "start": ("cyclical", "monotonic"),
    "stop": ("cyclical", "monotonic"),
    "warmup": ("monotonic", "capacity"),
    "beta": ("constant",),
    "c_max": ("capacity",),
}


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
    plot.add_argument("--n-cycles", type=int, help="cyclical: number of cycles (default 4)")
    plot.add_argument(
        "--ratio", type=float, help="cyclical: fraction of a period spent ramping (default 0.5)"
    )
    plot.add_argument(
        "--zero-ratio",
        type=float,
        help="cyclical: fraction of a period held at --start before the ramp (default 0)",
    )
    plot.add_argument(
        "--ramp",
        action="append",
        choices=schedules.SHAPES,
        help="cyclical: ramp shape (repeatable; default: linear)",
    )
    plot.add_argument(
        "--start", type=float, help="cyclical/monotonic: value at the start of a ramp (default 0)"
    )
    plot.add_argument(
        "--stop", type=float, help="cyclical/monotonic: value at the end of a ramp (default 1)"
    )
    plot.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="monotonic/capacity: warm-up steps (default: a cyclical ramp's length)",
    )
    plot.add_argument("--beta", type=float, help="constant: the value (default 1)")
    plot.add_argument("--c-max", type=float, help="capacity: final capacity in nats (default 25)")
    plot.add_argument("--title", default=None, help="figure title")
    plot.add_argument(
        "--out",
        default="schedule.png",
        help="output PNG path (missing directories are created)",
    )
    return parser, {"schedule": plot}


def _check_applicable(args: argparse.Namespace, shapes: list[str]) -> None:
    """Reject an option given for none of the chosen shapes; then fill in the defaults."""
    for name, applies_to in _APPLIES_TO.items():
        given = getattr(args, name)
        if given is not None and not set(applies_to) & set(shapes):
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} applies only to --shape {' or '.join(applies_to)}, but the "
                f"schedules plotted are: {', '.join(shapes)}"
            )
        if given is None:
            setattr(args, name, _DEFAULTS[name])


def _schedules_from_args(args: argparse.Namespace) -> list[tuple[str, schedules.Schedule]]:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    _check_applicable(args, args.shape or ["cyclical"])
    warmup = args.warmup
    if warmup is None:
        # The default warm-up is computed from --ratio before any schedule
        # checks it: a ratio round() cannot take must fail here, by name.
        if not (math.isfinite(args.ratio) and 0 < args.ratio <= 1):
            raise ValueError(f"--ratio must be in (0, 1], got {args.ratio}")
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
    out: str, steps: int, curves: list[tuple[str, schedules.Schedule]], title: Optional[str]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot_schedules(curves, steps, title)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _prepare_out(out: str) -> None:
    """Create the output's missing parent directories; a clear error if that fails."""
    parent = Path(out).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out: cannot create the directory {parent}: {err.strerror}") from None
    if Path(out).is_dir():
        raise ValueError(f"--out must be a file path, but {out} is a directory")


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
    try:
        _prepare_out(args.out)
    except ValueError as err:
        parser.error(str(err))
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
