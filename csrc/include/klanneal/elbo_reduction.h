// What the fused ELBO op does with its sums -- the reduction's scale, free
// bits in "batch" and "sample" mode, the capacity, kl_weight and the outputs
// -- defined once, for the CPU launcher (csrc/elbo_cpu.cpp) and the CUDA
// kernels (csrc/cuda/elbo_kernel.cuh). The backends differ only in how they
// sum: the CPU into per-unit slots added up in a fixed order, CUDA in CUB
// block reductions. Arithmetic is in float64 unless a function says otherwise.
//
// The sums, per example b: recon_b (the reconstruction NLL), kl_b = sum_d
// KL_bd (the true KL) and term_b = sum_d kl_term_elem(...).term (the KL term
// before the capacity); per latent dimension d: sum_b KL_bd, whose mean is
// kl_per_dim[d] (kl_dim_mean) and, with batch free bits, clamped
// (batch_free_bits_dim).
#pragma once

#include <cstdint>

#include "klanneal/common.h"
#include "klanneal/elbo.h"

namespace klanneal {

// ---- the reduction ---------------------------------------------------------------
// kBatchMean divides the batch's sums by B (the per-example ELBO); kSum and
// kNone (one value per example) do not.
KLANNEAL_HD double reduction_divisor(const ElboParams &p) {
  return p.reduction == Reduction::kBatchMean ? static_cast<double>(p.batch) : 1.0;
}

// d loss / d (one example's terms) under the reduction, 1 / reduction_divisor
// formed in T (the inputs' arithmetic type): the factor of every gradient.
template <typename T> KLANNEAL_HD T reduction_scale(const ElboParams &p) {
  return T(1) / static_cast<T>(reduction_divisor(p));
}

// The weight of the latent gradients, d loss / d KL_bd before the free-bits
// mask and the capacity's sign: beta * reduction_scale, rounded once to T.
template <typename T> KLANNEAL_HD T kl_grad_weight(const ElboParams &p, double beta) {
  return static_cast<T>(beta * reduction_scale<double>(p));
}

// ---- free bits ---------------------------------------------------------------------
// lambda > 0 makes a KL x into max(lambda, x), as torch.clamp(x, min=lambda):
// a NaN x stays NaN, and the gradient passes where x >= lambda (ties
// included). "sample" mode clamps each KL_bd, compared in T (the latents'
// arithmetic type); "batch" mode clamps each dimension's batch mean, compared
// in float64. The reference compares in the same precisions.
KLANNEAL_HD bool sample_free_bits(const ElboParams &p) {
  return p.free_bits > 0.0 && p.free_bits_mode == FreeBitsMode::kSample;
}
KLANNEAL_HD bool batch_free_bits(const ElboParams &p) {
  return p.free_bits > 0.0 && p.free_bits_mode == FreeBitsMode::kBatch;
}

template <typename T> KLANNEAL_HD T free_bits_clamp(T x, T lambda) {
  return x < lambda ? lambda : x;
}
template <typename T> KLANNEAL_HD bool free_bits_pass(T x, T lambda) { return x >= lambda; }

// One latent element's share of its example's KL term and whether its
// gradient passes: max(lambda, KL_bd) with sample free bits (sample =
// sample_free_bits(p), lambda = free_bits in T), else KL_bd, passing.
template <typename T> struct KlTermElem {
  T term;
  bool pass;
};
template <typename T> KLANNEAL_HD KlTermElem<T> kl_term_elem(bool sample, T kl, T lambda) {
  if (sample)
    return {free_bits_clamp(kl, lambda), free_bits_pass(kl, lambda)};
  return {kl, true};
}

// kl_per_dim[d], the batch mean of KL_bd, from its float64 sum over the batch.
KLANNEAL_HD double kl_dim_mean(const ElboParams &p, double sum) {
  return sum / static_cast<double>(p.batch);
}

// Batch free bits on dimension d: max(lambda, mean) and whether the
// gradients of the dimension pass, where the mean is the caller's
// all-reduced global one (data-parallel free bits) if given, else this
// batch's, local_mean = kl_dim_mean.
struct KlDimTerm {
  double term;
  bool pass;
};
KLANNEAL_HD KlDimTerm batch_free_bits_dim(const ElboParams &p, int64_t d, double local_mean) {
  const double mean = p.global_kl_per_dim != nullptr ? p.global_kl_per_dim[d] : local_mean;
  return {free_bits_clamp(mean, p.free_bits), free_bits_pass(mean, p.free_bits)};
}

// ---- capacity --------------------------------------------------------------------
// The capacity objective of a KL term t: |t - C|, and its derivative
// sign(t - C), 0 at t == C (the subgradient torch.abs uses) and NaN for a
// NaN t.
KLANNEAL_HD double capacity_term(double t, double c) { return t < c ? c - t : t - c; }
KLANNEAL_HD double capacity_sign(double t, double c) {
  return t > c ? 1.0 : t < c ? -1.0 : t == c ? 0.0 : t;
}

// A KL term after the capacity, and d term / d (the term before it): the
// factor of the latent gradients (1 without a capacity).
struct KlTerm {
  double term;
  double sign;
};

// Example b's KL term for kNone: term_b, or |term_b - C| (capacity = C when
// has_capacity).
KLANNEAL_HD KlTerm example_kl_term(const ElboParams &p, double term_b, double capacity) {
  if (!p.has_capacity)
    return {term_b, 1.0};
  return {capacity_term(term_b, capacity), capacity_sign(term_b, capacity)};
}

// The batch's KL term for kBatchMean / kSum, from sum = sum_b term_b or,
// with batch free bits, sum_d batch_free_bits_dim(...).term. Batch free
// bits is a per-example quantity (it applies to the batch-mean KL): the
// batch's term is B times it, so that batchmean gives sum_d max(lambda,
// mean_b KL_bd) and sum gives B times that. The capacity also applies to
// the per-example term t / B: B * |t / B - C|.
KLANNEAL_HD KlTerm batch_kl_term(const ElboParams &p, double sum, double capacity) {
  const double batch = static_cast<double>(p.batch);
  const double term = batch_free_bits(p) ? sum * batch : sum;
  if (!p.has_capacity)
    return {term, 1.0};
  const double per_example = term / batch;
  return {batch * capacity_term(per_example, capacity), capacity_sign(per_example, capacity)};
}

// ---- the outputs -----------------------------------------------------------------
// kNone: example b's loss, recon, kl and kl_weight (d loss_b / d beta, its KL
// term after free bits and the capacity).
KLANNEAL_HD void store_example_outputs(const ElboParams &p, int64_t b, double beta, double recon_b,
                                       double kl_b, double kl_term_b) {
  p.loss[b] = recon_b + beta * kl_term_b;
  p.recon[b] = recon_b;
  p.kl[b] = kl_b;
  if (p.kl_weight != nullptr)
    p.kl_weight[b] = kl_term_b;
}

// kBatchMean / kSum: the batch's sums (kl_term from batch_kl_term) divided by
// reduction_divisor.
KLANNEAL_HD void store_batch_outputs(const ElboParams &p, double beta, double recon_sum,
                                     double kl_sum, double kl_term) {
  const double divisor = reduction_divisor(p);
  *p.loss = (recon_sum + beta * kl_term) / divisor;
  *p.recon = recon_sum / divisor;
  *p.kl = kl_sum / divisor;
  if (p.kl_weight != nullptr)
    *p.kl_weight = kl_term / divisor;
}

} // namespace klanneal
