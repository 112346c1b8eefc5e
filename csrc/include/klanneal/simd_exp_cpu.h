// Vectorised exp(x) for fp32 on x86-64, AVX2+FMA and AVX-512 (fp64's exp,
// log1p on [0, 1] and log for both follow below), without
// -ffast-math: each function is compiled for its ISA with a target
// attribute and the caller picks one at run time (cpu_features.h).
//
// Method (Cephes expf): x = n*ln2 + r with n = round(x*log2(e)), |r| <= ln2/2,
// ln2 split in a high part exact in fp32 and a low part; exp(r) by a degree-5
// polynomial (max error ~1 ulp); then the result is scaled by 2^n.
// Special values: x is first clamped to [-104, 89] (the operand order of
// min/max keeps NaN), so -inf -> 0 (underflow), +inf and x > 88.73 -> +inf
// (overflow), results in the subnormal range are rounded once, NaN -> NaN.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KLANNEAL_X86_SIMD 1
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#define KLANNEAL_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define KLANNEAL_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

namespace klanneal {
namespace simd {

constexpr float kExpHi = 89.0f;   // exp(89) > FLT_MAX: overflows to +inf
constexpr float kExpLo = -104.0f; // exp(-104) < half the smallest subnormal: 0
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f; // 8 significant bits: n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500e-4f;
constexpr float kExpP1 = 1.3981999507e-3f;
constexpr float kExpP2 = 8.3334519073e-3f;
constexpr float kExpP3 = 4.1665795894e-2f;
constexpr float kExpP4 = 1.6666665459e-1f;
constexpr float kExpP5 = 5.0000001201e-1f;

// exp(r) for the reduced argument r = x - n ln2 (n * ln2 subtracted in two
// steps): the Cephes polynomial, 1 + r + r^2 P(r).
KLANNEAL_TARGET_AVX2 inline __m256 exp_poly_avx2(__m256 x, __m256 n) {
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP5));
  return _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
}

KLANNEAL_TARGET_AVX2 inline __m256 exp_avx2(__m256 x) {
  // _mm256_min_ps/_max_ps return the second operand when either is NaN.
  x = _mm256_min_ps(_mm256_set1_ps(kExpHi), x);
  x = _mm256_max_ps(_mm256_set1_ps(kExpLo), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 p = exp_poly_avx2(x, n);
  // n in [-150, 129] does not fit one fp32 exponent: scale by 2^n1 * 2^n2,
  // n1 = n >> 1, both factors normal. p * 2^n1 is exact; the second product
  // rounds once, to a subnormal, a normal or +inf.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

// exp(x) for x <= 0 or NaN (the categorical row's x - max, bernoulli's
// -|x|), bitwise equal to exp_avx2 there, in fewer operations: no upper
// clamp; n = round(x * log2(e)) by adding 1.5 * 2^23 (exact for |n| < 2^22,
// rounding to nearest even as _mm256_round_ps), which leaves n + kBias in
// the low mantissa bits, so 2^(n + 65) is those bits shifted into the
// exponent; n in [-150, 0] makes 2^(n + 65) normal, p * 2^(n + 65) exact
// and the product with 2^-65 the one rounding (to a subnormal or 0 below
// 2^-126, as exp_avx2's two products). The bias is even, so that ties round
// to an even n, as _mm256_round_ps does.
constexpr float kRoundMagic = 12582912.0f; // 1.5 * 2^23
constexpr int kNonposBias = 127 + 65;

KLANNEAL_TARGET_AVX2 inline __m256 exp_nonpos_avx2(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(kExpLo), x); // NaN kept (second operand)
  const __m256 t = _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                 _mm256_set1_ps(kRoundMagic + kNonposBias));
  const __m256 n = _mm256_sub_ps(t, _mm256_set1_ps(kRoundMagic + kNonposBias));
  const __m256 p = exp_poly_avx2(x, n);
  const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s), _mm256_set1_ps(0x1p-65f));
}

// exp(x) for x below the upper clamp (or NaN): the lower clamp, the
// reduction and the polynomial; scalef computes p * 2^n with a single
// rounding (subnormals, overflow).
KLANNEAL_TARGET_AVX512 inline __m512 exp_below_hi_avx512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(kExpLo), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP5));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

KLANNEAL_TARGET_AVX512 inline __m512 exp_avx512(__m512 x) {
  return exp_below_hi_avx512(_mm512_min_ps(_mm512_set1_ps(kExpHi), x));
}

// exp(x) for x <= 0 or NaN: without the upper clamp.
KLANNEAL_TARGET_AVX512 inline __m512 exp_nonpos_avx512(__m512 x) { return exp_below_hi_avx512(x); }

// log1p(e) for e in [0, 1] (the bernoulli term log1p(exp(-|x|))):
// log1p(e) = 2 atanh(s), s = e / (2 + e) in [0, 1/3], by its odd series up to
// s^13 (truncation error < 2e-8 relative, so small e keep full relative
// precision). NaN -> NaN.
constexpr float kAtanhC[6] = {1.0f / 3, 1.0f / 5, 1.0f / 7, 1.0f / 9, 1.0f / 11, 1.0f / 13};

KLANNEAL_TARGET_AVX2 inline __m256 log1p_unit_avx2(__m256 e) {
  const __m256 s = _mm256_div_ps(e, _mm256_add_ps(_mm256_set1_ps(2.0f), e));
  const __m256 s2 = _mm256_mul_ps(s, s);
  __m256 p = _mm256_set1_ps(kAtanhC[5]);
  for (int k = 4; k >= 0; --k)
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(kAtanhC[k]));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f));
  return _mm256_mul_ps(_mm256_add_ps(s, s), p);
}

KLANNEAL_TARGET_AVX512 inline __m512 log1p_unit_avx512(__m512 e) {
  const __m512 s = _mm512_div_ps(e, _mm512_add_ps(_mm512_set1_ps(2.0f), e));
  const __m512 s2 = _mm512_mul_ps(s, s);
  __m512 p = _mm512_set1_ps(kAtanhC[5]);
  for (int k = 4; k >= 0; --k)
    p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(kAtanhC[k]));
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f));
  return _mm512_mul_ps(_mm512_add_ps(s, s), p);
}

// exp(x) for fp64: the same reduction with n*ln2 subtracted in two FMAs
// (ln2 = kLn2HiD + kLn2LoD to ~2^-106), exp(r) by its Taylor series to r^13
// (truncation < 5e-18 relative for |r| <= ln2/2), then scaled by 2^n. x is
// clamped to [-746, 710]: -inf -> 0, +inf and x > 709.79 -> +inf, NaN -> NaN.
constexpr double kExpHiD = 710.0;
constexpr double kExpLoD = -746.0;
constexpr double kLog2eD = 1.4426950408889634074;
constexpr double kLn2HiD = 0x1.62e42fefa39efp-1;
constexpr double kLn2LoD = 0x1.abc9e3b39803fp-56;
constexpr double kInvFact[14] = {1.0,
                                 1.0,
                                 1.0 / 2,
                                 1.0 / 6,
                                 1.0 / 24,
                                 1.0 / 120,
                                 1.0 / 720,
                                 1.0 / 5040,
                                 1.0 / 40320,
                                 1.0 / 362880,
                                 1.0 / 3628800,
                                 1.0 / 39916800,
                                 1.0 / 479001600,
                                 1.0 / 6227020800.0};

// 2^k for integer-valued k in [-1022, 1023].
KLANNEAL_TARGET_AVX2 inline __m256d pow2_avx2(__m256d k) {
  const __m256d magic = _mm256_set1_pd(0x1.8p52);
  const __m256i ki =
      _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(k, magic)), _mm256_castpd_si256(magic));
  return _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_add_epi64(ki, _mm256_set1_epi64x(1023)), 52));
}

KLANNEAL_TARGET_AVX2 inline __m256d exp_avx2(__m256d x) {
  x = _mm256_min_pd(_mm256_set1_pd(kExpHiD), x); // NaN kept (second operand)
  x = _mm256_max_pd(_mm256_set1_pd(kExpLoD), x);
  const __m256d n = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(kLog2eD)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(kLn2HiD), x);
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(kLn2LoD), r);
  __m256d p = _mm256_set1_pd(kInvFact[13]);
  for (int k = 12; k >= 0; --k)
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(kInvFact[k]));
  // 2^n as 2^n1 * 2^n2 (n in [-1077, 1025] does not fit one exponent). The
  // integer-valued doubles become int64 by the 1.5 * 2^52 trick (AVX2 has no
  // cvtpd_epi64).
  const __m256d n1 = _mm256_round_pd(_mm256_mul_pd(n, _mm256_set1_pd(0.5)),
                                     _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m256d n2 = _mm256_sub_pd(n, n1);
  return _mm256_mul_pd(_mm256_mul_pd(p, pow2_avx2(n1)), pow2_avx2(n2));
}

KLANNEAL_TARGET_AVX512 inline __m512d exp_avx512(__m512d x) {
  x = _mm512_min_pd(_mm512_set1_pd(kExpHiD), x);
  x = _mm512_max_pd(_mm512_set1_pd(kExpLoD), x);
  const __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(kLog2eD)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(kLn2HiD), x);
  r = _mm512_fnmadd_pd(n, _mm512_set1_pd(kLn2LoD), r);
  __m512d p = _mm512_set1_pd(kInvFact[13]);
  for (int k = 12; k >= 0; --k)
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(kInvFact[k]));
  return _mm512_scalef_pd(p, n);
}

// log(x) for fp32 and fp64 (fdlibm's method, as the count likelihoods'
// special functions need it): x = 2^k (1 + f) with 1 + f in
// [sqrt(2)/2, sqrt(2)), split by integer operations on the bits
// (subnormals scaled into the normal range first); with s = f / (2 + f),
// log(1 + f) = f - (hfsq - s (hfsq + R)), hfsq = f^2 / 2,
// R = 2 s^2 F(s^2), F(w) = (atanh(s) - s) / s^3 fitted on |s| <= 0.1716
// (tests/gen_special_math_coeffs.py); k ln2 is added in two parts (ln2_hi
// has trailing zero bits). f is exact and dominates, the rest is a small
// correction: max error about 1 ulp. 0 -> -inf, +inf -> +inf, x < 0 and
// NaN -> NaN.
constexpr float kLogLn2Hi = 6.9313812256e-01f;            // 0x3f317180
constexpr float kLogLn2Lo = 9.0580006145e-06f;            // 0x3717f7d1
constexpr double kLogLn2HiD = 6.93147180369123816490e-01; // 0x3fe62e42fee00000
constexpr double kLogLn2LoD = 1.90821492927058770002e-10; // 0x3dea39ef35793c76
constexpr float kLogF[4] = {3.3333334e-01f, 2.0000061e-01f, 1.4275366e-01f, 1.16664566e-01f};
constexpr double kLogFD[7] = {0.3333333333333335,  0.19999999999949095, 0.14285714313285103,
                              0.11111105518908294, 0.09091448091741543, 0.07665743617932867,
                              0.07309671726756307};
// x's bits + kLogShift: the exponent field counts from sqrt(2)/2, not 1.
constexpr int32_t kLogShift = 0x3f800000 - 0x3f3504f3;
constexpr int64_t kLogShiftD = static_cast<int64_t>(0x3ff00000 - 0x3fe6a09e) << 32;

KLANNEAL_TARGET_AVX2 inline __m256 log_avx2(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(0x1p-126f), _CMP_LT_OQ);
  const __m256 xs = _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(0x1p25f)), tiny);
  __m256i ix = _mm256_add_epi32(_mm256_castps_si256(xs), _mm256_set1_epi32(kLogShift));
  const __m256i ki = _mm256_sub_epi32(_mm256_srli_epi32(ix, 23), _mm256_set1_epi32(0x7f));
  ix = _mm256_add_epi32(_mm256_and_si256(ix, _mm256_set1_epi32(0x007fffff)),
                        _mm256_set1_epi32(0x3f3504f3));
  const __m256 f = _mm256_sub_ps(_mm256_castsi256_ps(ix), _mm256_set1_ps(1.0f));
  const __m256 k =
      _mm256_sub_ps(_mm256_cvtepi32_ps(ki), _mm256_and_ps(tiny, _mm256_set1_ps(25.0f)));
  const __m256 s = _mm256_div_ps(f, _mm256_add_ps(_mm256_set1_ps(2.0f), f));
  const __m256 z = _mm256_mul_ps(s, s);
  __m256 p = _mm256_set1_ps(kLogF[3]);
  for (int j = 2; j >= 0; --j)
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kLogF[j]));
  const __m256 tail = _mm256_mul_ps(_mm256_add_ps(z, z), p);
  const __m256 hfsq = _mm256_mul_ps(_mm256_set1_ps(0.5f), _mm256_mul_ps(f, f));
  const __m256 inner =
      _mm256_fmadd_ps(s, _mm256_add_ps(hfsq, tail), _mm256_mul_ps(k, _mm256_set1_ps(kLogLn2Lo)));
  __m256 r =
      _mm256_fmadd_ps(k, _mm256_set1_ps(kLogLn2Hi), _mm256_sub_ps(f, _mm256_sub_ps(hfsq, inner)));
  const __m256 zero = _mm256_setzero_ps();
  r = _mm256_blendv_ps(r, _mm256_set1_ps(-INFINITY), _mm256_cmp_ps(x, zero, _CMP_EQ_OQ));
  r = _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
  return _mm256_blendv_ps(r, _mm256_set1_ps(NAN), _mm256_cmp_ps(x, zero, _CMP_NGE_UQ));
}

KLANNEAL_TARGET_AVX512 inline __m512 log_avx512(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(0x1p-126f), _CMP_LT_OQ);
  const __m512 xs = _mm512_mask_mul_ps(x, tiny, x, _mm512_set1_ps(0x1p25f));
  __m512i ix = _mm512_add_epi32(_mm512_castps_si512(xs), _mm512_set1_epi32(kLogShift));
  const __m512i ki = _mm512_sub_epi32(_mm512_srli_epi32(ix, 23), _mm512_set1_epi32(0x7f));
  ix = _mm512_add_epi32(_mm512_and_si512(ix, _mm512_set1_epi32(0x007fffff)),
                        _mm512_set1_epi32(0x3f3504f3));
  const __m512 f = _mm512_sub_ps(_mm512_castsi512_ps(ix), _mm512_set1_ps(1.0f));
  const __m512 kr = _mm512_cvtepi32_ps(ki);
  const __m512 k = _mm512_mask_sub_ps(kr, tiny, kr, _mm512_set1_ps(25.0f));
  const __m512 s = _mm512_div_ps(f, _mm512_add_ps(_mm512_set1_ps(2.0f), f));
  const __m512 z = _mm512_mul_ps(s, s);
  __m512 p = _mm512_set1_ps(kLogF[3]);
  for (int j = 2; j >= 0; --j)
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(kLogF[j]));
  const __m512 tail = _mm512_mul_ps(_mm512_add_ps(z, z), p);
  const __m512 hfsq = _mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_mul_ps(f, f));
  const __m512 inner =
      _mm512_fmadd_ps(s, _mm512_add_ps(hfsq, tail), _mm512_mul_ps(k, _mm512_set1_ps(kLogLn2Lo)));
  __m512 r =
      _mm512_fmadd_ps(k, _mm512_set1_ps(kLogLn2Hi), _mm512_sub_ps(f, _mm512_sub_ps(hfsq, inner)));
  const __m512 zero = _mm512_setzero_ps();
  r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, zero, _CMP_EQ_OQ), _mm512_set1_ps(-INFINITY));
  r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ), x);
  return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, zero, _CMP_NGE_UQ), _mm512_set1_ps(NAN));
}

// The double of an int64 lane in (-2^51, 2^51) (AVX2 has no cvtepi64_pd):
// its bits added to those of 1.5 * 2^52, then 1.5 * 2^52 subtracted.
KLANNEAL_TARGET_AVX2 inline __m256d int64_to_double_avx2(__m256i k) {
  const __m256d magic = _mm256_set1_pd(0x1.8p52);
  return _mm256_sub_pd(_mm256_castsi256_pd(_mm256_add_epi64(k, _mm256_castpd_si256(magic))), magic);
}

KLANNEAL_TARGET_AVX2 inline __m256d log_avx2(__m256d x) {
  const __m256d tiny = _mm256_cmp_pd(x, _mm256_set1_pd(0x1p-1022), _CMP_LT_OQ);
  const __m256d xs = _mm256_blendv_pd(x, _mm256_mul_pd(x, _mm256_set1_pd(0x1p54)), tiny);
  __m256i ix = _mm256_add_epi64(_mm256_castpd_si256(xs), _mm256_set1_epi64x(kLogShiftD));
  const __m256i ki = _mm256_sub_epi64(_mm256_srli_epi64(ix, 52), _mm256_set1_epi64x(0x3ff));
  ix = _mm256_add_epi64(_mm256_and_si256(ix, _mm256_set1_epi64x(0x000fffffffffffffLL)),
                        _mm256_set1_epi64x(0x3fe6a09e00000000LL));
  const __m256d f = _mm256_sub_pd(_mm256_castsi256_pd(ix), _mm256_set1_pd(1.0));
  const __m256d k =
      _mm256_sub_pd(int64_to_double_avx2(ki), _mm256_and_pd(tiny, _mm256_set1_pd(54.0)));
  const __m256d s = _mm256_div_pd(f, _mm256_add_pd(_mm256_set1_pd(2.0), f));
  const __m256d z = _mm256_mul_pd(s, s);
  __m256d p = _mm256_set1_pd(kLogFD[6]);
  for (int j = 5; j >= 0; --j)
    p = _mm256_fmadd_pd(p, z, _mm256_set1_pd(kLogFD[j]));
  const __m256d tail = _mm256_mul_pd(_mm256_add_pd(z, z), p);
  const __m256d hfsq = _mm256_mul_pd(_mm256_set1_pd(0.5), _mm256_mul_pd(f, f));
  const __m256d inner =
      _mm256_fmadd_pd(s, _mm256_add_pd(hfsq, tail), _mm256_mul_pd(k, _mm256_set1_pd(kLogLn2LoD)));
  __m256d r =
      _mm256_fmadd_pd(k, _mm256_set1_pd(kLogLn2HiD), _mm256_sub_pd(f, _mm256_sub_pd(hfsq, inner)));
  const __m256d zero = _mm256_setzero_pd();
  r = _mm256_blendv_pd(r, _mm256_set1_pd(-INFINITY), _mm256_cmp_pd(x, zero, _CMP_EQ_OQ));
  r = _mm256_blendv_pd(r, x, _mm256_cmp_pd(x, _mm256_set1_pd(INFINITY), _CMP_EQ_OQ));
  return _mm256_blendv_pd(r, _mm256_set1_pd(NAN), _mm256_cmp_pd(x, zero, _CMP_NGE_UQ));
}

KLANNEAL_TARGET_AVX512 inline __m512d log_avx512(__m512d x) {
  const __mmask8 tiny = _mm512_cmp_pd_mask(x, _mm512_set1_pd(0x1p-1022), _CMP_LT_OQ);
  const __m512d xs = _mm512_mask_mul_pd(x, tiny, x, _mm512_set1_pd(0x1p54));
  __m512i ix = _mm512_add_epi64(_mm512_castpd_si512(xs), _mm512_set1_epi64(kLogShiftD));
  const __m512i ki = _mm512_sub_epi64(_mm512_srli_epi64(ix, 52), _mm512_set1_epi64(0x3ff));
  ix = _mm512_add_epi64(_mm512_and_si512(ix, _mm512_set1_epi64(0x000fffffffffffffLL)),
                        _mm512_set1_epi64(0x3fe6a09e00000000LL));
  const __m512d f = _mm512_sub_pd(_mm512_castsi512_pd(ix), _mm512_set1_pd(1.0));
  const __m512d kr = _mm512_cvtepi64_pd(ki);
  const __m512d k = _mm512_mask_sub_pd(kr, tiny, kr, _mm512_set1_pd(54.0));
  const __m512d s = _mm512_div_pd(f, _mm512_add_pd(_mm512_set1_pd(2.0), f));
  const __m512d z = _mm512_mul_pd(s, s);
  __m512d p = _mm512_set1_pd(kLogFD[6]);
  for (int j = 5; j >= 0; --j)
    p = _mm512_fmadd_pd(p, z, _mm512_set1_pd(kLogFD[j]));
  const __m512d tail = _mm512_mul_pd(_mm512_add_pd(z, z), p);
  const __m512d hfsq = _mm512_mul_pd(_mm512_set1_pd(0.5), _mm512_mul_pd(f, f));
  const __m512d inner =
      _mm512_fmadd_pd(s, _mm512_add_pd(hfsq, tail), _mm512_mul_pd(k, _mm512_set1_pd(kLogLn2LoD)));
  __m512d r =
      _mm512_fmadd_pd(k, _mm512_set1_pd(kLogLn2HiD), _mm512_sub_pd(f, _mm512_sub_pd(hfsq, inner)));
  const __m512d zero = _mm512_setzero_pd();
  r = _mm512_mask_mov_pd(r, _mm512_cmp_pd_mask(x, zero, _CMP_EQ_OQ), _mm512_set1_pd(-INFINITY));
  r = _mm512_mask_mov_pd(r, _mm512_cmp_pd_mask(x, _mm512_set1_pd(INFINITY), _CMP_EQ_OQ), x);
  return _mm512_mask_mov_pd(r, _mm512_cmp_pd_mask(x, zero, _CMP_NGE_UQ), _mm512_set1_pd(NAN));
}

} // namespace simd
} // namespace klanneal

#endif
