"""`make gpu-check`: the first run of klanneal's CUDA code on real hardware, in one go.

On a machine with a CUDA GPU (and a CUDA build of torch), runs

  1. the build facts (klanneal.build_info(), torch, the device),
  2. the CUDA test files (tests/test_elbo_cuda.py, test_elbo_cuda_binding.py,
     the CUDA cases of test_schedules.py), then the differential fuzzer, whose
     cases run on the GPU as well as on the CPU,
  3. the GPU benchmark cases of the suite (benchmarks/run.py --device cuda,
     fewer repeats, no memory runs),

each under its own time limit so the whole stays under 8 minutes, and writes
everything to one file, OUT/gpu-check.json (plus the raw logs and the
benchmark report beside it). Exits non-zero if a step failed; the file says
which.

    python benchmarks/gpu_check.py --out gpu-check-results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_TESTS = [
    "tests/test_elbo_cuda.py",
    "tests/test_elbo_cuda_binding.py",
    "tests/test_schedules.py",
]
BUDGET_S = 8 * 60


def _step(name: str, command: list[str], timeout: float, out: Path, env=None) -> dict:
    start = time.monotonic()
    log = out / f"{name}.log"
    try:
        proc = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
        )
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc = "timeout"
        text = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(
            errors="replace"
        )
    log.write_text(text)
    tail = text.strip().splitlines()[-15:]
    return {
        "name": name,
        "command": " ".join(command),
        "returncode": rc,
        "seconds": round(time.monotonic() - start, 1),
        "log": log.name,
        "tail": tail,
        "ok": rc == 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-check-results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    import torch

    import klanneal

    facts = {
        "klanneal": klanneal.build_info(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "capability": list(torch.cuda.get_device_capability(0))
        if torch.cuda.is_available()
        else None,
        "python": platform.python_version(),
    }
    result = {"facts": facts, "steps": []}
    path = args.out / "gpu-check.json"
    if not torch.cuda.is_available() or not facts["klanneal"].get("cuda"):
        result["error"] = "needs a CUDA GPU and a klanneal build with its CUDA kernels"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(result["error"], file=sys.stderr)
        return 2

    env = dict(os.environ, KLANNEAL_FUZZ_CASES="300")
    steps = [
        ("cuda-tests", [sys.executable, "-m", "pytest", "-q", "-rA", *CUDA_TESTS], 240),
        (
            "cuda-fuzz",  # the differential fuzzer's CUDA cases (and its CPU ones)
            [sys.executable, "-m", "pytest", "-q", "-rA", "tests/test_fuzz.py"],
            90,
        ),  # fmt: skip
        (
            "gpu-bench",
            [
                sys.executable,
                "benchmarks/run.py",
                "--device",
                "cuda",
                "--repeats",
                "10",
                "--warmup",
                "2",
                "--no-memory",
                "--out",
                str(args.out / "bench"),
            ],
            180,
        ),  # fmt: skip
    ]
    for name, command, limit in steps:
        left = BUDGET_S - (time.monotonic() - started)
        if left < 10:
            result["steps"].append({"name": name, "ok": False, "returncode": "skipped: no time"})
            continue
        result["steps"].append(_step(name, command, min(limit, left), args.out, env))
        path.write_text(json.dumps(result, indent=2) + "\n")  # partial results as we go
    result["seconds"] = round(time.monotonic() - started, 1)
    result["ok"] = all(step["ok"] for step in result["steps"])
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}: {'all steps passed' if result['ok'] else 'a step FAILED'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
