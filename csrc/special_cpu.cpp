// special_cpu.h: the array loops of special_eval_body.h, instantiated for
// the scalar formulas (ScalarOps, baseline target) and once per ISA under
// that ISA's target pragma, each with its own copy of the two math bodies
// (as elbo_simd_cpu.cpp does with elbo_simd_body.h).
#include "klanneal/special_cpu.h"

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "klanneal/count_likelihoods.h"
#include "klanneal/simd_vec_cpu.h"

namespace klanneal {
namespace cpu {

namespace special_scalar {
template <typename T> using OpsT = ScalarOps<T>;
#include "special_eval_body.h"
} // namespace special_scalar

#if defined(KLANNEAL_X86_SIMD)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace special_avx2 {
template <typename T> using OpsT = simd::Vec<simd::Avx2, T>;
#include "klanneal/special_math_body.h"
// (the next two use the special_math namespace just defined, not klanneal's)
#include "klanneal/count_likelihoods_body.h"

#include "special_eval_body.h"
} // namespace special_avx2
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
namespace special_avx512 {
template <typename T> using OpsT = simd::Vec<simd::Avx512, T>;
#include "klanneal/special_math_body.h"
// (the next two use the special_math namespace just defined, not klanneal's)
#include "klanneal/count_likelihoods_body.h"

#include "special_eval_body.h"
} // namespace special_avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif // KLANNEAL_X86_SIMD

namespace {
void check_level(SimdLevel level) {
  KLANNEAL_CHECK_ARG(static_cast<int>(level) <= static_cast<int>(cpu_simd_level()),
                     std::string("SIMD level ") + simd_level_name(level) +
                         " is above what this build, this CPU or KLANNEAL_SIMD allows (" +
                         simd_level_name(cpu_simd_level()) + ")");
}
} // namespace

template <typename T>
void special_math_eval(SpecialFn fn, SimdLevel level, const T *x, T *out, int64_t n) {
  check_level(level);
#if defined(KLANNEAL_X86_SIMD)
  if (level == SimdLevel::kAvx512)
    return special_avx512::special_map<T>(fn, x, out, n);
  if (level == SimdLevel::kAvx2)
    return special_avx2::special_map<T>(fn, x, out, n);
#endif
  special_scalar::special_map<T>(fn, x, out, n);
}

template <typename T>
void count_nll_eval(CountFamily family, SimdLevel level, const T *x, const T *mu, const T *theta,
                    const T *zi_logits, T *nll, T *d_mu, T *d_theta, T *d_zi, int64_t n) {
  check_level(level);
#if defined(KLANNEAL_X86_SIMD)
  if (level == SimdLevel::kAvx512)
    return special_avx512::count_map<T>(family, x, mu, theta, zi_logits, nll, d_mu, d_theta, d_zi,
                                        n);
  if (level == SimdLevel::kAvx2)
    return special_avx2::count_map<T>(family, x, mu, theta, zi_logits, nll, d_mu, d_theta, d_zi, n);
#endif
  special_scalar::count_map<T>(family, x, mu, theta, zi_logits, nll, d_mu, d_theta, d_zi, n);
}

template void special_math_eval<float>(SpecialFn, SimdLevel, const float *, float *, int64_t);
template void special_math_eval<double>(SpecialFn, SimdLevel, const double *, double *, int64_t);
template void count_nll_eval<float>(CountFamily, SimdLevel, const float *, const float *,
                                    const float *, const float *, float *, float *, float *,
                                    float *, int64_t);
template void count_nll_eval<double>(CountFamily, SimdLevel, const double *, const double *,
                                     const double *, const double *, double *, double *, double *,
                                     double *, int64_t);

} // namespace cpu
} // namespace klanneal
