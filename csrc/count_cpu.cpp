// launch_count_recon_cpu (count_recon.h): the tiles of count_simd_body.h on
// the worker threads of parallel_cpu.h, then the partial sums added up in a
// fixed order. The body is instantiated for the scalar formulas (ScalarOps,
// baseline target) and once per ISA under that ISA's target pragma, each with
// its own copy of the math bodies (as special_cpu.cpp and elbo_simd_cpu.cpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "klanneal/count_likelihoods.h"
#include "klanneal/count_recon.h"
#include "klanneal/cpu_features.h"
#include "klanneal/half_cpu.h"
#include "klanneal/parallel_cpu.h"
#include "klanneal/simd_vec_cpu.h"

namespace klanneal {
namespace cpu {

// Runs tiles [begin, end) of a call (one instantiation per level and dtype).
using RunTiles = void (*)(const CountReconParams &, const CountReconPlan &, double *, int64_t *,
                          int64_t, int64_t);

namespace count_scalar {
template <typename T> using OpsT = ScalarOps<T>;
#include "count_simd_body.h"
} // namespace count_scalar

#if defined(KLANNEAL_X86_SIMD)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace count_avx2 {
template <typename T> using OpsT = simd::Vec<simd::Avx2, T>;
#include "klanneal/special_math_body.h"
// (the next two use the special_math namespace just defined, not klanneal's)
#include "klanneal/count_likelihoods_body.h"

#include "count_simd_body.h"
} // namespace count_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))),        \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
#endif
namespace count_avx512 {
template <typename T> using OpsT = simd::Vec<simd::Avx512, T>;
#include "klanneal/special_math_body.h"
// (the next two use the special_math namespace just defined, not klanneal's)
#include "klanneal/count_likelihoods_body.h"

#include "count_simd_body.h"
} // namespace count_avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif // KLANNEAL_X86_SIMD

namespace {

SimdLevel level_of(const CountReconParams &p) {
  const SimdLevel widest = cpu_simd_level();
  if (p.simd_level < 0)
    return widest;
  KLANNEAL_CHECK_ARG(p.simd_level <= static_cast<int>(widest),
                     "count_recon: simd_level " + std::to_string(p.simd_level) +
                         " is above what this build, this CPU or KLANNEAL_SIMD allows (" +
                         simd_level_name(widest) + ")");
  return static_cast<SimdLevel>(p.simd_level);
}

template <typename S> RunTiles tiles_at(SimdLevel level) {
#if defined(KLANNEAL_X86_SIMD)
  if (level == SimdLevel::kAvx512)
    return count_avx512::run_tiles_for<S>();
  if (level == SimdLevel::kAvx2)
    return count_avx2::run_tiles_for<S>();
#endif
  (void)level;
  return count_scalar::run_tiles_for<S>();
}

RunTiles tiles_for(DType dtype, SimdLevel level) {
  switch (dtype) {
  case DType::kFloat32:
    return tiles_at<float>(level);
  case DType::kFloat64:
    return tiles_at<double>(level);
  case DType::kFloat16:
    return tiles_at<Half>(level);
  case DType::kBFloat16:
    return tiles_at<BFloat16>(level);
  }
  throw std::invalid_argument("count_recon: unknown dtype");
}

// The partial sums -> the outputs, each sum in a fixed order (count_recon.h).
template <typename G>
void finalize(const CountReconParams &p, const CountReconPlan &w, const double *scratch,
              const int64_t *invalid_keys) {
  const int64_t batch = p.batch, genes = p.genes;
  auto example_scale = [&](int64_t b) {
    return p.grad_scale * (p.row_scale != nullptr ? p.row_scale[b] : 1.0);
  };
  for (int64_t b = 0; b < batch; ++b)
    p.row_nll[b] = count_total(scratch + w.loss, w.gene_blocks, batch, b);
  auto finish = [&](void *grad, Broadcast broadcast, int64_t rows, int64_t cols) {
    G *out = static_cast<G *>(grad);
    if (rows >= 0)
      for (int64_t b = 0; b < batch; ++b)
        out[b] =
            static_cast<G>(count_total(scratch + rows, w.gene_blocks, batch, b) * example_scale(b));
    if (cols >= 0 && broadcast == Broadcast::kPerGene)
      for (int64_t g = 0; g < genes; ++g)
        out[g] = static_cast<G>(count_total(scratch + cols, w.row_chunks, genes, g) * p.grad_scale);
    if (cols >= 0 && broadcast == Broadcast::kScalar) {
      double total = 0.0;
      for (int64_t g = 0; g < genes; ++g)
        total += count_total(scratch + cols, w.row_chunks, genes, g);
      out[0] = static_cast<G>(total * p.grad_scale);
    }
  };
  finish(p.grad_theta, w.theta, w.theta_rows, w.theta_cols);
  finish(p.grad_zi, w.zi, w.zi_rows, w.zi_cols);
  if (p.first_invalid != nullptr) {
    int64_t first = kNoInvalid;
    for (int64_t t = 0; t < w.tiles; ++t)
      first = std::min(first, invalid_keys[t]);
    write_first_invalid(p.first_invalid, first);
  }
}

} // namespace
} // namespace cpu

void launch_count_recon_cpu(const CountReconParams &p) {
  check_count_recon_params(p);
  const SimdLevel level = cpu::level_of(p);
  const CountReconPlan w = count_recon_plan(p, kCountRowChunkCpu);
  // Every partial is written by its tile before finalize reads it: no zeroing.
  std::unique_ptr<double[]> scratch(
      new double[static_cast<size_t>(std::max<int64_t>(w.n_elements, 1))]);
  std::vector<int64_t> invalid_keys(p.first_invalid != nullptr ? w.tiles : 0);
  int64_t *keys = p.first_invalid != nullptr ? invalid_keys.data() : nullptr;
  const cpu::RunTiles run = cpu::tiles_for(p.dtype, level);
  cpu::parallel_for(w.tiles, p.n_threads, [&](int64_t begin, int64_t end) {
    run(p, w, scratch.get(), keys, begin, end);
  });
  if (p.dtype == DType::kFloat64)
    cpu::finalize<double>(p, w, scratch.get(), keys);
  else
    cpu::finalize<float>(p, w, scratch.get(), keys);
}

} // namespace klanneal
