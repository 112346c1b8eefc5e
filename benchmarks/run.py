"""Runs the klanneal benchmark suite and writes results.json, results.md and bench.png.

    python benchmarks/run.py            # full suite (make bench)
    python benchmarks/run.py --quick    # smoke run: tiny shapes, few repeats (make bench-quick)

See docs/bench.md for what is measured and how to read the output.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness  # noqa: E402
import _report  # noqa: E402
import bench_elbo  # noqa: E402

SCHEDULES = "schedules"
STEPS = "steps"  # per-call overhead and whole training steps (bench_steps.py)
LINEAR = "linear"  # fused output projection + ELBO (bench_linear.py)
COUNTS = "counts"  # Poisson/NB/ZINB losses and an scVI-like step (bench_counts.py)
ALL_CASES = (*bench_elbo.CASES, LINEAR, COUNTS, STEPS, SCHEDULES)
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _choose(parser: argparse.ArgumentParser, option: str, chosen: list[str], allowed) -> list[str]:
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        parser.error(
            f"{option}: unknown or empty choice {', '.join(unknown) or '(none)'}; "
            f"expected a comma-separated subset of {', '.join(allowed)}"
        )
    return [item for item in allowed if item in chosen]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="klanneal benchmark suite")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny shapes, few repeats (seconds)"
    )
    parser.add_argument(
        "--cases", type=_csv, default=list(ALL_CASES), help=f"subset of {','.join(ALL_CASES)}"
    )
    parser.add_argument(
        "--providers",
        type=_csv,
        default=list(bench_elbo.PROVIDERS),
        help=f"subset of {','.join(bench_elbo.PROVIDERS)} "
        "(ELBO and count cases; memcpy is always timed)",
    )
    parser.add_argument(
        "--modes", type=_csv, default=list(bench_elbo.MODES), help="subset of forward,full"
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda", "all"),
        help="auto/all: the CPU, plus CUDA when a GPU is present (default auto)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per provider (default 30; quick 5)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed rounds first (default 3; quick 1)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default benchmarks/results/full or benchmarks/results/quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads, also for the memory workers (default: torch's own choice)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    return _checked_args(parser, parser.parse_args(argv))


def _checked_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The parsed options checked, and their defaults filled in (devices, repeats, out)."""
    args.cases = _choose(parser, "--cases", args.cases, ALL_CASES)
    args.providers = _choose(parser, "--providers", args.providers, bench_elbo.PROVIDERS)
    args.modes = _choose(parser, "--modes", args.modes, bench_elbo.MODES)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device: cuda was asked for but torch sees no CUDA device")
    if args.device == "cuda":
        args.devices = [torch.device("cuda")]
    elif args.device == "cpu" or not torch.cuda.is_available():
        args.devices = [torch.device("cpu")]
    else:
        args.devices = [torch.device("cpu"), torch.device("cuda")]
    if args.repeats is None:
        args.repeats = 5 if args.quick else 30
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error(f"--repeats: must be at least 1, got {args.repeats}")
    if args.warmup < 0:
        parser.error(f"--warmup: must be non-negative, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: must be at least 1, got {args.threads}")
    if args.out is None:
        args.out = DEFAULT_OUT / ("quick" if args.quick else "full")
    return args


def _schedule_rows(quick: bool, notes: list[str]) -> list[dict[str, Any]]:
    try:
        import bench_schedules
    except ImportError as error:
        notes.append(f"schedules case not run: benchmarks/bench_schedules.py unavailable ({error})")
        return []
    rows = bench_schedules.run(quick=quick)
    for row in rows:
        row.setdefault("device", "cpu")
        row.setdefault("dtype", "-")
    return rows


def _run_cases(
    args: argparse.Namespace,
    memory: bool,
    memory_samples: int,
    log: Callable[[str], None],
    failures: list[str],
    notes: list[str],
) -> list[dict[str, Any]]:
    """The rows of every chosen case; failures and notes are appended to."""
    elbo_cases = [c for c in args.cases if c in bench_elbo.CASES]
    rows = bench_elbo.run(
        cases=elbo_cases,
        providers=args.providers,
        modes=args.modes,
        devices=args.devices,
        repeats=args.repeats,
        warmup=args.warmup,
        quick=args.quick,
        memory=memory,
        memory_samples=memory_samples,
        log=log,
        failures=failures,
    )
    if LINEAR in args.cases and any(d.type == "cpu" for d in args.devices):
        import bench_linear

        log("fused output projection + ELBO (benchmarks/bench_linear.py)")
        rows += bench_linear.run(
            quick=args.quick,
            repeats=max(3, args.repeats // 3),
            warmup=min(args.warmup, 2),
            memory=memory,
            memory_samples=1 if args.quick else 2,
            log=log,
            failures=failures,
        )
    if COUNTS in args.cases:
        import bench_counts

        log("count likelihoods and an scVI-like step (benchmarks/bench_counts.py)")
        rows += bench_counts.run(
            providers=[p for p in args.providers if p in bench_counts.PROVIDERS],
            devices=args.devices,
            # The reference path takes seconds per call at G=20000: a third of the repeats.
            repeats=max(3, args.repeats // 3),
            warmup=min(args.warmup, 2),
            quick=args.quick,
            memory=memory,
            memory_samples=1 if args.quick else 2,
            log=log,
            failures=failures,
        )
    if STEPS in args.cases and any(d.type == "cpu" for d in args.devices):
        import bench_steps

        log("per-call overhead and training steps (benchmarks/bench_steps.py)")
        rows += bench_steps.run(quick=args.quick, repeats=args.repeats, warmup=args.warmup)
    if SCHEDULES in args.cases:
        log("schedules (benchmarks/bench_schedules.py)")
        rows += _schedule_rows(args.quick, notes)
    notes += [f"FAILED: {failure}" for failure in failures]
    return rows


def _print_targets(rows: list[dict[str, Any]]) -> None:
    for target in _report.evaluate_targets(rows):
        status = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        unit = " us" if target["required"].endswith("us") else "x"
        measured = "-" if target["measured"] is None else f"{target['measured']:.2f}{unit}"
        print(
            f"  target {target['case']}: {target['target']} {target['required']}: "
            f"{measured} {status}"
        )


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    if args.threads is not None:
        # The environment variable carries the choice into the memory workers.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    machine = _harness.machine_info()
    log(
        f"{machine['cpu_model']}, {machine['usable_cores']} cores, torch threads "
        f"{machine['torch_threads']}, GPU {machine['gpu']}; klanneal {machine['klanneal']} "
        f"{machine['klanneal_build_info']}"
    )
    notes: list[str] = []
    memory = not args.no_memory
    if memory and "cpu" in [d.type for d in args.devices] and not _harness.peak_rss_reset_works():
        notes.append("CPU peak memory not measured: /proc/self/clear_refs cannot reset VmHWM here")
        memory = False
    if args.no_memory:
        notes.append("peak memory not measured (--no-memory)")
    if args.quick:
        notes.append(
            "quick run: torch.compile is timed on the first case only, and peak memory is "
            "measured on the first case in full mode only, for every provider but compile, "
            "to keep the smoke run short"
        )
    if not bench_elbo.liger_available():
        notes.append("liger not run: it needs a CUDA device and the liger_kernel package")

    memory_samples = 1 if args.quick else 3
    failures: list[str] = []
    rows = _run_cases(args, memory, memory_samples, log, failures, notes)

    config = {
        "quick": args.quick,
        "cases": args.cases,
        "providers": args.providers,
        "modes": args.modes,
        "devices": [d.type for d in args.devices],
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "memory": memory,
        "memory_samples": memory_samples,
        "memory_method": {
            "cpu": _harness.CPU_MEMORY_METHOD,
            "cuda": _harness.CUDA_MEMORY_METHOD,
        },
        "wall_s": time.perf_counter() - started,
    }
    paths = _report.write(args.out, machine, config, rows, notes)
    log(f"wrote {', '.join(str(p) for p in paths.values())}")
    _print_targets(rows)
    if failures:
        print(f"{len(failures)} provider(s) failed; see the notes in results.md", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
