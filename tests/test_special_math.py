"""Special functions and count likelihoods of the C++ core against mpmath, at every SIMD level.

csrc/include/klanneal/special_math_body.h (lgamma, digamma, log, ...) and
count_likelihoods_body.h (Poisson, NB, ZINB losses and gradients), run through the _C
test hooks special_math_cpu / count_nll_cpu at the scalar level (the formulas CUDA runs)
and each vector level the CPU allows. References: mpmath at the exact float32/float64
inputs (tests/count_oracle.py), and torch.distributions in float64.
"""

from __future__ import annotations

import functools
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import klanneal

mp = pytest.importorskip("mpmath")

if not klanneal.HAS_NATIVE or not hasattr(klanneal._C, "special_math_cpu"):
    pytest.skip(
        "the native extension lacks the special-function test hooks", allow_module_level=True
    )

import count_oracle  # noqa: E402  (needs mpmath)

_C = klanneal._C
LEVELS = ("scalar", "avx2", "avx512")
DTYPES = (np.float32, np.float64)


@pytest.fixture(params=LEVELS)
def level(request: pytest.FixtureRequest) -> str:
    widest = klanneal.build_info()["simd"]
    if LEVELS.index(request.param) > LEVELS.index(widest):
        pytest.skip(f"{request.param} is above this CPU's (or KLANNEAL_SIMD's) level {widest}")
    return str(request.param)


# ---- special functions --------------------------------------------------------------------
# Max error in ulps of the result (|got - exact| / spacing(exact) in the dtype) over
# special_points(), every level; the measured maxima over all three levels in the comments
# (special_math_body.h quotes them, with those of a 100k-point run: lgamma <= 4.7 / 4.4,
# digamma <= 4.3 / 4.6 ulps for fp64 / fp32).
ULP_BOUNDS = {
    ("lgamma", np.float64): 6,  # 3.8 (just above x = 2: the recurrence's cancellation)
    ("lgamma", np.float32): 6,  # 3.8
    ("digamma", np.float64): 6,  # 3.0
    ("digamma", np.float32): 6,  # 3.2
    ("log", np.float64): 2,  # 0.7 (scalar level: the C library's log)
    ("log", np.float32): 2,  # 0.7
    ("log1p", np.float64): 3,  # 1.1
    ("log1p", np.float32): 3,  # 1.3
    ("expm1", np.float64): 3,  # 1.2
    ("expm1", np.float32): 3,  # 1.1
    ("log1pmx", np.float64): 5,  # 2.2
    ("log1pmx", np.float32): 5,  # 2.9
    ("softplus", np.float64): 3,  # 1.4
    ("softplus", np.float32): 3,  # 1.5
    ("log_sigmoid", np.float64): 3,  # 1.3
    ("log_sigmoid", np.float32): 3,  # 1.6
    ("sigmoid", np.float64): 3,  # 1.7
    ("sigmoid", np.float32): 3,  # 1.5
}

MP_FUNCTIONS = {
    "lgamma": mp.loggamma,
    "digamma": mp.digamma,
    "log": mp.log,
    "log1p": mp.log1p,
    "expm1": mp.expm1,
    "log1pmx": lambda u: mp.log1p(u) - u,
    "softplus": lambda z: mp.log1p(mp.exp(z)),
    "log_sigmoid": lambda z: -mp.log1p(mp.exp(-z)),
    "sigmoid": lambda z: 1 / (1 + mp.exp(-z)),
}


def _log_uniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return np.exp(rng.uniform(math.log(lo), math.log(hi), n))


@functools.cache
def special_points(fn: str, dtype: type) -> np.ndarray:
    """The inputs each function is measured on (deterministic)."""
    rng = np.random.default_rng(sum(map(ord, fn)))
    eps = float(np.finfo(dtype).eps)
    if fn in ("lgamma", "digamma"):
        # The likelihoods' range: theta in [1e-6, 1e8], x + theta up to 1e8 + 1e6, counts + 1;
        # around the zeros of lgamma (1, 2) and the root of digamma; whole and half integers;
        # both sides of the series threshold (8 for float, 10 for double).
        near = []
        for c in (1.0, 2.0, 1.4616321449683623, 8.0, 10.0):
            k = np.arange(1, 40, dtype=np.float64)
            near += [
                c * (1 + k * eps),
                c * (1 - k * eps),
                c + 10.0 ** (-k / 3),
                c - 10.0 ** (-k / 3),
            ]
        parts = [
            _log_uniform(rng, 1e-6, 1.02e8, 1500),
            rng.uniform(0.0, 12.0, 500),
            np.arange(1.0, 200.0),
            np.arange(1.0, 60.0) + 0.5,
            np.array([1e6 + 1, 1e8, 1e8 + 1e6, 1.02e8]),
            *near,
        ]
    elif fn == "log":
        tiny = float(np.finfo(dtype).smallest_subnormal)
        parts = [
            _log_uniform(rng, tiny, float(np.finfo(dtype).max), 1000),
            rng.uniform(0.5, 2.0, 500),
            1 + np.arange(-30, 30) * eps,
        ]
    elif fn in ("log1p", "log1pmx"):
        parts = [
            -_log_uniform(rng, 1e-30, 0.999, 500),
            _log_uniform(rng, 1e-30, 1e12, 800),
            rng.uniform(-0.9, 2.0, 300),
        ]
    elif fn == "expm1":
        parts = [
            rng.uniform(-60.0, 60.0, 500),
            _log_uniform(rng, 1e-30, 1.0, 300),
            -_log_uniform(rng, 1e-30, 1.0, 300),
        ]
    else:  # softplus, log_sigmoid, sigmoid
        parts = [rng.uniform(-100.0, 100.0, 800), rng.uniform(-3.0, 3.0, 200)]
    x = np.concatenate(parts).astype(dtype)
    x = x[np.isfinite(x)]
    if fn in ("lgamma", "digamma", "log"):
        x = x[x > 0]
    if fn in ("log1p", "log1pmx"):
        x = x[x > -1]
    return np.unique(x)


@functools.cache
def special_reference(fn: str, dtype: type) -> list:
    f = MP_FUNCTIONS[fn]
    with mp.workdps(50):
        return [f(mp.mpf(float(v))) for v in special_points(fn, dtype)]


def ulp_errors(got: np.ndarray, ref: list, dtype: type) -> np.ndarray:
    """|got - ref| in units of the dtype's spacing at ref (at least the smallest normal's)."""
    tiny = float(np.finfo(dtype).tiny)
    out = np.empty(len(ref))
    for i, (g, r) in enumerate(zip(got, ref)):
        spacing = float(np.spacing(dtype(max(abs(float(r)), tiny))))
        out[i] = float(abs(mp.mpf(float(g)) - r)) / spacing
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("fn", sorted(MP_FUNCTIONS))
def test_special_function_ulps(fn: str, dtype: type, level: str) -> None:
    x = special_points(fn, dtype)
    got = _C.special_math_cpu(fn, x, level)
    assert got.dtype == dtype and got.shape == x.shape
    errors = ulp_errors(got, special_reference(fn, dtype), dtype)
    worst = int(np.argmax(errors))
    assert errors[worst] <= ULP_BOUNDS[fn, dtype], (
        f"{fn}({x[worst]!r}) = {got[worst]!r}: {errors[worst]:.2f} ulps"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_special_values(dtype: type, level: str) -> None:
    big = float(np.finfo(dtype).max)
    x = np.array([0.0, -1.0, math.nan, math.inf, big], dtype=dtype)
    lg = _C.special_math_cpu("lgamma", x, level)
    dg = _C.special_math_cpu("digamma", x, level)
    lo = _C.special_math_cpu("log", x, level)
    assert lg[0] == math.inf and math.isnan(lg[1]) and math.isnan(lg[2]) and lg[3] == math.inf
    assert lg[4] == math.inf  # lgamma(max) overflows
    assert dg[0] == -math.inf and math.isnan(dg[1]) and math.isnan(dg[2]) and dg[3] == math.inf
    assert lo[0] == -math.inf and math.isnan(lo[1]) and math.isnan(lo[2]) and lo[3] == math.inf
    # Exact zeros of lgamma, and the tails: lgamma(x) ~ -log x, digamma(x) ~ -1/x.
    one_two = _C.special_math_cpu("lgamma", np.array([1.0, 2.0], dtype=dtype), level)
    assert (one_two == 0).all()
    tiny = np.array([float(np.finfo(dtype).tiny)], dtype=dtype)
    assert _C.special_math_cpu("lgamma", tiny, level)[0] == pytest.approx(-math.log(tiny[0]))
    assert _C.special_math_cpu("digamma", tiny, level)[0] == pytest.approx(-1 / float(tiny[0]))


@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 15, 16, 17, 41])
def test_every_lane_and_tail_is_computed(n: int, level: str) -> None:
    # The vector loops' partial last block: every element is computed (to the same bound).
    for dtype in DTYPES:
        x = np.linspace(0.25, 30.0, n).astype(dtype)
        got = _C.special_math_cpu("lgamma", x, level)
        with mp.workdps(50):
            want = [mp.loggamma(mp.mpf(float(v))) for v in x]
        assert ulp_errors(got, want, dtype).max() <= ULP_BOUNDS["lgamma", dtype]


# ---- count likelihoods against the mpmath oracle ------------------------------------------
# Errors in units of the dtype's eps relative to count_oracle.eps_errors' scale per output.
# Measured maxima over the grids and 2,000 more random draws (all levels): nll 10.2 (fp64,
# theta = 7.5: the lgamma reduction's log terms in delta(theta)) / 3.8 (fp32); d_mu 1.5 / 1.5;
# d_theta 16.3 / 12.8 (theta below the series threshold with counts above 8, where
# psi(x + theta) - psi(theta + 1) keeps an ulp of psi(x + theta)); d_zi_logits 1.4 / 2.0.
EPS_BOUNDS = {"nll": 24, "d_mu": 8, "d_theta": 40, "d_zi_logits": 8}
OUTPUTS = ("nll", "d_mu", "d_theta", "d_zi_logits")
FAMILY_OUTPUTS = {"poisson": 2, "nb": 3, "zinb": 4}


@functools.cache
def count_cases(family: str, dtype: type) -> tuple[dict, list]:
    inputs = count_oracle.grid(family, dtype, n_random=300, seed=7)
    return inputs, count_oracle.references(family, inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("family", ["poisson", "nb", "zinb"])
def test_count_likelihoods_match_the_oracle(family: str, dtype: type, level: str) -> None:
    inputs, refs = count_cases(family, dtype)
    outs = _C.count_nll_cpu(
        family, inputs["x"], inputs["mu"], inputs.get("theta"), inputs.get("zi_logits"), level
    )
    for k, name in enumerate(OUTPUTS[: FAMILY_OUTPUTS[family]]):
        errors = count_oracle.eps_errors(family, name, outs[k], inputs, refs, dtype)
        worst = int(np.argmax(errors))
        where = {key: float(v[worst]) for key, v in inputs.items()}
        assert errors[worst] <= EPS_BOUNDS[name], (
            f"{family} {name} at {where}: {float(outs[k][worst])!r} vs "
            f"{mp.nstr(refs[worst][name], 17)} ({errors[worst]:.3g} eps)"
        )
    for k in range(FAMILY_OUTPUTS[family], 4):
        assert (outs[k] == 0).all()  # no such parameter


def test_extremes_stay_finite_in_float32(level: str) -> None:
    # scvi-tools#2965: counts up to 1e6 with mu down to 1e-10 and theta from 1e-6 to 1e8.
    # The fp64 loss is finite (a large one), and so must the fp32 one be: 1 + u -> 0 is
    # never formed by adding 1, and no lgamma of a large argument is subtracted.
    x, mu, theta = np.meshgrid([1.0, 7.0, 1e6], [1e-10, 1e-6, 1e8], [1e-6, 1.0, 1e8])
    args = [np.ascontiguousarray(a.ravel()) for a in (x, mu, theta)]
    zi = np.full_like(args[0], -80.0)
    for family in ("nb", "zinb"):
        out64 = _C.count_nll_cpu(family, *args, zi, level)
        out32 = _C.count_nll_cpu(
            family, *(a.astype(np.float32) for a in args), zi.astype(np.float32), level
        )
        for k in range(FAMILY_OUTPUTS[family]):
            assert np.isfinite(out64[k]).all() and np.isfinite(out32[k]).all(), (family, OUTPUTS[k])
        np.testing.assert_allclose(out32[0], out64[0], rtol=1e-5)


def test_limits_without_epsilon(level: str) -> None:
    for dtype in DTYPES:
        one = np.ones(4, dtype=dtype)
        zero = np.zeros(4, dtype=dtype)
        # Poisson at x = 0, mu -> 0: loss mu (0 at mu = 0), gradient 1; no 0 * log 0.
        mu = np.array([0.0, 1e-30, 1e-10, 1.0], dtype=dtype)
        nll, d_mu, _, _ = _C.count_nll_cpu("poisson", zero, mu, None, None, level)
        np.testing.assert_array_equal(nll, mu)
        np.testing.assert_array_equal(d_mu, one)
        # mu = 0 with a count: +inf, a gradient of -inf.
        nll, d_mu, _, _ = _C.count_nll_cpu("nb", one, zero, one, None, level)
        assert (nll == math.inf).all() and (d_mu == -math.inf).all()
        # NB with mu = 0 at x = 0: p(0) = 1.
        nll, d_mu, d_theta, _ = _C.count_nll_cpu("nb", zero, zero, one, None, level)
        assert (nll == 0).all() and (d_mu == 1).all() and (d_theta == 0).all()
        # NB at x = 1, mu -> 0: d/dtheta -> 0 (psi(theta + 1) - psi(theta) = 1/theta exactly).
        theta = np.array([0.5, 3.0, 1e4, 1e8], dtype=dtype)
        _, _, d_theta, _ = _C.count_nll_cpu(
            "nb", one, np.full(4, 1e-30, dtype=dtype), theta, None, level
        )
        assert (np.abs(d_theta) < 1e-20).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_nb_tends_to_poisson(dtype: type, level: str) -> None:
    x = np.array([0.0, 1.0, 3.0, 50.0, 1e4], dtype=dtype)
    mu = np.array([0.5, 2.0, 3.0, 40.0, 1.1e4], dtype=dtype)
    theta = np.full(5, 1e8, dtype=dtype)
    nb = _C.count_nll_cpu("nb", x, mu, theta, None, level)
    po = _C.count_nll_cpu("poisson", x, mu, None, None, level)
    # log NB = log Poisson + ((x - mu)^2 - x) / (2 theta) + O(1/theta^2) (the gap is 0.005
    # at x = 1e4, mu = 1.1e4), d/dmu is Poisson's times theta/(theta + mu) exactly, and
    # d/dtheta of the loss = ((x - mu)^2 - x) / (2 theta^2) + O(1/theta^3).
    x64, mu64, theta64 = (a.astype(np.float64) for a in (x, mu, theta))
    gap = ((x64 - mu64) ** 2 - x64) / (2 * theta64)
    eps = float(np.finfo(dtype).eps)
    diff = nb[0].astype(np.float64) - po[0]
    assert (np.abs(diff + gap) <= 1e-3 * np.abs(gap) + 8 * eps * po[0]).all(), (diff, gap)
    np.testing.assert_allclose(nb[1], po[1] * theta64 / (theta64 + mu64), rtol=4 * eps)
    terms = (x64**2 + mu64**2 + x64) / theta64**2
    next_order = terms * (x64 + mu64 + 1) / theta64
    assert (
        np.abs(nb[2] - gap / theta64)
        <= 1e-3 * np.abs(gap / theta64) + next_order + 64 * eps * terms
    ).all()


# ---- against torch.distributions in float64 ------------------------------------------------
# Tolerance: 64 float64 eps times count_oracle.torch_scales (torch's own error grows with
# the terms its textbook formulas cancel).


@pytest.mark.parametrize("family", ["poisson", "nb", "zinb"])
def test_float64_matches_torch_distributions(family: str, level: str) -> None:
    c = count_oracle.torch_cases()
    names = ["mu", "theta", "zi_logits"][: FAMILY_OUTPUTS[family] - 1]
    params = [c[n].clone().requires_grad_(True) for n in names]
    log_prob = count_oracle.torch_log_prob(family, c, params)
    upstream = 2.5  # an upstream gradient other than 1
    (-upstream * log_prob).sum().backward()
    want = [-log_prob.detach()] + [p.grad / upstream for p in params]

    outs = _C.count_nll_cpu(
        family,
        c["x"].numpy(),
        c["mu"].numpy(),
        c["theta"].numpy() if family != "poisson" else None,
        c["zi_logits"].numpy() if family == "zinb" else None,
        level,
    )
    scales = count_oracle.torch_scales(family, c)
    eps = float(np.finfo(np.float64).eps)
    for k, name in enumerate(OUTPUTS[: FAMILY_OUTPUTS[family]]):
        got = torch.from_numpy(outs[k])
        finite = torch.isfinite(want[k])
        assert (torch.isfinite(got) | ~finite).all(), name
        err = (got - want[k]).abs()[finite]
        tol = (64 * eps * scales[k] + 1e-300)[finite]
        worst = int(torch.argmax(err / tol))
        assert (err <= tol).all(), (
            f"{family} {name}: {got[finite][worst].item()!r} vs torch "
            f"{want[k][finite][worst].item()!r} at "
            + str({key: float(v[finite][worst]) for key, v in c.items()})
        )


# ---- the CUDA compile -------------------------------------------------------------------------
_CUDA_SOURCE = r"""
#include "klanneal/count_likelihoods.h"

template <typename T>
__global__ void count_likelihoods(const T *x, const T *mu, const T *theta, const T *zi, T *out,
                                  int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n)
    return;
  const auto p = klanneal::PoissonNll<T>::nll_grad(x[i], mu[i]);
  const auto b = klanneal::NegBinomialNll<T>::nll_grad(x[i], mu[i], theta[i]);
  const auto z = klanneal::ZinbNll<T>::nll_grad(x[i], mu[i], theta[i], zi[i]);
  T *o = out + 12 * i;
  o[0] = p.nll + p.d_mu;
  o[1] = b.nll + b.d_mu + b.d_theta;
  o[2] = z.nll + z.d_mu + z.d_theta + z.d_zi_logits;
  o[3] = klanneal::lgamma_pos(theta[i]) + klanneal::digamma_pos(theta[i]);
  o[4] = klanneal::stirling_delta(theta[i]) + klanneal::log1p_acc(mu[i]);
  o[5] = klanneal::expm1_acc(zi[i]) + klanneal::log1pmx(mu[i]);
  o[6] = klanneal::softplus(zi[i]) + klanneal::log_sigmoid(zi[i]) + klanneal::sigmoid(zi[i]);
  o[7] = klanneal::log_add_exp(x[i], mu[i]);
  o[8] = klanneal::ZinbNll<T>::valid_target(x[i]) ? T(1) : T(0);
  o[9] = klanneal::PoissonNll<T>::nll(x[i], mu[i]);
  o[10] = klanneal::NegBinomialNll<T>::nll(x[i], mu[i], theta[i]);
  o[11] = klanneal::ZinbNll<T>::nll(x[i], mu[i], theta[i], zi[i]);
}

template __global__ void count_likelihoods<float>(const float *, const float *, const float *,
                                                  const float *, float *, int);
template __global__ void count_likelihoods<double>(const double *, const double *,
                                                   const double *, const double *, double *, int);
"""


def test_count_likelihoods_compile_under_nvcc(tmp_path: Path) -> None:
    # The headers are __host__ __device__ (KLANNEAL_HD): the CUDA kernels will include them.
    # Compiled with the build's CUDA flags (CMakeLists.txt), device and host code.
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc")
    source = tmp_path / "count_likelihoods.cu"
    source.write_text(_CUDA_SOURCE)
    include = Path(__file__).resolve().parent.parent / "csrc" / "include"
    proc = subprocess.run(
        [
            nvcc,
            "-std=c++17",
            "--expt-relaxed-constexpr",
            "-Werror=cross-execution-space-call,reorder",
            "-arch=sm_80",
            "-Xcompiler=-Wall,-Wextra,-Werror",
            f"-I{include}",
            "-c",
            str(source),
            "-o",
            str(tmp_path / "count_likelihoods.o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr.lower(), proc.stderr
