"""Cyclical vs monotonic KL annealing: a table of beta values and a plot.

    python examples/plot_schedules.py [--steps 40000] [--out demo_output/schedule_shapes.png]

The cyclical schedule (Fu et al., NAACL 2019) repeats the warm-up of the
monotonic one: beta ramps from 0 to 1 over the first half of each of 4
periods and then holds 1, so the decoder is periodically pushed to use the
latent code again. Uses only the public API.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from klanneal.schedules import Cyclical, Monotonic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40_000, help="training steps")
    # Not demo_output/schedules.png: `make demo` writes that one (its summary links it).
    parser.add_argument("--out", default=os.path.join("demo_output", "schedule_shapes.png"))
    args = parser.parse_args(argv)
    if args.steps < 8:  # 4 cycles, and a monotonic warm-up of steps // 8 >= 1
        parser.error(f"--steps must be >= 8, got {args.steps}")

    cyclical = Cyclical(total_steps=args.steps, n_cycles=4, ratio=0.5)
    # The same ramp length as one cyclical ramp, then beta = 1 for good.
    monotonic = Monotonic(warmup_steps=args.steps // 8)

    table_steps = [round(f * args.steps) for f in (0, 0.0625, 0.125, 0.25, 0.3125, 0.5, 0.75, 1)]
    table_steps[-1] = args.steps - 1
    print(f"{'step':>8}  {'cyclical':>9}  {'monotonic':>9}")
    for step in table_steps:
        print(f"{step:>8}  {cyclical(step):>9.4f}  {monotonic(step):>9.4f}")

    try:
        import matplotlib
    except ImportError:
        print("error: the plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(args.steps)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(steps, cyclical.values(steps), label="cyclical (4 cycles, ratio 0.5)")
    ax.plot(steps, monotonic.values(steps), label=f"monotonic ({args.steps // 8} warm-up steps)")
    ax.set_xlabel("training step")
    ax.set_ylabel("beta")
    ax.set_title("KL annealing: cyclical vs monotonic")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
