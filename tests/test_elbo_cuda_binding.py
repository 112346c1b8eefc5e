"""The CUDA entry points of klanneal._C, checked where no GPU is needed.

CI builds the CUDA kernels on machines without a GPU: these tests prove that
the bindings exist in such a build, that inconsistent parameters are refused
before anything is launched, and that a missing driver or device surfaces as
a RuntimeError naming the CUDA error rather than a crash. The kernels
themselves are tested on a GPU by tests/test_elbo_cuda.py.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from elbo_cases import packed_call

import klanneal

pytestmark = pytest.mark.skipif(
    not klanneal.build_info().get("cuda", False),
    reason="klanneal was built without its CUDA kernels",
)

# Any non-zero value stands for a pointer: nothing is dereferenced on the host.
FAKE_PTR = 1 << 20


def params(**overrides: Any) -> dict[str, Any]:
    """A consistent ElboParams dict (categorical, B=2, 3 rows per example, V=5, D=4)."""
    p = dict(
        batch=2, n_rows=6, row_len=5, latent_dim=4,
        likelihood=0, reduction=0, free_bits_mode=0, recon_dtype=0, latent_dtype=0,
        free_bits=0.0, gaussian_var=1.0, ignore_index=-100,
        beta_ptr=0, step_ptr=0, schedule=[0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        beta_value=1.0,
        recon_input=FAKE_PTR, target=FAKE_PTR, mu=FAKE_PTR, logvar=FAKE_PTR,
        loss=FAKE_PTR, recon=FAKE_PTR, kl=FAKE_PTR, kl_per_dim=FAKE_PTR, beta_out=FAKE_PTR,
        grad_recon=0, grad_mu=0, grad_logvar=0, n_threads=1,
    )  # fmt: skip
    p.update(overrides)
    return p


def packed(**overrides: Any) -> tuple:
    """params(**overrides) as the packed call of the bindings."""
    return packed_call(params(**overrides))


def test_cuda_entry_points_are_bound():
    assert callable(klanneal._C.elbo_cuda_workspace_bytes)
    assert callable(klanneal._C.elbo_forward_cuda)


def test_workspace_holds_a_float64_partial_per_row():
    small = klanneal._C.elbo_cuda_workspace_bytes(*packed())
    large = klanneal._C.elbo_cuda_workspace_bytes(*packed(batch=64, n_rows=64 * 40))
    assert small >= 8 * 6 + 3 * 8 * 2
    assert large >= 8 * 64 * 40 + 3 * 8 * 64
    assert small % 256 == 0 and large % 256 == 0
    # Long non-categorical rows are reduced in chunks: more partials per row.
    short_rows = klanneal._C.elbo_cuda_workspace_bytes(*packed(likelihood=2, n_rows=2, row_len=100))
    long_rows = klanneal._C.elbo_cuda_workspace_bytes(
        *packed(likelihood=2, n_rows=2, row_len=1_000_000)
    )
    assert long_rows > short_rows


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (dict(batch=0, n_rows=0), "batch must be > 0"),
        (dict(row_len=0), "row_len > 0"),
        (dict(n_rows=7), "multiple of batch"),
        (dict(likelihood=1, n_rows=6), "n_rows must equal batch"),
        (dict(likelihood=9), "unknown likelihood"),
    ],
)
def test_inconsistent_sizes_raise_value_error(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        klanneal._C.elbo_cuda_workspace_bytes(*packed(**overrides))
    with pytest.raises(ValueError, match=fragment):
        klanneal._C.elbo_forward_cuda(*packed(**overrides), FAKE_PTR, 1 << 20, 0)


@pytest.mark.parametrize(
    "overrides,workspace_bytes,fragment",
    [
        (dict(reduction=2, free_bits=0.5, free_bits_mode=0), 1 << 20, "not allowed with free bits"),
        (dict(reduction=5), 1 << 20, "unknown reduction"),
        (dict(recon_dtype=7), 1 << 20, "unknown dtype"),
        (dict(free_bits=float("nan")), 1 << 20, "free_bits"),
        (dict(gaussian_var=0.0), 1 << 20, "gaussian_var"),
        (dict(kl_per_dim=0), 1 << 20, "null output pointer"),
        (dict(mu=0), 1 << 20, "null mu/logvar pointer"),
        ({}, 16, "workspace of 16 bytes"),
    ],
)
def test_bad_launch_params_raise_value_error_before_any_cuda_call(
    overrides, workspace_bytes, fragment
):
    with pytest.raises(ValueError, match=fragment):
        klanneal._C.elbo_forward_cuda(*packed(**overrides), FAKE_PTR, workspace_bytes, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_usable_gpu_the_launch_raises_instead_of_crashing():
    # No driver or no device: the first CUDA call fails and its error is
    # named. (A CPU-only torch on a machine that does have a GPU gets as far
    # as the pointer check: the fake pointer is not device memory.)
    with pytest.raises((RuntimeError, ValueError)) as info:
        klanneal._C.elbo_forward_cuda(*packed(), FAKE_PTR, 1 << 20, 0)
    if info.type is RuntimeError:
        assert re.search(r"CUDA error .*: cudaError\w+: ", str(info.value)), str(info.value)
    else:
        assert "not in CUDA device memory" in str(info.value)
