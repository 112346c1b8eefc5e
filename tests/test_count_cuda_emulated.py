"""The count reconstruction CUDA launcher and kernels (csrc/cuda/count_cuda.cu),
run on the CPU through the thread emulation of tests/cuda_emulation (see
test_elbo_cuda_emulated.py for what it checks and what it cannot), against
_count_ref in float64 and against the CPU kernel.

The emulation runs at most 3 blocks of a grid, so with more tiles than that the
tile kernel's and the finalize kernel's grid-stride loops are exercised.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import torch
from count_cases import (
    LAYOUT,
    make_inputs,
    packed_call,
    reference,
    rounded,
    run_cpu,
    set_slot,
)
from test_count_kernel import assert_matches
from test_elbo_cuda_emulated import _gcc_major

ROOT = Path(__file__).resolve().parent.parent
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"

pybind11 = pytest.importorskip("pybind11", reason="builds the emulation as a pybind11 module")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_gcc_major() < 12, reason="needs g++ 12 or newer to build the emulation"),
]


def _rewrite_launches(source: str) -> str:
    """kernel<<<grid, block, smem, stream>>>(args) -> emu::launch_with(Config(...), kernel)(args)"""
    pattern = re.compile(r"([\w:]+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>", re.DOTALL)
    rewritten, count = pattern.subn(r"::emu::launch_with(::emu::Config(\2), \1)", source)
    assert count == 2, "expected the tile and finalize launches of count_cuda.cu"
    assert "<<<" not in rewritten
    return rewritten


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The emulated build of _C's count CUDA entry points, as a Python module."""
    build = tmp_path_factory.mktemp("count_cuda_emulation")
    source = (ROOT / "csrc" / "cuda" / "count_cuda.cu").read_text()
    (build / "count_cuda_emulated.inc").write_text(_rewrite_launches(source))
    output = build / f"_count_cuda_emulated{sysconfig.get_config_var('EXT_SUFFIX')}"
    command = [
        "g++", "-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread", "-shared", "-fPIC",
        "-w", "-DKLANNEAL_WITH_CUDA=1",
        f"-I{EMULATION / 'include'}", f"-I{build}", f"-I{ROOT / 'csrc' / 'cuda'}",
        f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}",
        f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
        str(EMULATION / "count_emulated_module.cpp"), str(ROOT / "csrc" / "bind_count_cuda.cpp"),
        str(ROOT / "csrc" / "count_recon_params.cpp"),
        "-o", str(output),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    spec = importlib.util.spec_from_file_location("_count_cuda_emulated", output)
    module = importlib.util.module_from_spec(spec)
    sys.modules["_count_cuda_emulated"] = module
    spec.loader.exec_module(module)
    return module


def run_emulated(module: Any, family: str, inputs: dict, **kwargs: Any) -> dict:
    """The packed call of count_cases, with a workspace of the size the launcher asks
    for (filled with NaN bits: every partial must be written before it is read)."""
    sizes, ptrs, floats, out = packed_call(family, inputs, **kwargs)
    n_bytes = module.count_recon_cuda_workspace_bytes(sizes, ptrs, floats)
    workspace = torch.full((max(n_bytes, 8),), 0xFF, dtype=torch.uint8)
    sizes = set_slot(sizes, "sizes", "workspace_bytes", n_bytes)
    ptrs = set_slot(ptrs, "ptrs", "workspace", workspace.data_ptr())
    module.count_recon_forward_cuda(sizes, ptrs, floats, 0)
    return out


CASES = [
    ("poisson", "-", "-"),
    ("nb", "scalar", "-"),
    ("nb", "example", "-"),
    ("nb", "element", "-"),
    ("zinb", "gene", "gene"),
    ("zinb", "scalar", "element"),
    ("zinb", "element", "example"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family,theta_shape,zi_shape", CASES)
def test_matches_the_reference(emulated, family, theta_shape, zi_shape, dtype):
    # 2 gene blocks (one partial) x 2 row chunks of 16 (one partial): 4 tiles, 3 blocks.
    master = make_inputs(family, 21, 300, theta_shape, zi_shape, seed=8)
    master["counts"] = master["counts"].clamp(max=200)
    inputs = rounded(master, dtype)
    row_scale = torch.linspace(0.5, 2.0, 21, dtype=torch.float64)
    kwargs = dict(row_scale=row_scale, grad_scale=1.0 / 21)
    got = run_emulated(emulated, family, inputs, validate=True, **kwargs)
    assert got.pop("first_invalid").tolist() == [-1, -1]
    assert_matches(got, reference(family, inputs, **kwargs), dtype, dtype)
    # The CPU's scalar level runs the same scalar formulas: only the order of
    # the float64 sums differs (a block reduction here), by a few float64 ulps
    # of the largest term.
    cpu = run_cpu(family, inputs, simd_level=0, **kwargs)
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    sum_eps = 64 * torch.finfo(torch.float64).eps
    for name, value in cpu.items():
        atol = sum_eps * value.abs().max().item()
        torch.testing.assert_close(got[name], value, rtol=4 * eps, atol=atol, msg=name)


def test_one_block_covers_the_whole_grid(emulated):
    inputs = make_inputs("zinb", 40, 520, "gene", "scalar", seed=9)
    emulated.set_max_blocks(1)
    try:
        got = run_emulated(emulated, "zinb", inputs)
    finally:
        emulated.set_max_blocks(3)
    assert_matches(got, reference("zinb", inputs), torch.float64)


def test_results_do_not_depend_on_thread_scheduling(emulated):
    inputs = rounded(make_inputs("zinb", 20, 300, "gene", "example", seed=10), torch.float32)
    runs = []
    for seed in (1, 2):
        emulated.set_seed(seed)
        runs.append(run_emulated(emulated, "zinb", inputs))
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name]), name


@pytest.mark.parametrize("name,value", [("mu", 0.0), ("counts", 2.5), ("theta", math.inf),
                                        ("zi_logits", math.nan)])  # fmt: skip
def test_validation_reports_the_first_invalid_element(emulated, name, value):
    inputs = make_inputs("zinb", 20, 300, "element", "element", seed=4)
    inputs[name][17, 290] = value
    inputs[name][19, 3] = value
    got = run_emulated(emulated, "zinb", inputs, validate=True)
    assert got["first_invalid"].tolist() == [17 * 300 + 290, LAYOUT["input"].index(name)]


@pytest.mark.parametrize("shape", [(0, 5), (4, 0)])
def test_empty_batches(emulated, shape):
    inputs = make_inputs("nb", *shape, "scalar", seed=1)
    got = run_emulated(emulated, "nb", inputs, validate=True)
    assert got["first_invalid"].tolist() == [-1, -1]
    assert_matches(got, reference("nb", inputs), torch.float64)


def test_a_workspace_too_small_is_refused(emulated):
    inputs = make_inputs("nb", 4, 9, "gene", seed=1)
    sizes, ptrs, floats, _ = packed_call("nb", inputs)
    with pytest.raises(ValueError, match="workspace of 0 bytes, need"):
        emulated.count_recon_forward_cuda(sizes, ptrs, floats, 0)
