// The vectorised row and chunk kernels of the CPU ELBO launcher, chosen per
// SIMD level at run time. One body per formula (csrc/elbo_simd_body.h),
// compiled once per ISA (AVX2+FMA, AVX-512) in csrc/elbo_simd_cpu.cpp; every
// getter returns nullptr where the level has no vector kernel, and the caller
// then runs the scalar formulas of elbo_math.h.
#pragma once

#include <cstdint>

#include "klanneal/cpu_features.h"
#include "klanneal/elbo.h"

namespace klanneal {
namespace cpu {

// One categorical row x[0, n) with target 0 <= t < n: returns the row's loss
// logsumexp(x) - x[t] and, if grad is not null, writes
// (softmax(x) - onehot(t)) * scale into grad (which may alias x: x[t] is
// read before the gradient pass). next: the row to be processed after this
// one (n elements, prefetched while this row is computed), or nullptr.
template <typename T>
using CategoricalRow = double (*)(const T *x, int64_t n, int64_t t, T *grad, T scale,
                                  const T *next);
CategoricalRow<float> categorical_row_f32(SimdLevel level);
CategoricalRow<double> categorical_row_f64(SimdLevel level);

struct PointwiseConsts {
  float scale;    // 1/B for batchmean, else 1
  float inv_var;  // gaussian
  float log_norm; // gaussian: log(2 pi var)
};

// Bernoulli / gaussian / mse over fp32 x[0, n), y[0, n): the sum of the
// per-element losses (each lane widened to double before it is added) and,
// if grad is not null, the gradient times scale.
using PointwiseChunkF32 = double (*)(const float *x, const float *y, int64_t n, float *grad,
                                     const PointwiseConsts &c);
PointwiseChunkF32 pointwise_chunk_f32(SimdLevel level, Likelihood likelihood);

// Start of the first block of 4 vectors holding a value outside [0, 1] (NaN
// included), or of the tail shorter than a block: the caller scans on from
// there with scalar code.
using ValidPrefixF32 = int64_t (*)(const float *y, int64_t n);
ValidPrefixF32 unit_interval_prefix_f32(SimdLevel level);

// KL against the N(0, I) prior of one example's latents mu[0, n), logvar[0, n)
// (fp32 or fp64, gaussian_kl_elem of elbo_math.h): writes each KL into kl
// and its gradients times w into grad_mu and grad_logvar (either may be
// null); returns the sum of the KLs in double.
template <typename T>
using KlRowStandard = double (*)(const T *mu, const T *logvar, int64_t n, T w, T *kl, T *grad_mu,
                                 T *grad_logvar);
KlRowStandard<float> kl_row_standard_f32(SimdLevel level);
KlRowStandard<double> kl_row_standard_f64(SimdLevel level);

} // namespace cpu
} // namespace klanneal
