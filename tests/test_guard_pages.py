"""SIMD tails never touch memory outside their buffers.

AddressSanitizer does not instrument masked vector loads and stores, so the
kernels' tails are checked here instead: every input is placed flush against
an inaccessible (PROT_NONE) page, after its last element and before its
first, and the op runs at every SIMD level this CPU has. A read or write one
element too far is a segfault of the child process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import klanneal

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="needs mmap/mprotect (Linux)"),
    pytest.mark.skipif(not klanneal.HAS_NATIVE, reason="needs the native extension"),
]

_SCRIPT = r"""
import ctypes, mmap, sys
import torch, klanneal
from klanneal import _ops
sys.path.insert(0, sys.argv[2])
from elbo_cases import pack_options
level = sys.argv[1]
assert klanneal.build_info()["simd"] == level, klanneal.build_info()
PAGE = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
keep = []

def guarded(n, dtype, flush_end):
    # n elements in a fresh mapping with a PROT_NONE page right after the
    # last element (flush_end) or right before the first.
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    pages = (nbytes + PAGE - 1) // PAGE
    m = mmap.mmap(-1, (pages + 2) * PAGE)
    keep.append(m)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert libc.mprotect(base, PAGE, 0) == 0
    assert libc.mprotect(base + (pages + 1) * PAGE, PAGE, 0) == 0
    start = (pages + 1) * PAGE - nbytes if flush_end else PAGE
    buf = torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=start)
    return buf.view(dtype)

def place(t, flush_end):
    out = guarded(t.numel(), t.dtype, flush_end)
    out.copy_(t.reshape(-1))
    return out.view(t.shape)

count = 0
for flush_end in (True, False):
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for width in (1, 3, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 130):
            mu = torch.zeros(2, 3, dtype=dtype)
            cases = [
                ("categorical", torch.randn(2, 1, width).to(dtype),
                 torch.randint(0, width, (2, 1))),
                ("bernoulli", torch.randn(2, width).to(dtype), torch.rand(2, width).to(dtype)),
                ("gaussian", torch.randn(2, width).to(dtype), torch.randn(2, width).to(dtype)),
                ("mse", torch.randn(2, width).to(dtype), torch.randn(2, width).to(dtype)),
            ]
            for likelihood, x, target in cases:
                want = klanneal.elbo_loss_ref(x.double(), target if likelihood == "categorical"
                                              else target.double(), mu.double(), mu.double(),
                                              likelihood=likelihood).loss
                full = dtype in (torch.float32, torch.float64)  # inplace: fp32/fp64 only
                for inplace in (False, True) if full else (False,):
                    xg, tg = place(x, flush_end), place(target, flush_end)
                    mg, lg = place(mu, flush_end), place(mu, flush_end)
                    if inplace:
                        # The raw op, asked for every gradient: the kernel
                        # writes d loss / d x into the guarded logits buffer.
                        floats, ints = pack_options(
                            _ops.NO_SCHEDULE, 1.0, likelihood, "batchmean", 0.0, "batch",
                            -100, 1.0, True, True, True, True)
                        outs = _ops.elbo_loss_inplace_op(xg, tg, mg, lg, None, None, floats, ints)
                        loss = outs[0]
                    else:
                        xg.requires_grad_(True)
                        out = klanneal.elbo_loss(xg, tg, mg, lg, likelihood=likelihood)
                        out.loss.backward()
                        loss = out.loss
                    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
                    assert abs(loss.item() - want.item()) <= tol * (1 + abs(want.item())), (
                        likelihood, dtype, width, loss.item(), want.item())
                    count += 1
print("ok", count)
"""


def _levels() -> list[str]:
    best = klanneal.build_info()["simd"]
    return {"scalar": ["scalar"], "avx2": ["scalar", "avx2"]}.get(
        best, ["scalar", "avx2", "avx512"]
    )


@pytest.mark.parametrize("level", _levels())
def test_simd_tails_stay_inside_their_buffers(level):
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, level, os.path.dirname(__file__)],
        env=dict(os.environ, KLANNEAL_SIMD=level, KLANNEAL_GRAD_POOL="0"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    assert proc.stdout.startswith("ok")
