// The vectorised CPU kernels of elbo_simd_body.h, instantiated once per ISA:
// the body is included twice, each time in its own namespace under that
// ISA's target pragma and after that namespace's copy of the elementwise
// likelihoods' traits structs (elementwise_likelihoods_body.h, whose vector
// forms it runs), so one body per formula serves AVX2 and AVX-512 (and fp32
// and fp64). Functions defined outside the pragmas (elbo_math.h, the
// standard library) keep the baseline target: nothing compiled for AVX-512
// can be picked by the linker for the baseline code paths.
#include "klanneal/elbo_simd_cpu.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "klanneal/elbo_math.h"
#include "klanneal/elementwise_likelihoods.h"
#include "klanneal/simd_vec_cpu.h"

namespace klanneal {
namespace cpu {

#if defined(KLANNEAL_X86_SIMD)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
using Isa = simd::Avx2;
#include "klanneal/elementwise_likelihoods_body.h"

#include "elbo_simd_body.h"
} // namespace avx2
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
namespace avx512 {
using Isa = simd::Avx512;
#include "klanneal/elementwise_likelihoods_body.h"

#include "elbo_simd_body.h"
} // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace {
// The kernel of this SIMD level: the AVX-512 or the AVX2 instantiation of
// one body, or nullptr (scalar code) below AVX2.
template <typename F> F at_level(SimdLevel level, F avx512_kernel, F avx2_kernel) {
  if (level == SimdLevel::kAvx512)
    return avx512_kernel;
  if (level == SimdLevel::kAvx2)
    return avx2_kernel;
  return nullptr;
}

} // namespace

CategoricalRun<float> categorical_run_f32(SimdLevel level) {
  return at_level<CategoricalRun<float>>(level, avx512::categorical_run<float>,
                                         avx2::categorical_run<float>);
}

CategoricalRun<double> categorical_run_f64(SimdLevel level) {
  return at_level<CategoricalRun<double>>(level, avx512::categorical_run<double>,
                                          avx2::categorical_run<double>);
}

KlRowStandard<float> kl_row_standard_f32(SimdLevel level) {
  return at_level<KlRowStandard<float>>(level, avx512::kl_row_standard<float>,
                                        avx2::kl_row_standard<float>);
}

KlRowStandard<double> kl_row_standard_f64(SimdLevel level) {
  return at_level<KlRowStandard<double>>(level, avx512::kl_row_standard<double>,
                                         avx2::kl_row_standard<double>);
}

template <Likelihood L> ElementwiseChunkF32<L> elementwise_chunk_f32(SimdLevel level) {
  return at_level<ElementwiseChunkF32<L>>(level, avx512::elementwise_chunk<L>,
                                          avx2::elementwise_chunk<L>);
}

template <Likelihood L> ValidPrefixF32 valid_target_prefix_f32(SimdLevel level) {
  if constexpr (ElementwiseLoss<L, float>::kChecksTargets) {
    return at_level<ValidPrefixF32>(level, avx512::valid_target_prefix<L>,
                                    avx2::valid_target_prefix<L>);
  } else {
    (void)level;
    return nullptr;
  }
}

int64_t exp_nonpos_mismatches(SimdLevel level, uint32_t stride) {
  using Check = int64_t (*)(uint32_t);
  const Check check =
      at_level<Check>(level, avx512::exp_nonpos_mismatches, avx2::exp_nonpos_mismatches);
  return check != nullptr ? check(stride) : -1;
}

#else // no x86 SIMD: the scalar formulas everywhere

CategoricalRun<float> categorical_run_f32(SimdLevel) { return nullptr; }
CategoricalRun<double> categorical_run_f64(SimdLevel) { return nullptr; }
template <Likelihood L> ElementwiseChunkF32<L> elementwise_chunk_f32(SimdLevel) { return nullptr; }
KlRowStandard<float> kl_row_standard_f32(SimdLevel) { return nullptr; }
KlRowStandard<double> kl_row_standard_f64(SimdLevel) { return nullptr; }
template <Likelihood L> ValidPrefixF32 valid_target_prefix_f32(SimdLevel) { return nullptr; }
int64_t exp_nonpos_mismatches(SimdLevel, uint32_t) { return -1; }

#endif

// The getters of every elementwise likelihood.
#define KLANNEAL_INSTANTIATE_GETTERS(enumerator, name, Loss)                                       \
  template ElementwiseChunkF32<Likelihood::enumerator>                                             \
      elementwise_chunk_f32<Likelihood::enumerator>(SimdLevel);                                    \
  template ValidPrefixF32 valid_target_prefix_f32<Likelihood::enumerator>(SimdLevel);
KLANNEAL_ELEMENTWISE_LIKELIHOODS(KLANNEAL_INSTANTIATE_GETTERS)
#undef KLANNEAL_INSTANTIATE_GETTERS

} // namespace cpu
} // namespace klanneal
