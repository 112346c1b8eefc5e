"""The command line of the single-cell example: flags and main()."""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import klanneal

from .data import make_counts, split_cells
from .report import (
    FIGURE,
    MISSING_MATPLOTLIB,
    build_summary,
    data_summary,
    eps_sentence,
    format_table,
    has_matplotlib,
    plot,
    write_outputs,
)
from .train import (
    EXTRA_SCHEDULES,
    SCHEDULE_NAMES,
    eps_effect,
    make_schedule,
    reference_separation,
    train_one,
)


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(
        description="Train an scVI-like VAE on synthetic ZINB counts with monotonic and "
        "cyclical KL annealing (klanneal's ZINB likelihood and schedules) and compare them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data (generated, no downloads)")
    g.add_argument("--cells", type=int, default=3000, help="cells N")
    g.add_argument("--genes", type=int, default=400, help="genes G")
    g.add_argument("--types", type=int, default=6, help="cell types K")
    g.add_argument("--holdout", type=float, default=0.2, help="fraction of cells held out")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=800, help="Adam steps per schedule")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument(
        "--schedules",
        nargs="+",
        default=list(SCHEDULE_NAMES),
        choices=SCHEDULE_NAMES + EXTRA_SCHEDULES,
        help="constant: beta = 1 from the first step (no annealing)",
    )
    g.add_argument(
        "--warmup-fraction",
        type=float,
        default=0.25,
        help="monotonic: fraction of the steps spent ramping beta from 0 to 1",
    )
    g.add_argument("--n-cycles", type=int, default=4, help="cyclical: number of cycles M")
    g.add_argument(
        "--ratio", type=float, default=0.5, help="cyclical: fraction R of each cycle spent ramping"
    )
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seeds the data, the split and training")
    g.add_argument("--out", default="single_cell_output", help="output directory")
    g.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and validates the flags.

    Raises:
        SystemExit: (argparse's error, status 2) on a missing or out-of-range value.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    minimum = {"cells": 4, "genes": 2, "types": 2, "steps": 1, "batch_size": 2, "threads": 1}
    for key, low in minimum.items():
        if getattr(args, key) < low:
            parser.error(f"--{key.replace('_', '-')} must be >= {low}, got {getattr(args, key)}")
    if not 0.0 < args.holdout < 1.0:
        parser.error(f"--holdout must be in (0, 1), got {args.holdout}")
    n_held = round(args.holdout * args.cells)
    if n_held < 1 or args.cells - n_held < 2:
        parser.error(
            f"--holdout {args.holdout:g} of {args.cells} cells leaves {n_held} held out and "
            f"{args.cells - n_held} for training: need >= 1 and >= 2"
        )
    if not 0 < args.lr < math.inf:
        parser.error(f"--lr must be finite and > 0, got {args.lr}")
    if not 0.0 < args.warmup_fraction <= 1.0:
        parser.error(f"--warmup-fraction must be in (0, 1], got {args.warmup_fraction}")
    if len(set(args.schedules)) != len(args.schedules):
        parser.error(f"--schedules: each schedule once, got {' '.join(args.schedules)}")
    for name in args.schedules:  # klanneal.schedules checks --n-cycles and --ratio
        try:
            make_schedule(name, args.steps, args)
        except ValueError as err:
            parser.error(f"{name} schedule: {err}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Generates the data, trains one model per schedule, writes and prints the
    summary; returns the summary dict (summary.json's content)."""
    args = parse_args(argv)
    figure = has_matplotlib()
    if not figure:  # said now, not after the training
        warnings.warn(MISSING_MATPLOTLIB, stacklevel=2)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = make_counts(args.cells, args.genes, args.types, args.seed)
    train_idx, held_idx = split_cells(args.cells, args.holdout, args.seed)
    stats = data_summary(data, train_idx, held_idx)
    print(
        f"klanneal {klanneal.__version__} single-cell VAE: {args.cells} cells x {args.genes} "
        f"genes, {args.types} types, {stats['zero_fraction']:.0%} zeros; {args.steps} steps per "
        f"schedule, seed {args.seed}, {args.threads} thread(s)",
        flush=True,
    )
    results = [train_one(name, data, train_idx, held_idx, args) for name in args.schedules]
    first = results[0]
    assert first.model is not None
    eps = {
        "schedule": first.name,
        **eps_effect(first.model, data.counts[held_idx[: args.batch_size]], args.seed),
    }
    summary = build_summary(
        results, reference_separation(data, train_idx, held_idx), stats, eps, args
    )
    write_outputs(summary, results, out_dir)
    if figure:
        plot(results, data.cell_type[held_idx], out_dir / FIGURE)
    print()
    print(format_table(summary))
    print()
    print(eps_sentence(eps) + ".")
    written = "summary.md, summary.json, curves.json" + (f", {FIGURE}" if figure else "")
    print(f"\nwrote {written} to {out_dir}/")
    return summary
