// The vectorised row and chunk kernels of the CPU ELBO launcher, chosen per
// SIMD level at run time. One body per formula (csrc/elbo_simd_body.h),
// compiled once per ISA (AVX2+FMA, AVX-512) in csrc/elbo_simd_cpu.cpp; every
// getter returns nullptr where the level has no vector kernel, and the caller
// then runs the scalar formulas (elbo_math.h, the scalar form of the
// elementwise traits structs).
#pragma once

#include <cstdint>

#include "klanneal/cpu_features.h"
#include "klanneal/elbo.h"
#include "klanneal/elementwise_likelihoods.h"

namespace klanneal {
namespace cpu {

// A run of `rows` categorical rows x[r * n, (r + 1) * n), each with a
// target 0 <= target[r] < n: loss[r] = logsumexp(row r) - x_r[target[r]]
// and, if grad is not null, (softmax(row r) - onehot(target[r])) * scale
// into grad's row r (grad may alias x: every row's target logit is read
// before that row's gradient is written).
template <typename T>
using CategoricalRun = void (*)(const T *x, int64_t rows, int64_t n, const int64_t *target, T *grad,
                                T scale, double *loss);
CategoricalRun<float> categorical_run_f32(SimdLevel level);
CategoricalRun<double> categorical_run_f64(SimdLevel level);

// Elementwise likelihood L over fp32 x[0, n), y[0, n): the sum of the
// per-element losses (each lane widened to double before it is added) and,
// if grad is not null, d loss / d x times scale, from the vector form of
// ElementwiseLoss<L, float> (elementwise_likelihoods_body.h) on the
// constants of `loss`. Only where loss.has_lanes().
template <Likelihood L>
using ElementwiseChunkF32 = double (*)(const ElementwiseLoss<L, float> &loss, const float *x,
                                       const float *y, int64_t n, float *grad, float scale);
template <Likelihood L> ElementwiseChunkF32<L> elementwise_chunk_f32(SimdLevel level);

// For a likelihood whose targets are checked (kChecksTargets): the start of
// the first block of 4 vectors holding a target its check rejects (NaN
// included), or of the tail shorter than a block: the caller scans on from
// there with scalar code. nullptr for the other likelihoods.
using ValidPrefixF32 = int64_t (*)(const float *y, int64_t n);
template <Likelihood L> ValidPrefixF32 valid_target_prefix_f32(SimdLevel level);

// KL against the N(0, I) prior of one example's latents mu[0, n), logvar[0, n)
// (fp32 or fp64, gaussian_kl_elem of elbo_math.h): writes each KL into kl
// and its gradients times w into grad_mu and grad_logvar (either may be
// null); returns the sum of the KLs in double.
template <typename T>
using KlRowStandard = double (*)(const T *mu, const T *logvar, int64_t n, T w, T *kl, T *grad_mu,
                                 T *grad_logvar);
KlRowStandard<float> kl_row_standard_f32(SimdLevel level);
KlRowStandard<double> kl_row_standard_f64(SimdLevel level);

// The number of fp32 lanes where exp_nonpos and exp (simd_exp_cpu.h) at
// this level differ in their bits (both NaN counts as equal), over the
// floats with the sign bit set, a vector of consecutive bit patterns every
// `stride` patterns (all of them for stride <= the lane count), and +0; -1
// below AVX2. A test of the claim that the cheaper exp is the same function
// on x <= 0.
int64_t exp_nonpos_mismatches(SimdLevel level, uint32_t stride);

} // namespace cpu
} // namespace klanneal
