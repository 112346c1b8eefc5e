"""The CUDA launcher and kernels, run on the CPU through a thread emulation.

Machines without a GPU cannot run csrc/cuda/, but they can compile it as
plain C++ on top of tests/cuda_emulation/include/: a fake runtime where each
CUDA thread is a std::thread, __syncthreads/__syncwarp are barriers (a
divergent barrier raises instead of hanging), and cub::BlockReduce /
cub::WarpReduce keep CUB's contract (aggregate in thread 0 only). The real
elbo_cuda.cu (its <<<...>>> launches rewritten into calls), elbo_kernel.cuh
and the real bindings are compiled with g++ and compared with elbo_loss_ref.
This checks the index arithmetic, the row/chunk/example bookkeeping, the
barrier placement, the vector and scalar paths, inplace aliasing and every
option of the op. It cannot check device-specific behaviour (warp
scheduling, the device math library, memory-model subtleties): that is
tests/test_elbo_cuda.py's job on a GPU.
"""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from elbo_cases import packed_call

from klanneal.reference import elbo_loss_ref
from klanneal.schedules import Monotonic

ROOT = Path(__file__).resolve().parent.parent
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
IGNORE = -100
LIKELIHOODS = ("categorical", "bernoulli", "gaussian", "mse")
REDUCTIONS = ("batchmean", "sum", "none")
DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}

pybind11 = pytest.importorskip("pybind11", reason="builds the emulation as a pybind11 module")


def _gcc_major() -> int:
    """Major version of g++ (0 if absent); the emulation needs 12+ (_Float16, C++20)."""
    if shutil.which("g++") is None:
        return 0
    version = subprocess.run(["g++", "-dumpversion"], capture_output=True, text=True).stdout
    return int(version.split(".")[0] or 0)


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_gcc_major() < 12, reason="needs g++ 12 or newer to build the emulation"),
]


def _rewrite_launches(source: str) -> str:
    """kernel<<<grid, block, smem, stream>>>(args) -> emu::launch_with(Config(...), kernel)(args)"""
    pattern = re.compile(r"([\w:]+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>", re.DOTALL)
    rewritten, count = pattern.subn(r"::emu::launch_with(::emu::Config(\2), \1)", source)
    assert count >= 6, "expected every kernel launch of elbo_cuda.cu to be rewritten"
    assert "<<<" not in rewritten
    return rewritten


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The emulated build of _C's CUDA entry points, as a Python module."""
    build = tmp_path_factory.mktemp("cuda_emulation")
    source = (ROOT / "csrc" / "cuda" / "elbo_cuda.cu").read_text()
    (build / "elbo_cuda_emulated.inc").write_text(_rewrite_launches(source))
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    output = build / f"_elbo_cuda_emulated{suffix}"
    command = [
        "g++", "-std=c++20", "-O0", "-fno-strict-aliasing", "-pthread", "-shared", "-fPIC",
        "-w", "-DKLANNEAL_WITH_CUDA=1",
        f"-I{EMULATION / 'include'}", f"-I{build}", f"-I{ROOT / 'csrc' / 'cuda'}",
        f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}",
        f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
        str(EMULATION / "emulated_module.cpp"), str(ROOT / "csrc" / "bind_elbo_cuda.cpp"),
        # The parameter contract shared with the CPU launcher, and the schedule check it
        # uses (schedules_cpu.cpp fills on the worker pool of parallel_cpu.cpp).
        str(ROOT / "csrc" / "elbo_params.cpp"), str(ROOT / "csrc" / "schedules_cpu.cpp"),
        str(ROOT / "csrc" / "parallel_cpu.cpp"),
        "-o", str(output),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    spec = importlib.util.spec_from_file_location("_elbo_cuda_emulated", output)
    module = importlib.util.module_from_spec(spec)
    sys.modules["_elbo_cuda_emulated"] = module
    spec.loader.exec_module(module)
    return module


def make_inputs(
    likelihood: str,
    shape: tuple[int, ...],
    latent_dim: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    ignore_fraction: float = 0.0,
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if likelihood == "categorical":
        recon = 3.0 * torch.randn(shape, generator=gen, dtype=torch.float64)
        target = torch.randint(0, shape[-1], shape[:-1], generator=gen)
        if ignore_fraction > 0:
            target[torch.rand(shape[:-1], generator=gen) < ignore_fraction] = IGNORE
    elif likelihood == "bernoulli":
        recon = 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)
        target = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    else:
        recon = torch.randn(shape, generator=gen, dtype=torch.float64)
        target = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    batch = shape[0]
    mu = torch.randn(batch, latent_dim, generator=gen, dtype=torch.float64)
    logvar = 0.7 * torch.randn(batch, latent_dim, generator=gen, dtype=torch.float64)
    return {
        "recon_input": recon.to(dtype),
        "target": target,
        "mu": mu.to(dtype),
        "logvar": logvar.to(dtype),
    }


def run_emulated(
    module: Any,
    inputs: dict[str, torch.Tensor],
    beta: Any = 1.0,
    step: Optional[int] = None,
    *,
    likelihood: str = "categorical",
    reduction: str = "batchmean",
    free_bits: float = 0.0,
    free_bits_mode: str = "batch",
    gaussian_var: float = 1.0,
    inplace: bool = False,
    grads: bool = True,
    capacity: Optional[float] = None,
    global_kl_per_dim: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Fills an ElboParams dict the way klanneal's op does and runs the launcher.

    A learned prior comes as inputs["prior_mu"] / inputs["prior_logvar"].
    """
    recon_input, target = inputs["recon_input"], inputs["target"]
    mu, logvar = inputs["mu"], inputs["logvar"]
    batch, latent_dim = mu.shape
    if likelihood == "categorical":
        row_len = recon_input.shape[-1]
        n_rows = recon_input.numel() // row_len
    else:
        n_rows, row_len = batch, recon_input.numel() // batch
    n_out = batch if reduction == "none" else 1
    out = {
        name: torch.full((n,), float("nan"), dtype=torch.float64)
        for name, n in (
            ("loss", n_out),
            ("recon", n_out),
            ("kl", n_out),
            ("kl_per_dim", latent_dim),
        )
    }
    out["beta"] = torch.full((1,), float("nan"), dtype=torch.float64)
    out["kl_weight"] = torch.full((n_out,), float("nan"), dtype=torch.float64)
    has_prior = "prior_mu" in inputs
    if grads:
        # Gradients are stored in fp32 for fp16/bf16 inputs (ElboParams).
        def grad_like(t: torch.Tensor) -> torch.Tensor:
            dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
            return torch.full(t.shape, float("nan"), dtype=dtype)

        out["grad_recon"] = recon_input if inplace else grad_like(recon_input)
        out["grad_mu"] = grad_like(mu)
        out["grad_logvar"] = grad_like(logvar)
        if has_prior:
            out["grad_prior_mu"] = grad_like(mu)
            out["grad_prior_logvar"] = grad_like(logvar)
    keep = []  # tensors whose pointers are passed
    beta_ptr = step_ptr = 0
    schedule = [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    beta_value = 0.0
    if hasattr(beta, "to_params"):
        step_tensor = torch.tensor(step, dtype=torch.int64)
        keep.append(step_tensor)
        step_ptr, schedule = step_tensor.data_ptr(), beta.to_params()
    elif isinstance(beta, torch.Tensor):
        beta_tensor = beta.to(torch.float64).reshape(())
        keep.append(beta_tensor)
        beta_ptr = beta_tensor.data_ptr()
    else:
        beta_value = float(beta)

    def ptr(name: str) -> int:
        return out[name].data_ptr() if name in out else 0

    params = dict(
        batch=batch, n_rows=n_rows, row_len=row_len, latent_dim=latent_dim,
        likelihood=LIKELIHOODS.index(likelihood), reduction=REDUCTIONS.index(reduction),
        free_bits_mode=("batch", "sample").index(free_bits_mode),
        recon_dtype=DTYPES[recon_input.dtype], latent_dtype=DTYPES[mu.dtype],
        free_bits=free_bits, gaussian_var=gaussian_var, ignore_index=IGNORE,
        beta_ptr=beta_ptr, step_ptr=step_ptr, schedule=schedule, beta_value=beta_value,
        recon_input=recon_input.data_ptr(), target=target.data_ptr(),
        mu=mu.data_ptr(), logvar=logvar.data_ptr(),
        loss=ptr("loss"), recon=ptr("recon"), kl=ptr("kl"), kl_per_dim=ptr("kl_per_dim"),
        beta_out=ptr("beta"), grad_recon=ptr("grad_recon"), grad_mu=ptr("grad_mu"),
        grad_logvar=ptr("grad_logvar"), n_threads=1, kl_weight=ptr("kl_weight"),
        grad_prior_mu=ptr("grad_prior_mu"), grad_prior_logvar=ptr("grad_prior_logvar"),
    )  # fmt: skip
    if has_prior:
        params.update(prior_mu=inputs["prior_mu"].data_ptr(),
                      prior_logvar=inputs["prior_logvar"].data_ptr())  # fmt: skip
    if capacity is not None:
        params.update(has_capacity=1, capacity=[0.0, 0.0, capacity, capacity, 1.0, 1.0, 1.0, 0.0])
    if global_kl_per_dim is not None:
        params["global_kl_per_dim"] = global_kl_per_dim.data_ptr()
    call = packed_call(params)
    workspace = torch.full((module.elbo_cuda_workspace_bytes(*call),), 0xFF, dtype=torch.uint8)
    module.elbo_forward_cuda(*call, workspace.data_ptr(), workspace.numel(), 0)
    return out


def reference(
    inputs: dict[str, torch.Tensor], beta: Any = 1.0, step: Optional[int] = None, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """elbo_loss_ref in float64 with the gradients of each loss entry (upstream 1)."""
    names = [n for n in ("recon_input", "mu", "logvar", "prior_mu", "prior_logvar") if n in inputs]
    leaves = {n: inputs[n].detach().double().requires_grad_(True) for n in names}
    if "prior_mu" in leaves:
        kwargs.update(prior_mu=leaves["prior_mu"], prior_logvar=leaves["prior_logvar"])
    # beta as a leaf (a schedule evaluated at step first): d loss / d beta is kl_weight.
    value = beta(step) if hasattr(beta, "to_params") else beta
    beta_leaf = torch.as_tensor(value, dtype=torch.float64).detach().clone().requires_grad_(True)
    beta, step = beta_leaf, None
    target = inputs["target"]
    if target.dtype.is_floating_point:
        target = target.double()
    ref = elbo_loss_ref(
        leaves["recon_input"], target, leaves["mu"], leaves["logvar"], beta, step=step, **kwargs
    )
    losses = ref.loss.reshape(-1)
    kl_weight = torch.stack([
        torch.autograd.grad(loss_b, beta_leaf, retain_graph=True)[0] for loss_b in losses
    ])  # fmt: skip
    ref.loss.sum().backward()
    out = {f: getattr(ref, f).reshape(-1) for f in ("loss", "recon", "kl", "kl_per_dim", "beta")}
    out["kl_weight"] = kl_weight  # d loss_b / d beta
    out.update(
        grad_recon=leaves["recon_input"].grad,
        grad_mu=leaves["mu"].grad,
        grad_logvar=leaves["logvar"].grad,
    )
    if "prior_mu" in leaves:
        out.update(grad_prior_mu=leaves["prior_mu"].grad,
                   grad_prior_logvar=leaves["prior_logvar"].grad)  # fmt: skip
    return out


def assert_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: dict) -> None:
    for name, value in got.items():
        torch.testing.assert_close(value.double(), want[name].double(), **tol, msg=name)


BETAS = {
    "float": (0.7, None),
    "tensor": (torch.tensor(0.7), None),
    "schedule": (Monotonic(10, start=0.1, stop=1.0), 4),
}


@pytest.mark.parametrize(
    "free_bits,free_bits_mode", [(0.0, "batch"), (0.3, "batch"), (0.3, "sample")]
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_every_option_matches_reference(emulated, likelihood, reduction, free_bits, free_bits_mode):
    if reduction == "none" and free_bits > 0 and free_bits_mode == "batch":
        pytest.skip("not a valid combination")
    shape = (3, 5, 41) if likelihood == "categorical" else (3, 7, 5)
    inputs = make_inputs(likelihood, shape, 5, ignore_fraction=0.2)
    kwargs = dict(
        likelihood=likelihood, reduction=reduction, free_bits=free_bits,
        free_bits_mode=free_bits_mode, gaussian_var=0.7,
    )  # fmt: skip
    for beta, step in BETAS.values():
        got = run_emulated(emulated, inputs, beta, step, **kwargs)
        assert_matches(got, reference(inputs, beta, step, **kwargs), TOL[torch.float32])


# V <= 1024: warp per row; longer: block per row. Odd V misaligns every other
# row (scalar path); V = 1024 and 2048 are aligned (vector path).
@pytest.mark.parametrize("vocab", [1, 41, 1024, 1025, 2048, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_categorical_rows(emulated, vocab, dtype):
    inputs = make_inputs("categorical", (3, 4, vocab), 3, dtype=dtype, ignore_fraction=0.3)
    inputs["target"][1] = IGNORE  # an example with every position ignored
    for reduction in REDUCTIONS:
        got = run_emulated(emulated, inputs, 0.5, reduction=reduction)
        assert_matches(got, reference(inputs, 0.5, reduction=reduction), TOL[dtype])


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "mse"])
def test_long_rows_are_reduced_in_chunks(emulated, likelihood):
    inputs = make_inputs(likelihood, (2, 8195), 4)  # chunks of 4096, 4096 and 3
    for reduction in REDUCTIONS:
        got = run_emulated(emulated, inputs, 0.3, likelihood=likelihood, reduction=reduction)
        want = reference(inputs, 0.3, likelihood=likelihood, reduction=reduction)
        assert_matches(got, want, TOL[torch.float32])


@pytest.mark.parametrize("likelihood", ["categorical", "mse"])
def test_inplace_gradient_overwrites_the_input_correctly(emulated, likelihood):
    shape = (3, 4, 1031) if likelihood == "categorical" else (3, 4, 1031)
    inputs = make_inputs(likelihood, shape, 4, ignore_fraction=0.2)
    want = reference(inputs, 0.6, likelihood=likelihood)
    original = inputs["recon_input"].clone()
    got = run_emulated(emulated, inputs, 0.6, likelihood=likelihood, inplace=True)
    assert got["grad_recon"].data_ptr() == inputs["recon_input"].data_ptr()
    assert not torch.equal(inputs["recon_input"], original)
    assert_matches(got, want, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_half_types_compute_in_float32(emulated, dtype, likelihood):
    shape = (2, 3, 1030) if likelihood == "categorical" else (2, 3, 37)
    inputs = make_inputs(likelihood, shape, 6, dtype=dtype, ignore_fraction=0.2)
    got = run_emulated(emulated, inputs, 0.8, likelihood=likelihood, free_bits=0.2)
    want = reference(inputs, 0.8, likelihood=likelihood, free_bits=0.2)
    # Scalars are float64 sums of float32 terms; gradients are rounded once to dtype.
    eps = torch.finfo(dtype).eps
    for name, value in got.items():
        if name.startswith("grad"):
            torch.testing.assert_close(
                value.double(), want[name], rtol=eps, atol=eps * 1e-2, msg=name
            )
        else:
            torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-5, msg=name)


def test_target_class_gradient_keeps_its_precision(emulated):
    # A confident row: p_t is close to 1 and p_t - 1 ~ -1e-3 must survive the
    # fp16 cast (formed in fp32 first, not as fp16(p_t) - 1).
    logits = torch.zeros(1, 1, 50, dtype=torch.float16)
    logits[0, 0, 7] = 11.0
    inputs = dict(
        recon_input=logits, target=torch.tensor([[7]]),
        mu=torch.zeros(1, 2, dtype=torch.float16), logvar=torch.zeros(1, 2, dtype=torch.float16),
    )  # fmt: skip
    got = run_emulated(emulated, inputs, 1.0)
    want = reference(inputs, 1.0)
    g, w = got["grad_recon"][0, 0, 7].double(), want["grad_recon"][0, 0, 7]
    assert -2e-3 < w.item() < -5e-4
    assert abs(g - w).item() <= 1e-3 * abs(w).item()


def test_invalid_targets_give_nan_rows_and_no_out_of_bounds_read(emulated):
    inputs = make_inputs("categorical", (3, 4, 41), 4)
    inputs["target"][1, 2] = 41
    inputs["target"][2, 0] = -(2**40)
    got = run_emulated(emulated, inputs, 1.0, reduction="none")
    assert torch.isnan(got["loss"][1:]).all() and torch.isnan(got["recon"][1:]).all()
    assert torch.isnan(got["grad_recon"][1, 2]).all() and torch.isnan(got["grad_recon"][2, 0]).all()
    valid = dict(inputs, target=inputs["target"].clone())
    valid["target"][1:] = 0
    want = reference(valid, 1.0, reduction="none")
    torch.testing.assert_close(got["loss"][0], want["loss"][0], **TOL[torch.float32])
    torch.testing.assert_close(
        got["grad_recon"][0], want["grad_recon"][0].float(), **TOL[torch.float32]
    )


def test_nan_logit_and_minus_inf_logits_behave_as_the_reference(emulated):
    inputs = make_inputs("categorical", (2, 3, 40), 2)
    inputs["recon_input"][0, 1, 5] = float("nan")
    inputs["recon_input"][1, 0, :30] = float("-inf")
    inputs["target"][1, 0] = 35
    got = run_emulated(emulated, inputs, 1.0, reduction="none")
    want = reference(inputs, 1.0, reduction="none")
    assert torch.isnan(got["loss"][0]) and torch.isnan(want["loss"][0])
    torch.testing.assert_close(got["loss"][1], want["loss"][1], **TOL[torch.float32])
    torch.testing.assert_close(
        got["grad_recon"][1], want["grad_recon"][1].float(), **TOL[torch.float32]
    )


@pytest.mark.parametrize("vocab", [40, 1500])  # the warp and the block row kernels
@pytest.mark.parametrize("on_target", [False, True])
def test_a_plus_inf_logit_gives_nan_as_the_reference(emulated, vocab, on_target):
    # Regression: the online log-sum-exp kept s = 1 after a +inf logit, so
    # the row's loss was +inf and its gradient finite but one element,
    # where the CPU kernel and the reference give NaN throughout.
    inputs = make_inputs("categorical", (1, 2, vocab), 2)
    inputs["recon_input"][0, 0, 5] = float("inf")
    inputs["target"][0, 0] = 5 if on_target else 3
    got = run_emulated(emulated, inputs, 1.0, reduction="none")
    want = reference(inputs, 1.0, reduction="none")
    assert torch.isnan(want["loss"][0]) and torch.isnan(got["loss"][0])
    assert torch.isnan(want["grad_recon"][0, 0]).all()
    assert torch.isnan(got["grad_recon"][0, 0]).all()


def test_without_gradients_only_the_values_are_written(emulated):
    inputs = make_inputs("categorical", (2, 3, 300), 3)
    got = run_emulated(emulated, inputs, 0.4, grads=False, free_bits=0.2)
    assert set(got) == {"loss", "recon", "kl", "kl_per_dim", "beta", "kl_weight"}
    want = reference(inputs, 0.4, free_bits=0.2)
    assert_matches(got, want, TOL[torch.float32])


@pytest.mark.parametrize("free_bits_mode", ["batch", "sample"])
def test_free_bits_tie_passes_the_gradient(emulated, free_bits_mode):
    inputs = make_inputs("mse", (4, 6), 3)
    inputs["mu"] = torch.ones(4, 3)
    inputs["logvar"] = torch.zeros(4, 3)  # KL_bd = 0.5 = lambda
    kwargs = dict(likelihood="mse", free_bits=0.5, free_bits_mode=free_bits_mode)
    got = run_emulated(emulated, inputs, 1.0, **kwargs)
    assert_matches(got, reference(inputs, 1.0, **kwargs), TOL[torch.float32])
    assert (got["grad_mu"] != 0).all()


def test_one_block_covers_the_whole_grid(emulated):
    # Every grid-stride loop with a single block: rows, chunks, examples and
    # latent dimensions all taken in turn by block 0.
    inputs = make_inputs("categorical", (5, 3, 97), 7, ignore_fraction=0.2)
    emulated.set_max_blocks(1)
    try:
        got = run_emulated(emulated, inputs, 0.9, free_bits=0.3)
    finally:
        emulated.set_max_blocks(3)
    assert_matches(got, reference(inputs, 0.9, free_bits=0.3), TOL[torch.float32])


def test_results_do_not_depend_on_thread_scheduling(emulated):
    # Every sum has a fixed assignment of elements to threads and a fixed
    # reduction order, so resuming the threads in another order changes no bit.
    inputs = make_inputs("categorical", (4, 5, 1500), 9, ignore_fraction=0.1)
    runs = []
    for seed in (1, 2):
        emulated.set_seed(seed)
        runs.append(run_emulated(emulated, inputs, 0.6, free_bits=0.2, free_bits_mode="sample"))
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name]), name


@pytest.mark.parametrize("latent_dtype", [torch.float64, torch.float16])
def test_recon_and_latent_dtypes_are_dispatched_separately(emulated, latent_dtype):
    inputs = make_inputs("categorical", (3, 2, 130), 5, ignore_fraction=0.2)
    inputs["mu"] = inputs["mu"].to(latent_dtype)
    inputs["logvar"] = inputs["logvar"].to(latent_dtype)
    got = run_emulated(emulated, inputs, 0.5, free_bits=0.3, free_bits_mode="sample")
    # fp16 latents: their gradients are stored in fp32 (ElboParams).
    stored = torch.float64 if latent_dtype == torch.float64 else torch.float32
    assert got["grad_mu"].dtype == stored
    want = reference(inputs, 0.5, free_bits=0.3, free_bits_mode="sample")
    tol = TOL[torch.float32] if latent_dtype == torch.float64 else dict(rtol=1e-3, atol=1e-4)
    assert_matches(got, want, tol)


@pytest.mark.parametrize("capacity", [None, 2.0])
@pytest.mark.parametrize(
    "free_bits,free_bits_mode", [(0.0, "batch"), (0.3, "batch"), (0.3, "sample")]
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_prior_and_capacity_match_reference(
    emulated, likelihood, reduction, free_bits, free_bits_mode, capacity
):
    if reduction == "none" and free_bits > 0 and free_bits_mode == "batch":
        pytest.skip("not a valid combination")
    shape = (4, 3, 37) if likelihood == "categorical" else (4, 9)
    inputs = make_inputs(likelihood, shape, 5)
    gen = torch.Generator().manual_seed(9)
    inputs["prior_mu"] = (0.5 * torch.randn(4, 5, generator=gen)).float()
    inputs["prior_logvar"] = (0.4 * torch.randn(4, 5, generator=gen)).float()
    kwargs = dict(likelihood=likelihood, reduction=reduction, free_bits=free_bits,
                  free_bits_mode=free_bits_mode)  # fmt: skip
    beta = torch.tensor(0.7)
    got = run_emulated(emulated, inputs, beta, None, capacity=capacity, **kwargs)
    want = reference(inputs, beta, None, capacity=capacity, **kwargs)
    assert_matches(got, want, TOL[torch.float32])


def test_global_kl_per_dim_replaces_the_batch_mean(emulated):
    inputs = make_inputs("categorical", (4, 3, 37), 5)
    # A global mean (from an all-reduce) above lambda in dims 0-2, below in 3-4.
    global_mean = torch.tensor([2.0, 1.5, 0.9, 0.1, 0.2], dtype=torch.float64)
    got = run_emulated(emulated, inputs, 0.7, None, free_bits=0.5, global_kl_per_dim=global_mean)
    leaves = {n: inputs[n].detach().double().requires_grad_(True)
              for n in ("recon_input", "mu", "logvar")}  # fmt: skip
    from klanneal.reference import reference_loss

    ref = reference_loss(
        leaves["recon_input"], inputs["target"], leaves["mu"], leaves["logvar"], 0.7, step=None,
        likelihood="categorical", reduction="batchmean", free_bits=0.5, free_bits_mode="batch",
        ignore_index=IGNORE, gaussian_var=1.0, prior_mu=None, prior_logvar=None, capacity=None,
        global_mean=lambda _: global_mean,
    )  # fmt: skip
    ref.loss.backward()
    torch.testing.assert_close(got["loss"], ref.loss.reshape(-1), **TOL[torch.float32])
    torch.testing.assert_close(got["grad_mu"].double(), leaves["mu"].grad, **TOL[torch.float32])
    assert bool((got["grad_mu"][:, 3:] == 0).all()) and bool((got["grad_mu"][:, :3] != 0).all())


def _exact_categorical(row: torch.Tensor, t: int) -> tuple[float, float]:
    """Loss and target gradient of one row in float64 from its rounded values:
    rest = sum of exp(x_i - max) over all but its first maximal element (fsum)."""
    x = row.double()
    m = float(x.max())
    first = int((x == m).nonzero()[0])
    e = [math.exp(float(v) - m) for v in x]
    rest = math.fsum(e[:first] + e[first + 1 :])
    loss = math.log1p(rest) - (float(x[t]) - m)
    grad_t = -rest / (1.0 + rest) if t == first else e[t] / (1.0 + rest) - 1.0
    return loss, grad_t


@pytest.mark.parametrize("vocab", [3, 40, 1500])  # warp kernel (scalar, vector), block kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_confident_row_keeps_its_digits(emulated, vocab, dtype):
    # Regression: lse_push kept s = sum exp(x_j - m), so a row whose target
    # is its max got log(s) with s = 1 + rest rounded to an ulp of 1 (2.2% off
    # for [100, 87, 85] in fp32), and p_t - 1 cancelled. The state now
    # carries rest: log1p(rest) and -rest / (1 + rest), a few ulps of each.
    eps = torch.finfo(dtype).eps
    for c in (0.0, 1e2, 1e4):
        for gap in (8.8, 13.0):
            x = c - gap - 30.0 - 0.37 * torch.arange(vocab, dtype=torch.float64).repeat(3, 1)
            x[0, 0], x[0, 1] = c, c - gap  # the target, the max, first
            x[1, -1], x[1, 0] = c, c - gap  # last
            x[2, 0], x[2, -1] = c, c  # a tie
            target = torch.tensor([[0], [vocab - 1], [0]])
            inputs = dict(
                recon_input=x.to(dtype).reshape(3, 1, vocab), target=target,
                mu=torch.zeros(3, 2, dtype=dtype), logvar=torch.zeros(3, 2, dtype=dtype),
            )  # fmt: skip
            got = run_emulated(emulated, inputs, 1.0, reduction="none")
            for r in range(3):
                t = int(target[r, 0])
                loss, grad_t = _exact_categorical(inputs["recon_input"][r, 0], t)
                what = (dtype, vocab, c, gap, r)
                assert abs(got["loss"][r].item() - loss) <= 4 * eps * loss, (what, got["loss"][r])
                g = got["grad_recon"][r, 0, t].item()
                assert abs(g - grad_t) <= 4 * eps * abs(grad_t), (what, g, grad_t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_tiny_gaussian_variance_gives_finite_values(emulated, dtype):
    # Regression: inv_var = 1 / var was inf in fp32 below 2.9e-39, so every
    # element with x == target gave 0 * inf = NaN. Such variances divide in
    # float64 (gaussian_inv_var_overflows).
    var = 1e-320 if dtype == torch.float64 else 1e-40
    x = torch.zeros(2, 6, dtype=dtype)
    x[0, :3] = torch.tensor([0.5, -1.0, 2.0])
    y = x.clone()
    y[0, 0] += {torch.float64: 1e-150, torch.float32: 1e-3, torch.bfloat16: 2**-6}[dtype]
    inputs = dict(recon_input=x, target=y, mu=torch.zeros(2, 3, dtype=dtype),
                  logvar=torch.zeros(2, 3, dtype=dtype))  # fmt: skip
    got = run_emulated(emulated, inputs, 0.0, likelihood="gaussian", gaussian_var=var,
                       reduction="none")  # fmt: skip
    arith = torch.float64 if dtype == torch.float64 else torch.float32
    d = (x.to(arith) - y.to(arith)).double()  # rounded as the kernel's x - y
    log_norm = math.log(2 * math.pi) + math.log(var)
    want_loss = (0.5 * (d * d / var + log_norm)).sum(1)
    assert torch.isfinite(got["loss"]).all(), got["loss"]
    torch.testing.assert_close(got["loss"], want_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(got["grad_recon"].double(), (d / var).to(arith).double())
