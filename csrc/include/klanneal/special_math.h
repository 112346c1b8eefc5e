// Special functions for the count likelihoods, as KLANNEAL_HD scalar
// functions (the scalar CPU path and CUDA share them): lgamma and digamma
// of our own for x > 0 (std::lgamma writes signgam on some C libraries, is
// not thread-safe there and cannot be vectorised), log1p, expm1,
// log1p(u) - u, softplus / log-sigmoid / sigmoid and log_add_exp.
//
// The formulas are written once, in special_math_body.h, against an ops
// traits; ScalarOps<T> below is the scalar one, simd::Vec<Isa, T> the
// vector ones, so AVX2 and AVX-512 run the same formulas. Arithmetic is in
// T (float for fp32/fp16/bf16 inputs, double for fp64); the accuracy each
// function reaches is stated in special_math_body.h.
#pragma once

#include <cmath>
#include <cstdint>

#include "klanneal/common.h"

namespace klanneal {

#if !defined(__CUDACC__)
// Unqualified calls below pick the float overloads for T = float on the
// host (as in elbo_math.h); nvcc provides its own.
using std::exp;
using std::fabs;
using std::floor;
using std::log;
#endif

namespace scalar_ops_detail {
template <typename T> KLANNEAL_HD T log_(T a) { return log(a); }
template <typename T> KLANNEAL_HD T exp_(T a) { return exp(a); }
template <typename T> KLANNEAL_HD T floor_(T a) { return floor(a); }
template <typename T> KLANNEAL_HD T fabs_(T a) { return fabs(a); }
template <typename T> KLANNEAL_HD T fma_(T a, T b, T c) {
#if defined(__CUDACC__)
  return fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
} // namespace scalar_ops_detail

// The ops traits of plain scalars (see special_math_body.h): R = T, a mask
// is a bool. max/min return their second operand when either is NaN, as the
// x86 instructions do. fmadd is a * b + c (contracted to an FMA only where
// the compiler does so, e.g. nvcc); fma_exact is the C library's fma (one
// rounding always; a call on the host, used where one product must not
// round); log and exp are the C library's.
template <typename Scalar> struct ScalarOps {
  using T = Scalar;
  using R = Scalar;
  using C = bool;
  static constexpr int kLanes = 1;
  static KLANNEAL_HD R set1(T v) { return v; }
  static KLANNEAL_HD R loadu(const T *p) { return *p; }
  static KLANNEAL_HD void storeu(T *p, R v) { *p = v; }
  static KLANNEAL_HD R add(R a, R b) { return a + b; }
  static KLANNEAL_HD R sub(R a, R b) { return a - b; }
  static KLANNEAL_HD R mul(R a, R b) { return a * b; }
  static KLANNEAL_HD R div(R a, R b) { return a / b; }
  static KLANNEAL_HD R fmadd(R a, R b, R c) { return a * b + c; }
  static KLANNEAL_HD R fma_exact(R a, R b, R c) { return scalar_ops_detail::fma_(a, b, c); }
  static KLANNEAL_HD R max(R a, R b) { return a > b ? a : b; }
  static KLANNEAL_HD R min(R a, R b) { return a < b ? a : b; }
  static KLANNEAL_HD R abs(R a) { return scalar_ops_detail::fabs_(a); }
  static KLANNEAL_HD R floor(R a) { return scalar_ops_detail::floor_(a); }
  static KLANNEAL_HD R log(R a) { return scalar_ops_detail::log_(a); }
  static KLANNEAL_HD R exp(R a) { return scalar_ops_detail::exp_(a); }
  static KLANNEAL_HD C lt(R a, R b) { return a < b; }
  static KLANNEAL_HD C le(R a, R b) { return a <= b; }
  static KLANNEAL_HD C gt(R a, R b) { return a > b; }
  static KLANNEAL_HD C ge(R a, R b) { return a >= b; }
  static KLANNEAL_HD C eq(R a, R b) { return a == b; }
  static KLANNEAL_HD C both(C a, C b) { return a && b; }
  static KLANNEAL_HD R select(C c, R a, R b) { return c ? a : b; }
};

#include "klanneal/special_math_body.h"

// ---- the scalar functions --------------------------------------------------------
// T = float or double. Domains and accuracy: special_math_body.h.

// lgamma(x) for x > 0 (0: +inf; x < 0: NaN).
template <typename T> KLANNEAL_HD T lgamma_pos(T x) {
  return special_math::lgamma<ScalarOps<T>>(x);
}

// digamma(x) for x > 0 (0: -inf; x < 0: NaN).
template <typename T> KLANNEAL_HD T digamma_pos(T x) {
  return special_math::digamma<ScalarOps<T>>(x);
}

// lgamma(z) - [(z - 1/2) log z - z + log(2 pi)/2] for z > 0.
template <typename T> KLANNEAL_HD T stirling_delta(T z) {
  return special_math::stirling_delta<ScalarOps<T>>(z);
}

// log(1 + u) for u >= -1, to about an ulp.
template <typename T> KLANNEAL_HD T log1p_acc(T u) { return special_math::log1p<ScalarOps<T>>(u); }

// exp(v) - 1.
template <typename T> KLANNEAL_HD T expm1_acc(T v) { return special_math::expm1<ScalarOps<T>>(v); }

// log(1 + u) - u for u > -1 (<= 0).
template <typename T> KLANNEAL_HD T log1pmx(T u) {
  return special_math::log1pmx<ScalarOps<T>>(u, T(1) + u);
}

// softplus(z) = log(1 + exp(z)).
template <typename T> KLANNEAL_HD T softplus(T z) {
  return special_math::softplus_pair<ScalarOps<T>>(z).softplus_pos;
}

// log(sigmoid(z)) = -softplus(-z).
template <typename T> KLANNEAL_HD T log_sigmoid(T z) {
  return -special_math::softplus_pair<ScalarOps<T>>(z).softplus_neg;
}

// sigmoid(z) = 1 / (1 + exp(-z)), accurate for both signs of z.
template <typename T> KLANNEAL_HD T sigmoid(T z) {
  return special_math::softplus_pair<ScalarOps<T>>(z).sigmoid_pos;
}

// log(exp(a) + exp(b)).
template <typename T> KLANNEAL_HD T log_add_exp(T a, T b) {
  return special_math::log_add_exp<ScalarOps<T>>(a, b);
}

} // namespace klanneal
