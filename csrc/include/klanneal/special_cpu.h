// Array evaluation of the special functions (special_math.h) and the count
// likelihoods (count_likelihoods.h) at a chosen SIMD level: the scalar
// formulas (ScalarOps, as CUDA runs them) or their AVX2 / AVX-512
// instantiations. A test hook: _C.special_math_cpu / _C.count_nll_cpu
// (csrc/bind_special.cpp) measure each level's accuracy; the fused op will
// instantiate the same bodies in its own kernels.
#pragma once

#include <cstdint>

#include "klanneal/common.h"
#include "klanneal/count_family.h"
#include "klanneal/cpu_features.h"

namespace klanneal {
namespace cpu {

// The functions special_math_eval applies, X(enumerator, "python name")
// (unformatted: clang-format reflows this list differently on every pass).
// clang-format off
#define KLANNEAL_SPECIAL_FNS(X)                                                                    \
  X(kLgamma, "lgamma") X(kDigamma, "digamma") X(kStirlingDelta, "stirling_delta")                  \
  X(kLog, "log") X(kLog1p, "log1p") X(kExpm1, "expm1") X(kLog1pmx, "log1pmx")                      \
  X(kSoftplus, "softplus") X(kLogSigmoid, "log_sigmoid") X(kSigmoid, "sigmoid")
// clang-format on
enum class SpecialFn : int32_t { KLANNEAL_SPECIAL_FNS(KLANNEAL_ENUM_ENTRY) };

// The families (KLANNEAL_COUNT_FAMILIES) are those of the fused kernel.
using klanneal::CountFamily;

// out[i] = fn(x[i]) for i < n, T = float or double. Throws
// std::invalid_argument for a level this build or CPU cannot run.
template <typename T>
void special_math_eval(SpecialFn fn, SimdLevel level, const T *x, T *out, int64_t n);

// Per element i < n: the family's loss into nll[i] and its gradients into
// d_mu[i], d_theta[i], d_zi[i] (0 where the family has no such parameter).
// theta is read for nb/zinb, zi_logits for zinb only (may be null otherwise).
template <typename T>
void count_nll_eval(CountFamily family, SimdLevel level, const T *x, const T *mu, const T *theta,
                    const T *zi_logits, T *nll, T *d_mu, T *d_theta, T *d_zi, int64_t n);

} // namespace cpu
} // namespace klanneal
