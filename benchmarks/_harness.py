"""Timing, peak-memory and machine-description helpers shared by the benchmarks.

Timing: every timed call is bracketed by a device synchronisation and read
with ``time.perf_counter``; providers are timed round-robin (one call of each
provider per repeat) so that the load of a shared machine falls on all of
them alike and the ratios measured in one run stay meaningful.

Peak memory on the CPU: the peak resident set size (VmHWM in /proc/self/status)
is reset by writing "5" to /proc/self/clear_refs right before the measured
call; the reported value is VmHWM after the call minus VmRSS before it. glibc
keeps freed heap memory mapped unless told otherwise, which would let a call
reuse memory freed by an earlier one without raising the RSS; the worker
processes therefore run with a fixed ``MALLOC_MMAP_THRESHOLD_`` (see
``MALLOC_ENV``) so that every large buffer is its own mapping, returned to the
system when freed. Memory klanneal keeps cached between calls (its pool of CPU
gradient buffers, ``klanneal._C.pool_cached_bytes()``, read right before the
call) is resident before the call and reused by it, so it is added to the
measured increase: the op is charged for the memory it really holds. On CUDA:
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
``memory_allocated`` before the call.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# Setting the threshold explicitly also switches off glibc's dynamic threshold,
# which would otherwise grow to 32 MiB after the first large free.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}

CPU_MEMORY_METHOD = (
    "peak RSS increase during the measured call, in a separate process per provider: "
    "VmHWM reset through /proc/self/clear_refs, VmHWM after the call minus VmRSS before it, "
    "plus the bytes klanneal's CPU gradient-buffer pool held cached before the call "
    f"(glibc {' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())})"
)
CUDA_MEMORY_METHOD = (
    "torch.cuda.max_memory_allocated during the measured call minus memory_allocated before it"
)


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize_times(seconds: list[float]) -> dict[str, float]:
    """Median and the 20th/80th percentiles of a list of durations, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p20, median, p80 = np.percentile(ms, [20, 50, 80])
    return {"median_ms": float(median), "p20_ms": float(p20), "p80_ms": float(p80)}


@dataclass
class Timed:
    """One thing to time.

    ``setup`` runs before every call, outside the timed region, and its result
    is passed to ``call``; what ``call`` returns is released after the timer
    is read, so freeing the outputs is not timed either.
    """

    name: str
    call: Callable[[Any], Any]
    setup: Optional[Callable[[], Any]] = None

    def prepare(self) -> Any:
        return self.setup() if self.setup is not None else None


def time_round_robin(
    entries: list[Timed], device: torch.device, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Times every entry ``repeats`` times, one call of each per round.

    Args:
        entries: what to time; names must be unique.
        device: synchronised before each timer read.
        repeats: timed calls per entry.
        warmup: untimed calls per entry first (torch.compile compiles here).

    Returns:
        name -> list of ``repeats`` durations in seconds.
    """
    for _ in range(warmup):
        for entry in entries:
            state = entry.prepare()
            entry.call(state)
            del state
    synchronize(device)
    times: dict[str, list[float]] = {entry.name: [] for entry in entries}
    for _ in range(repeats):
        for entry in entries:
            state = entry.prepare()
            synchronize(device)
            start = time.perf_counter()
            result = entry.call(state)
            synchronize(device)
            times[entry.name].append(time.perf_counter() - start)
            del result, state
    return times


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", status.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(match.group(1))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_reset_works() -> bool:
    """Whether this kernel lets a process reset its own VmHWM (Linux >= 4.0)."""
    try:
        _reset_peak_rss()
        return _proc_status_kib("VmHWM") <= _proc_status_kib("VmRSS") + 64
    except (OSError, RuntimeError):
        return False


def run_memory_worker(script: str, spec: dict[str, Any], timeout_s: float = 900) -> dict[str, Any]:
    """Runs ``python script --worker <spec as JSON>`` with ``MALLOC_ENV`` and
    returns the JSON of its last output line, or ``{"error": ...}`` naming the
    worker's exit status and the tail of its output."""
    env = {**os.environ, **MALLOC_ENV}
    process = subprocess.run(
        [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
    )
    if process.returncode != 0:
        tail = (process.stderr or process.stdout).strip().splitlines()[-3:]
        return {"error": f"worker exited with {process.returncode}: {' | '.join(tail)}"}
    result: dict[str, Any] = json.loads(process.stdout.strip().splitlines()[-1])
    return result


def cpu_peak_samples(entry: Timed, samples: int) -> list[int]:
    """A memory worker's measurement: `entry` warmed up (two calls), then its peak
    extra bytes (cpu_peak_extra_bytes) in each of `samples` calls, each after its
    own setup. Raises where this kernel cannot reset a process's VmHWM."""
    for _ in range(2):
        entry.call(entry.prepare())
    if not peak_rss_reset_works():
        raise RuntimeError("/proc/self/clear_refs cannot reset VmHWM on this system")
    return [cpu_peak_extra_bytes(entry.call, entry.prepare()) for _ in range(samples)]


def cpu_peak_extra_bytes(call: Callable[[Any], Any], state: Any) -> int:
    """Peak RSS increase while ``call(state)`` runs, in bytes (see the module docstring).

    Includes the bytes klanneal's gradient-buffer pool held cached before the
    call: resident already, they would not show in the increase.
    """
    gc.collect()
    cached = _klanneal_pool_cached_bytes()
    _reset_peak_rss()
    baseline_kib = _proc_status_kib("VmRSS")
    result = call(state)
    peak_kib = _proc_status_kib("VmHWM")
    del result
    return max(0, peak_kib - baseline_kib) * 1024 + cached


def _klanneal_pool_cached_bytes() -> int:
    """Bytes klanneal's CPU buffer pool holds cached (0 without the extension)."""
    try:
        from klanneal import _C
    except ImportError:
        return 0
    return int(getattr(_C, "pool_cached_bytes", lambda: 0)())


def cuda_peak_extra_bytes(call: Callable[[Any], Any], state: Any, device: torch.device) -> int:
    """Peak allocated CUDA memory above the level before ``call(state)``, in bytes."""
    gc.collect()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    result = call(state)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return max(0, peak - baseline)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_sha() -> Optional[str]:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def _transparent_hugepages() -> Optional[str]:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            return setting.read().strip()
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, threads, GPU, versions, git sha, load."""
    import klanneal

    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cores = os.cpu_count()
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "klanneal": klanneal.__version__,
        "klanneal_build_info": klanneal.build_info(),
        "git_sha": _git_sha(),
        # Page faults on fresh logits-sized buffers are a large part of every
        # provider's time on the CPU; these two decide how many there are.
        "transparent_hugepage": _transparent_hugepages(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv,
    }
    return info


def case_main(
    doc: str,
    run: Callable[..., list[dict[str, Any]]],
    worker: Callable[[dict[str, Any]], dict[str, Any]],
    argv: Optional[list[str]] = None,
) -> int:
    """The command line of a case module run on its own (bench_linear,
    bench_counts): ``--worker JSON`` measures one provider's memory in this
    process (run_memory_worker's child); otherwise the case runs and its rows
    are printed as JSON."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--worker", metavar="JSON", help="internal: measure one provider's memory")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    rows = run(quick=args.quick, repeats=args.repeats, memory=not args.no_memory)
    print(json.dumps(rows, indent=2))
    return 0
