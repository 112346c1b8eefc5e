# Type stub of klanneal._C, the pybind11 module built from csrc/bind*.cpp.
# Checked against the built extension by `make lint` (mypy.stubtest), so a
# binding added or changed without this file fails there. The *_cuda entry
# points exist only in a build with CUDA kernels (build_info()["cuda"]);
# callers test for them with hasattr.

from collections.abc import Sequence
from typing import Any, SupportsFloat, SupportsIndex, SupportsInt, TypedDict, Union

import numpy as np
import numpy.typing as npt

_Float = Union[SupportsFloat, SupportsIndex]
_Int = Union[SupportsInt, SupportsIndex]
_Params = Sequence[_Float]  # the 8 floats of Schedule.to_params()
_FloatArray = npt.NDArray[np.float64]

class _BuildInfo(TypedDict):
    version: str
    cuda: bool
    cuda_version: str
    cuda_archs: str
    compiler: str
    simd: str
    simd_compiled: str

def build_info() -> _BuildInfo: ...

# ---- schedules (csrc/bind_schedules.cpp) ----
def frange_cycle_linear(
    n_iter: _Int, start: _Float, stop: _Float, n_cycle: _Int, ratio: _Float
) -> _FloatArray: ...
def frange_cycle_sigmoid(
    n_iter: _Int, start: _Float, stop: _Float, n_cycle: _Int, ratio: _Float
) -> _FloatArray: ...
def frange_cycle_cosine(
    n_iter: _Int, start: _Float, stop: _Float, n_cycle: _Int, ratio: _Float
) -> _FloatArray: ...
def frange_cycle_zero_linear(
    n_iter: _Int,
    start: _Float,
    stop: _Float,
    n_cycle: _Int,
    ratio_increase: _Float,
    ratio_zero: _Float,
) -> _FloatArray: ...
def check_schedule_params(params: _Params) -> None: ...
def schedule_value(params: _Params, step: _Int) -> float: ...
def schedule_values(params: _Params, steps: npt.ArrayLike, n_threads: _Int = 0) -> _FloatArray: ...
def schedule_values_range(
    params: _Params, first_step: _Int, n: _Int, n_threads: _Int = 0
) -> _FloatArray: ...
def schedule_values_cuda(
    params: _Params, steps_ptr: _Int, out_ptr: _Int, n: _Int, stream: _Int
) -> None: ...

# ---- fused ELBO (csrc/bind_elbo.cpp, csrc/bind_elbo_cuda.cpp) ----
# The packed call: sizes, ptrs, floats, ints in the slot orders of
# elbo_layout() (csrc/include/klanneal/elbo_layout.h); klanneal/_layout.py packs it.
def elbo_layout() -> dict[str, list[str]]: ...
def elbo_forward_cpu(
    sizes: Sequence[_Int], ptrs: Sequence[_Int], floats: Sequence[float], ints: Sequence[_Int]
) -> int: ...
def _exp_nonpos_mismatches(stride: _Int) -> int: ...

# elbo_loss's common call in one C call (csrc/bind_common_call.cpp,
# klanneal/_common_call.py).
def common_setup(config: dict[str, Any]) -> None: ...
def common_lane(
    sizes: Sequence[_Int],
    floats: Sequence[float],
    ints: Sequence[_Int],
    zero_d: Any,
    dtype: Any,
    plan: Any,
    grad_recon: bool,
    grad_mu: bool,
    grad_logvar: bool,
    pool_numel: _Int,
) -> Any: ...
def common_elbo(
    recon_input: Any,
    target: Any,
    mu: Any,
    logvar: Any,
    beta: Any,
    likelihood: Any,
    reduction: Any,
    free_bits: Any,
    free_bits_mode: Any,
    ignore_index: Any,
    gaussian_var: Any,
    validate: Any,
    /,
) -> Any: ...
def elbo_cuda_workspace_bytes(
    sizes: Sequence[_Int], ptrs: Sequence[_Int], floats: Sequence[float], ints: Sequence[_Int]
) -> int: ...
def elbo_forward_cuda(
    sizes: Sequence[_Int],
    ptrs: Sequence[_Int],
    floats: Sequence[float],
    ints: Sequence[_Int],
    workspace_ptr: _Int,
    workspace_bytes: _Int,
    stream: _Int,
) -> None: ...

# ---- gradient-buffer pool (csrc/bind_pool.cpp) ----
pool_max_buffers: int
pool_max_bytes: int

def pooled_empty(shape: Sequence[_Int], dtype_code: _Int) -> object: ...  # a DLPack capsule
def pool_cached_bytes() -> int: ...
def cpu_threads_backend() -> str: ...
def pool_empty_cache() -> None: ...
def _pool_hold_lock_for_testing(milliseconds: _Int) -> None: ...

# ---- special functions, count likelihoods: test hooks (csrc/bind_special.cpp) ----
_RealArray = Union[npt.NDArray[np.float32], npt.NDArray[np.float64]]

def special_math_cpu(fn: str, x: _RealArray, simd_level: str) -> _RealArray: ...
def count_nll_cpu(
    family: str,
    x: _RealArray,
    mu: _RealArray,
    theta: _RealArray | None,
    zi_logits: _RealArray | None,
    simd_level: str,
) -> tuple[_RealArray, _RealArray, _RealArray, _RealArray]: ...

# ---- count reconstruction kernel (csrc/bind_count.cpp, csrc/bind_count_cuda.cpp) ----
# The packed call: sizes, ptrs, floats in the slot orders of count_recon_layout()
# (csrc/include/klanneal/count_recon.h).
def count_recon_layout() -> dict[str, list[str]]: ...
def count_recon_forward_cpu(
    sizes: Sequence[_Int], ptrs: Sequence[_Int], floats: Sequence[float]
) -> None: ...
def count_recon_cuda_workspace_bytes(
    sizes: Sequence[_Int], ptrs: Sequence[_Int], floats: Sequence[float]
) -> int: ...
def count_recon_forward_cuda(
    sizes: Sequence[_Int], ptrs: Sequence[_Int], floats: Sequence[float], stream: _Int
) -> None: ...
