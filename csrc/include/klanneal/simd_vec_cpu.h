// The vector operations the CPU kernels are written in, one traits struct per
// (ISA, element type): Vec<Avx2, float> has 8 lanes, Vec<Avx512, float> 16,
// Vec<Avx2, double> 4, Vec<Avx512, double> 8. Every member has the same
// meaning in each; the kernels (csrc/elbo_simd_body.h) are written once against
// this interface and instantiated per ISA. Each member carries its ISA's
// target attribute, so the library still builds for baseline x86-64 and
// picks the ISA at run time (cpu_features.h).
//
//   R        the register type;  C  the result of a comparison (a lane mask)
//   loadu / storeu              full vectors, unaligned
//   load_tail(p, left, fill)    the first min(left, kLanes) lanes from p, `fill` in the others
//   store_tail(p, left, v)      stores the first min(left, kLanes) lanes
//   select(c, a, b)             a where c, else b
//   exp                         simd_exp_cpu.h's exp (NaN -> NaN, -inf -> 0)
//   exp_nonpos                  the same for x <= 0 or NaN only, cheaper (fp32; fp64: exp)
//   log, floor                  simd_exp_cpu.h's log (0 -> -inf, x < 0 -> NaN); round down
//   lt, le, gt, ge, eq, both    ordered comparisons (false for NaN), mask and
//   fmadd, fma_exact            a * b + c with one rounding (the same here; the scalar
//                               traits of special_math.h tell them apart)
#pragma once

#include "klanneal/simd_exp_cpu.h"

#if defined(KLANNEAL_X86_SIMD)

#include <algorithm>
#include <cstdint>

namespace klanneal {
namespace simd {

struct Avx2 {};
struct Avx512 {};

template <typename Isa, typename T> struct Vec;

#define KLANNEAL_VEC_AVX2 static KLANNEAL_TARGET_AVX2 inline
#define KLANNEAL_VEC_AVX512 static KLANNEAL_TARGET_AVX512 inline

template <> struct Vec<Avx2, float> {
  using T = float;
  using R = __m256;
  using C = __m256;
  static constexpr int kLanes = 8;
  KLANNEAL_VEC_AVX2 R set1(T v) { return _mm256_set1_ps(v); }
  KLANNEAL_VEC_AVX2 R zero() { return _mm256_setzero_ps(); }
  KLANNEAL_VEC_AVX2 R loadu(const T *p) { return _mm256_loadu_ps(p); }
  KLANNEAL_VEC_AVX2 void storeu(T *p, R v) { _mm256_storeu_ps(p, v); }
  KLANNEAL_VEC_AVX2 __m256i tail(int64_t left) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(left, 8))),
                              lane);
  }
  KLANNEAL_VEC_AVX2 R load_tail(const T *p, int64_t left, R fill) {
    const __m256i m = tail(left);
    return _mm256_blendv_ps(fill, _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
  }
  KLANNEAL_VEC_AVX2 void store_tail(T *p, int64_t left, R v) {
    _mm256_maskstore_ps(p, tail(left), v);
  }
  // v in the first min(left, kLanes) lanes, 0 in the others.
  KLANNEAL_VEC_AVX2 R keep_head(R v, int64_t left) {
    return _mm256_and_ps(v, _mm256_castsi256_ps(tail(left)));
  }
  KLANNEAL_VEC_AVX2 R add(R a, R b) { return _mm256_add_ps(a, b); }
  KLANNEAL_VEC_AVX2 R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  KLANNEAL_VEC_AVX2 R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  KLANNEAL_VEC_AVX2 R div(R a, R b) { return _mm256_div_ps(a, b); }
  KLANNEAL_VEC_AVX2 R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  KLANNEAL_VEC_AVX2 R fma_exact(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  // max(a, b) is b where either is NaN (the kernels rely on the operand order).
  KLANNEAL_VEC_AVX2 R max(R a, R b) { return _mm256_max_ps(a, b); }
  KLANNEAL_VEC_AVX2 R abs(R a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  KLANNEAL_VEC_AVX2 C eq(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  KLANNEAL_VEC_AVX2 C lt(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  KLANNEAL_VEC_AVX2 C gt(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  KLANNEAL_VEC_AVX2 C le(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
  KLANNEAL_VEC_AVX2 C ge(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  KLANNEAL_VEC_AVX2 C both(C a, C b) { return _mm256_and_ps(a, b); }
  KLANNEAL_VEC_AVX2 bool all(C c) { return _mm256_movemask_ps(c) == 0xFF; }
  KLANNEAL_VEC_AVX2 R select(C c, R a, R b) { return _mm256_blendv_ps(b, a, c); }
  KLANNEAL_VEC_AVX2 R exp(R a) { return exp_avx2(a); }
  KLANNEAL_VEC_AVX2 R exp_nonpos(R a) { return exp_nonpos_avx2(a); }
  KLANNEAL_VEC_AVX2 R log1p_unit(R a) { return log1p_unit_avx2(a); }
  KLANNEAL_VEC_AVX2 R log(R a) { return log_avx2(a); }
  KLANNEAL_VEC_AVX2 R floor(R a) {
    return _mm256_round_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  }
  // Float lanes widened to double and added to two accumulators (low, high).
  KLANNEAL_VEC_AVX2 void add_widened(__m256d *lo, __m256d *hi, R v) {
    *lo = _mm256_add_pd(*lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    *hi = _mm256_add_pd(*hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  KLANNEAL_VEC_AVX2 __m256d zero_wide() { return _mm256_setzero_pd(); }
  KLANNEAL_VEC_AVX2 void store_wide(double *p, __m256d v) { _mm256_storeu_pd(p, v); }
  using Wide = __m256d;
};

template <> struct Vec<Avx2, double> {
  using T = double;
  using R = __m256d;
  using C = __m256d;
  static constexpr int kLanes = 4;
  KLANNEAL_VEC_AVX2 R set1(T v) { return _mm256_set1_pd(v); }
  KLANNEAL_VEC_AVX2 R zero() { return _mm256_setzero_pd(); }
  KLANNEAL_VEC_AVX2 R loadu(const T *p) { return _mm256_loadu_pd(p); }
  KLANNEAL_VEC_AVX2 void storeu(T *p, R v) { _mm256_storeu_pd(p, v); }
  KLANNEAL_VEC_AVX2 __m256i tail(int64_t left) {
    const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(std::min<int64_t>(left, 4)), lane);
  }
  KLANNEAL_VEC_AVX2 R load_tail(const T *p, int64_t left, R fill) {
    const __m256i m = tail(left);
    return _mm256_blendv_pd(fill, _mm256_maskload_pd(p, m), _mm256_castsi256_pd(m));
  }
  KLANNEAL_VEC_AVX2 void store_tail(T *p, int64_t left, R v) {
    _mm256_maskstore_pd(p, tail(left), v);
  }
  KLANNEAL_VEC_AVX2 R add(R a, R b) { return _mm256_add_pd(a, b); }
  KLANNEAL_VEC_AVX2 R sub(R a, R b) { return _mm256_sub_pd(a, b); }
  KLANNEAL_VEC_AVX2 R mul(R a, R b) { return _mm256_mul_pd(a, b); }
  KLANNEAL_VEC_AVX2 R fmadd(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  KLANNEAL_VEC_AVX2 R fma_exact(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  KLANNEAL_VEC_AVX2 R div(R a, R b) { return _mm256_div_pd(a, b); }
  KLANNEAL_VEC_AVX2 R max(R a, R b) { return _mm256_max_pd(a, b); }
  KLANNEAL_VEC_AVX2 R abs(R a) { return _mm256_andnot_pd(_mm256_set1_pd(-0.0), a); }
  KLANNEAL_VEC_AVX2 C eq(R a, R b) { return _mm256_cmp_pd(a, b, _CMP_EQ_OQ); }
  KLANNEAL_VEC_AVX2 C lt(R a, R b) { return _mm256_cmp_pd(a, b, _CMP_LT_OQ); }
  KLANNEAL_VEC_AVX2 C le(R a, R b) { return _mm256_cmp_pd(a, b, _CMP_LE_OQ); }
  KLANNEAL_VEC_AVX2 C gt(R a, R b) { return _mm256_cmp_pd(a, b, _CMP_GT_OQ); }
  KLANNEAL_VEC_AVX2 C ge(R a, R b) { return _mm256_cmp_pd(a, b, _CMP_GE_OQ); }
  KLANNEAL_VEC_AVX2 C both(C a, C b) { return _mm256_and_pd(a, b); }
  KLANNEAL_VEC_AVX2 R select(C c, R a, R b) { return _mm256_blendv_pd(b, a, c); }
  KLANNEAL_VEC_AVX2 R exp(R a) { return exp_avx2(a); }
  KLANNEAL_VEC_AVX2 R exp_nonpos(R a) { return exp_avx2(a); }
  KLANNEAL_VEC_AVX2 R log(R a) { return log_avx2(a); }
  KLANNEAL_VEC_AVX2 R floor(R a) {
    return _mm256_round_pd(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  }
};

template <> struct Vec<Avx512, float> {
  using T = float;
  using R = __m512;
  using C = __mmask16;
  static constexpr int kLanes = 16;
  KLANNEAL_VEC_AVX512 R set1(T v) { return _mm512_set1_ps(v); }
  KLANNEAL_VEC_AVX512 R zero() { return _mm512_setzero_ps(); }
  KLANNEAL_VEC_AVX512 R loadu(const T *p) { return _mm512_loadu_ps(p); }
  KLANNEAL_VEC_AVX512 void storeu(T *p, R v) { _mm512_storeu_ps(p, v); }
  KLANNEAL_VEC_AVX512 __mmask16 tail(int64_t left) {
    return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
  }
  KLANNEAL_VEC_AVX512 R load_tail(const T *p, int64_t left, R fill) {
    return _mm512_mask_loadu_ps(fill, tail(left), p);
  }
  KLANNEAL_VEC_AVX512 void store_tail(T *p, int64_t left, R v) {
    _mm512_mask_storeu_ps(p, tail(left), v);
  }
  KLANNEAL_VEC_AVX512 R keep_head(R v, int64_t left) { return _mm512_maskz_mov_ps(tail(left), v); }
  KLANNEAL_VEC_AVX512 R add(R a, R b) { return _mm512_add_ps(a, b); }
  KLANNEAL_VEC_AVX512 R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  KLANNEAL_VEC_AVX512 R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  KLANNEAL_VEC_AVX512 R div(R a, R b) { return _mm512_div_ps(a, b); }
  KLANNEAL_VEC_AVX512 R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  KLANNEAL_VEC_AVX512 R fma_exact(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  KLANNEAL_VEC_AVX512 R max(R a, R b) { return _mm512_max_ps(a, b); }
  KLANNEAL_VEC_AVX512 R abs(R a) { return _mm512_abs_ps(a); }
  KLANNEAL_VEC_AVX512 C eq(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  KLANNEAL_VEC_AVX512 C lt(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  KLANNEAL_VEC_AVX512 C gt(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  KLANNEAL_VEC_AVX512 C le(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
  KLANNEAL_VEC_AVX512 C ge(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  KLANNEAL_VEC_AVX512 C both(C a, C b) { return static_cast<C>(a & b); }
  KLANNEAL_VEC_AVX512 bool all(C c) { return c == static_cast<C>(0xFFFF); }
  KLANNEAL_VEC_AVX512 R select(C c, R a, R b) { return _mm512_mask_blend_ps(c, b, a); }
  KLANNEAL_VEC_AVX512 R exp(R a) { return exp_avx512(a); }
  KLANNEAL_VEC_AVX512 R exp_nonpos(R a) { return exp_nonpos_avx512(a); }
  KLANNEAL_VEC_AVX512 R log1p_unit(R a) { return log1p_unit_avx512(a); }
  KLANNEAL_VEC_AVX512 R log(R a) { return log_avx512(a); }
  KLANNEAL_VEC_AVX512 R floor(R a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  }
  KLANNEAL_VEC_AVX512 void add_widened(__m512d *lo, __m512d *hi, R v) {
    *lo = _mm512_add_pd(*lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    *hi = _mm512_add_pd(*hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)));
  }
  KLANNEAL_VEC_AVX512 __m512d zero_wide() { return _mm512_setzero_pd(); }
  KLANNEAL_VEC_AVX512 void store_wide(double *p, __m512d v) { _mm512_storeu_pd(p, v); }
  using Wide = __m512d;
};

template <> struct Vec<Avx512, double> {
  using T = double;
  using R = __m512d;
  using C = __mmask8;
  static constexpr int kLanes = 8;
  KLANNEAL_VEC_AVX512 R set1(T v) { return _mm512_set1_pd(v); }
  KLANNEAL_VEC_AVX512 R zero() { return _mm512_setzero_pd(); }
  KLANNEAL_VEC_AVX512 R loadu(const T *p) { return _mm512_loadu_pd(p); }
  KLANNEAL_VEC_AVX512 void storeu(T *p, R v) { _mm512_storeu_pd(p, v); }
  KLANNEAL_VEC_AVX512 __mmask8 tail(int64_t left) {
    return left >= 8 ? static_cast<__mmask8>(0xFF) : static_cast<__mmask8>((1u << left) - 1u);
  }
  KLANNEAL_VEC_AVX512 R load_tail(const T *p, int64_t left, R fill) {
    return _mm512_mask_loadu_pd(fill, tail(left), p);
  }
  KLANNEAL_VEC_AVX512 void store_tail(T *p, int64_t left, R v) {
    _mm512_mask_storeu_pd(p, tail(left), v);
  }
  KLANNEAL_VEC_AVX512 R add(R a, R b) { return _mm512_add_pd(a, b); }
  KLANNEAL_VEC_AVX512 R sub(R a, R b) { return _mm512_sub_pd(a, b); }
  KLANNEAL_VEC_AVX512 R mul(R a, R b) { return _mm512_mul_pd(a, b); }
  KLANNEAL_VEC_AVX512 R fmadd(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  KLANNEAL_VEC_AVX512 R fma_exact(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  KLANNEAL_VEC_AVX512 R div(R a, R b) { return _mm512_div_pd(a, b); }
  KLANNEAL_VEC_AVX512 R max(R a, R b) { return _mm512_max_pd(a, b); }
  KLANNEAL_VEC_AVX512 R abs(R a) { return _mm512_abs_pd(a); }
  KLANNEAL_VEC_AVX512 C eq(R a, R b) { return _mm512_cmp_pd_mask(a, b, _CMP_EQ_OQ); }
  KLANNEAL_VEC_AVX512 C lt(R a, R b) { return _mm512_cmp_pd_mask(a, b, _CMP_LT_OQ); }
  KLANNEAL_VEC_AVX512 C le(R a, R b) { return _mm512_cmp_pd_mask(a, b, _CMP_LE_OQ); }
  KLANNEAL_VEC_AVX512 C gt(R a, R b) { return _mm512_cmp_pd_mask(a, b, _CMP_GT_OQ); }
  KLANNEAL_VEC_AVX512 C ge(R a, R b) { return _mm512_cmp_pd_mask(a, b, _CMP_GE_OQ); }
  KLANNEAL_VEC_AVX512 C both(C a, C b) { return static_cast<C>(a & b); }
  KLANNEAL_VEC_AVX512 R select(C c, R a, R b) { return _mm512_mask_blend_pd(c, b, a); }
  KLANNEAL_VEC_AVX512 R exp(R a) { return exp_avx512(a); }
  KLANNEAL_VEC_AVX512 R exp_nonpos(R a) { return exp_avx512(a); }
  KLANNEAL_VEC_AVX512 R log(R a) { return log_avx512(a); }
  KLANNEAL_VEC_AVX512 R floor(R a) {
    return _mm512_roundscale_pd(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  }
};

#undef KLANNEAL_VEC_AVX2
#undef KLANNEAL_VEC_AVX512

} // namespace simd
} // namespace klanneal

#endif // KLANNEAL_X86_SIMD
