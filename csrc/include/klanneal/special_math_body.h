// Special functions of the count likelihoods (count_likelihoods_body.h),
// written once against an "ops" traits O: O = ScalarOps<T> (special_math.h:
// plain float/double, the scalar CPU path and CUDA) or O = simd::Vec<Isa, T>
// (simd_vec_cpu.h: AVX2 / AVX-512). O supplies R (a value or a register of
// lanes), C (a lane mask), T (the element type) and set1, add, sub, mul,
// div, fmadd, fma_exact, max, abs, floor, log, exp, lt, le, gt, ge, eq,
// both, select.
// Every branch is a select: all branches are computed for every lane and
// the unused ones discarded, so a lane of an unused branch may hold an inf
// or a NaN (never a trap: floating-point exceptions are masked).
//
// No #include (the includer provides <cmath>, for NAN and INFINITY, and
// common.h's KLANNEAL_HD) and no include guard: this file is included inside a
// namespace once per instantiation set -- by special_math.h inside
// namespace klanneal (the scalar functions), and by a SIMD translation unit
// inside one namespace per ISA with that ISA's target pragma in force (as
// elbo_simd_body.h is), so that every function here is compiled for the ISA
// whose intrinsics it inlines. Its own names live in namespace special_math.
//
// Accuracy: max error in ulps of the result, measured against mpmath at
// each input by tests/test_special_math.py (which asserts <= 6) and over
// 100k more points (random in [0.5, 12] and log-uniform in [1e-6, 1.02e8]:
// theta, x + theta, counts + 1), the same at the scalar, AVX2 and AVX-512
// levels to within 1 ulp; float arithmetic for float, double for double:
//   lgamma  <= 4.7 (fp64) / 4.4 (fp32), largest just above x = 2, where
//           the recurrence's two terms cancel by 2.4x; <= 1.4 below 1e-6
//           and above 1.02e8;
//   digamma <= 4.3 (fp64) / 4.6 (fp32), largest below x = 10 (8 for fp32);
//   log (the vector one; the scalar level calls the C library) <= 0.8,
//   log1p <= 1.4, expm1 <= 1.3, log1pmx <= 3, softplus, log_sigmoid and
//   sigmoid <= 1.7.
// Algorithms (for x > 0; x = 0 gives the poles' infinities, x < 0 NaN):
//   lgamma:  x >= stirling_min: the Stirling series,
//              (x - 1/2)(log x - 1) + (log(2 pi) - 1)/2 + S(x),
//              S(x) = sum_k B_2k / (2k (2k - 1) x^(2k - 1));
//            below: reduced to a = x - floor(x) in [0, 1) by the recurrence
//              lgamma(x) = lgamma(1 + a) + log((x - 1)(x - 2)...(x - m + 1)),
//              (x < 1: lgamma(x) = lgamma(1 + x) - log x), and
//              lgamma(1 + a) = a (a - 1) P(a) with P a polynomial: the
//              zeros at 1 and 2 are factored out, so the result keeps its
//              relative accuracy next to them (the recurrence's log term
//              and a (a - 1) P(a) cancel at most by a factor 2.4 there).
//   digamma: x >= stirling_min: log x - 1/(2x) - T(x), T(x) = sum_k B_2k / (2k x^2k);
//            below: psi(x) = psi(1 + a) + sum_j 1/(x - j) (x < 1: - 1/x),
//              psi(1 + a) = (a - r) Q(a), r = 0.4616... (the root minus 1,
//              in two parts), the sum formed as one fraction (one division).
//   stirling_min is 10 for double (7 terms of each series: truncation
//   < 5e-17) and 8 for float (3 terms: < 3e-10).
// Coefficients: tests/gen_special_math_coeffs.py (mpmath Chebyshev fits).
namespace special_math {

// ---- polynomials -----------------------------------------------------------
// c0 + x (c1 + x (c2 + ...)), by fused multiply-adds (O::fmadd: a true FMA
// on the SIMD paths, a * b + c in scalar code).
template <class O> KLANNEAL_HD typename O::R horner(typename O::R, double c0) {
  return O::set1(static_cast<typename O::T>(c0));
}
template <class O, class... Cs>
KLANNEAL_HD typename O::R horner(typename O::R x, double c0, Cs... cs) {
  return O::fmadd(horner<O>(x, cs...), x, O::set1(static_cast<typename O::T>(c0)));
}

template <class O> KLANNEAL_HD typename O::R constant(double v) {
  return O::set1(static_cast<typename O::T>(v));
}

template <class O> constexpr bool is_float() { return sizeof(typename O::T) == 4; }

// Below this the series are not used (see the header comment).
template <class O> KLANNEAL_HD typename O::R stirling_min() {
  return constant<O>(is_float<O>() ? 8.0 : 10.0);
}

// ---- elementary helpers ------------------------------------------------------
// log(1 + u) from y = fl(1 + u) and its rounding error c = u - (y - 1)
// (y - 1 is exact for y in [1/2, 2]; beyond, c is below an ulp of y and its
// own error negligible): log(1 + u) = log(y) + log1p(c / y) ~ log(y) + c / y,
// within an ulp of log's error. y = 0 (u = -1) gives -inf, u < -1 NaN; no
// correction for y >= 2^53 (or +inf), where it is below an ulp.
template <class O> KLANNEAL_HD typename O::R log1p(typename O::R u) {
  const typename O::R one = constant<O>(1.0);
  const typename O::R y = O::add(one, u);
  const typename O::R c = O::sub(u, O::sub(y, one));
  const typename O::C corrected = O::both(O::gt(y, O::set1(0)), O::lt(y, constant<O>(0x1p53)));
  return O::add(O::log(y), O::select(corrected, O::div(c, y), O::set1(0)));
}

// exp(v) - 1: v + v^2 E(v) (a fitted polynomial) for |v| < 0.35, where
// exp(v) - 1 would cancel; exp(v) - 1 elsewhere (cancels by at most 3.4x).
template <class O> KLANNEAL_HD typename O::R expm1(typename O::R v) {
  typename O::R tail;
  if constexpr (is_float<O>())
    tail = horner<O>(v, 5.e-01f, 1.6666667e-01f, 4.1666456e-02f, 8.3333105e-03f, 1.3934532e-03f,
                     1.989197e-04f);
  else
    tail = horner<O>(v, 0.5, 0.1666666666666667, 0.04166666666666667, 0.008333333333325551,
                     0.0013888888888883332, 0.00019841269876840357, 2.480158732699005e-05,
                     2.755725286336732e-06, 2.755727183153613e-07, 2.5106262550879078e-08,
                     2.0915433598076003e-09);
  const typename O::R small = O::fmadd(O::mul(v, v), tail, v);
  return O::select(O::lt(O::abs(v), constant<O>(0.35)), small, O::sub(O::exp(v), constant<O>(1.0)));
}

// log(1 + u) - u, given u and rho = 1 + u each to full relative precision
// (callers form rho as a ratio, not by adding 1, so that rho -> 0 keeps its
// digits: u = -1 + 1e-10 is -1 in fp32, rho is not). For |s| <= 1/3,
// s = u / (2 + u) (u in [-1/2, 1]): log(1 + u) = 2 atanh(s) and 2s = u - s u,
// so log(1 + u) - u = -s u + 2 s^3 F(s^2), F(w) = (atanh(s) - s) / s^3
// = 1/3 + w/5 + ... fitted; the two terms have the same sign: no
// cancellation. Elsewhere log(rho) - u, which cancels by at most 3.6x. The
// result is <= 0 (0 at u = 0); rho = 0 gives -inf.
template <class O> KLANNEAL_HD typename O::R log1pmx(typename O::R u, typename O::R rho) {
  const typename O::R s = O::div(u, O::add(constant<O>(2.0), u));
  const typename O::R w = O::mul(s, s);
  typename O::R f;
  if constexpr (is_float<O>())
    f = horner<O>(w, 3.3333334e-01f, 1.9999853e-01f, 1.4296179e-01f, 1.08532876e-01f,
                  1.1612165e-01f);
  else
    f = horner<O>(w, 0.3333333333333333, 0.20000000000007292, 0.1428571428355438,
                  0.11111111358713932, 0.09090894718066429, 0.07692785032479312,
                  0.06657072104827468, 0.06000536404795356, 0.04400369243072337,
                  0.08082022805971766);
  const typename O::R series =
      O::sub(O::mul(O::mul(constant<O>(2.0), O::mul(s, w)), f), O::mul(s, u));
  return O::select(O::le(O::abs(s), constant<O>(1.0 / 3.0)), series, O::sub(O::log(rho), u));
}

// ---- sigmoid and softplus ------------------------------------------------------
// softplus(+-z) = max(+-z, 0) + log1p(exp(-|z|)) and sigmoid(+-z), from one
// exp: each is accurate for every z (softplus(-80) = 1.8e-35 is not
// rounded to 0 by a subtraction; sigmoid(-z) is formed directly, not as
// 1 - sigmoid(z)). +-inf give the limits, NaN NaN.
template <class O> struct SoftplusPair {
  typename O::R softplus_pos; // softplus(z) = -log(1 - sigmoid(z)) = -log_sigmoid(-z)
  typename O::R softplus_neg; // softplus(-z) = -log_sigmoid(z)
  typename O::R sigmoid_pos;  // sigmoid(z)
  typename O::R sigmoid_neg;  // sigmoid(-z)
};

template <class O> KLANNEAL_HD SoftplusPair<O> softplus_pair(typename O::R z) {
  const typename O::R zero = O::set1(0);
  const typename O::R e = O::exp(O::sub(zero, O::abs(z)));
  const typename O::R l = log1p<O>(e);
  const typename O::R inv = O::div(constant<O>(1.0), O::add(constant<O>(1.0), e));
  const typename O::C nonneg = O::ge(z, zero);
  // max(z, 0) + l: O::max returns its second operand for a NaN z, so the
  // NaN comes through l.
  return {O::add(O::max(z, zero), l), O::add(O::max(O::sub(zero, z), zero), l),
          O::select(nonneg, inv, O::mul(e, inv)), O::select(nonneg, O::mul(e, inv), inv)};
}

// log(exp(a) + exp(b)) = max + log1p(exp(-|a - b|)); equal arguments
// (including equal infinities) give max + log 2, not inf - inf.
template <class O> KLANNEAL_HD typename O::R log_add_exp(typename O::R a, typename O::R b) {
  const typename O::R gap = O::select(O::eq(a, b), O::set1(0), O::abs(O::sub(a, b)));
  const typename O::R hi = O::select(O::gt(b, a), b, a);
  return O::add(hi, log1p<O>(O::exp(O::sub(O::set1(0), gap))));
}

// ---- Stirling series -------------------------------------------------------------
// S(z) = lgamma(z) - [(z - 1/2) log z - z + log(2 pi)/2] for z >= stirling_min.
template <class O> KLANNEAL_HD typename O::R lgamma_stirling_tail(typename O::R z) {
  const typename O::R r = O::div(constant<O>(1.0), z);
  const typename O::R r2 = O::mul(r, r);
  typename O::R p;
  if constexpr (is_float<O>())
    p = horner<O>(r2, 1.0 / 12, -1.0 / 360, 1.0 / 1260);
  else
    p = horner<O>(r2, 1.0 / 12, -1.0 / 360, 1.0 / 1260, -1.0 / 1680, 1.0 / 1188, -691.0 / 360360,
                  1.0 / 156);
  return O::mul(r, p);
}

// T(z) = log z - 1/(2z) - digamma(z) for z >= stirling_min.
template <class O> KLANNEAL_HD typename O::R digamma_stirling_tail(typename O::R z) {
  const typename O::R r = O::div(constant<O>(1.0), z);
  const typename O::R r2 = O::mul(r, r);
  typename O::R p;
  if constexpr (is_float<O>())
    p = horner<O>(r2, 1.0 / 12, -1.0 / 120, 1.0 / 252);
  else
    p = horner<O>(r2, 1.0 / 12, -1.0 / 120, 1.0 / 252, -1.0 / 240, 1.0 / 132, -691.0 / 32760,
                  1.0 / 12);
  return O::mul(r2, p);
}

// (z - 1/2) log z - z + log(2 pi)/2, from log z.
template <class O>
KLANNEAL_HD typename O::R lgamma_stirling_main(typename O::R z, typename O::R log_z) {
  return O::fmadd(O::sub(z, constant<O>(0.5)), O::sub(log_z, constant<O>(1.0)),
                  constant<O>(0.41893853320467274178)); // (log(2 pi) - 1) / 2
}

// ---- lgamma ---------------------------------------------------------------------
// The pieces of lgamma(x) below stirling_min: lgamma(1 + a) = a (a - 1) P(a)
// with a = x - floor(x), and the recurrence's product p (x < 1: x, whose log
// is subtracted; [1, 2): 1; above: (x - 1)...(x - floor(x) + 1)). Every
// factor x - j is exact.
template <class O> struct LgammaReduced {
  typename O::R core;    // lgamma(1 + a)
  typename O::R product; // p: lgamma(x) = core + sign * log(p)
  typename O::C below_one;
};

template <class O> KLANNEAL_HD LgammaReduced<O> lgamma_reduce(typename O::R x) {
  const typename O::R one = constant<O>(1.0);
  const typename O::R a = O::sub(x, O::floor(x));
  const typename O::R t = O::sub(a, constant<O>(0.5));
  typename O::R p;
  if constexpr (is_float<O>())
    p = horner<O>(t, 4.8312896e-01f, -1.459599e-01f, 6.2911406e-02f, -3.1308006e-02f, 1.67968e-02f,
                  -9.436288e-03f, 5.4530804e-03f, -3.116982e-03f, 1.863885e-03f, -1.5244859e-03f,
                  9.3493314e-04f);
  else
    p = horner<O>(t, 0.4831289505409809, -0.14595989591430594, 0.06291140107456485,
                  -0.03130848750105327, 0.01679709863121395, -0.009425622444829649,
                  0.005446457842219553, -0.0032120742206072908, 0.0019229162321227923,
                  -0.001164411377219605, 0.0007115202752051298, -0.00043803516132580534,
                  0.00027130273545114005, -0.0001685717945035172, 0.00010541715222185904,
                  -6.793733027397047e-05, 4.281642862794779e-05, -2.148770252062576e-05,
                  1.3584275459130943e-05, -1.8527803997032962e-05, 1.1820969445467145e-05);
  const typename O::C below_one = O::lt(x, one);
  typename O::R product = O::select(below_one, x, one);
  const int top = is_float<O>() ? 8 : 10; // stirling_min
  for (int j = 1; j <= top - 2; ++j)
    product =
        O::mul(product, O::select(O::ge(x, constant<O>(j + 1)), O::sub(x, constant<O>(j)), one));
  return {O::mul(O::mul(a, O::sub(a, one)), p), product, below_one};
}

// lgamma(x) for x > 0 (x = 0: +inf; x < 0: NaN; +inf: +inf).
template <class O> KLANNEAL_HD typename O::R lgamma(typename O::R x) {
  const LgammaReduced<O> red = lgamma_reduce<O>(x);
  const typename O::C large = O::ge(x, stirling_min<O>());
  const typename O::R log_arg = O::log(O::select(large, x, red.product)); // one log for both
  const typename O::R small =
      O::select(red.below_one, O::sub(red.core, log_arg), O::add(red.core, log_arg));
  const typename O::R stirling =
      O::add(lgamma_stirling_main<O>(x, log_arg), lgamma_stirling_tail<O>(x));
  const typename O::R r = O::select(large, stirling, small);
  return O::select(O::lt(x, O::set1(0)), constant<O>(NAN), r);
}

// delta(z) = lgamma(z) - [(z - 1/2) log z - z + log(2 pi)/2] for z > 0: the
// Stirling remainder, > 0 and decreasing, ~ 1/(12 z) for large z and
// ~ -log(z)/2 - 0.92 as z -> 0. The count likelihoods are written with it
// (Loader's saddle-point form) so that no lgamma of a large argument is
// ever subtracted from another. Its absolute error is ~ eps * max(1, |log z|).
template <class O> KLANNEAL_HD typename O::R stirling_delta(typename O::R z) {
  const LgammaReduced<O> red = lgamma_reduce<O>(z);
  const typename O::R log_p = O::log(red.product);
  const typename O::R small_lgamma =
      O::select(red.below_one, O::sub(red.core, log_p), O::add(red.core, log_p));
  const typename O::R small = O::sub(small_lgamma, lgamma_stirling_main<O>(z, O::log(z)));
  return O::select(O::ge(z, stirling_min<O>()), lgamma_stirling_tail<O>(z), small);
}

// ---- digamma ---------------------------------------------------------------------
// digamma(x) for x > 0 (x = 0: -inf; x < 0: NaN; +inf: +inf).
template <class O> KLANNEAL_HD typename O::R digamma(typename O::R x) {
  const typename O::R one = constant<O>(1.0);
  const typename O::R a = O::sub(x, O::floor(x));
  const typename O::R t = O::sub(a, constant<O>(0.5));
  typename O::R q;
  if constexpr (is_float<O>())
    q = horner<O>(t, 9.510559e-01f, -4.236274e-01f, 2.4054265e-01f, -1.4840503e-01f, 9.498082e-02f,
                  -6.191686e-02f, 4.0893562e-02f, -2.7064258e-02f, 1.6915224e-02f, -1.1247037e-02f,
                  1.1223156e-02f, -7.476843e-03f);
  else
    q = horner<O>(
        t, 0.951055876031833, -0.4236274212814605, 0.2405424842407742, -0.14840492305390884,
        0.09498872445494122, -0.061922133273064534, 0.04076083381242074, -0.02697579675613825,
        0.0179072524394512, -0.011908218001568644, 0.007926944646403797, -0.005279964873257405,
        0.003519006401502276, -0.002345267632540769, 0.0015566317474486838, -0.0010376374098418604,
        0.0007233266279287554, -0.0004821990530566789, 0.0002272331660987376,
        -0.00015148586836773365, 0.00025968482126430747, -0.00017312261802727394);
  // a - r with r = 0.46163214496836234126... split so that a - r_hi is exact
  // next to the root (Sterbenz) and r_lo carries the rest.
  typename O::R a_minus_r;
  if constexpr (is_float<O>())
    a_minus_r = O::sub(O::sub(a, O::set1(4.6163213e-01f)), constant<O>(1.2438149938918909e-08));
  else
    a_minus_r =
        O::sub(O::sub(a, O::set1(0.46163214496836236)), constant<O>(-1.5522348162858677e-17));
  const typename O::R core = O::mul(a_minus_r, q);
  // sum_j 1/(x - j) as num / den, one division: x < 1 starts at -1/x.
  const typename O::C below_one = O::lt(x, one);
  typename O::R num = O::select(below_one, constant<O>(-1.0), O::set1(0));
  typename O::R den = O::select(below_one, x, one);
  const int top = is_float<O>() ? 8 : 10; // stirling_min
  for (int j = 1; j <= top - 2; ++j) {
    const typename O::C in = O::ge(x, constant<O>(j + 1));
    const typename O::R d = O::sub(x, constant<O>(j));
    num = O::select(in, O::fmadd(num, d, den), num);
    den = O::select(in, O::mul(den, d), den);
  }
  const typename O::R small = O::add(core, O::div(num, den));
  const typename O::R large =
      O::sub(O::sub(O::log(x), O::div(constant<O>(0.5), x)), digamma_stirling_tail<O>(x));
  const typename O::R r = O::select(O::ge(x, stirling_min<O>()), large, small);
  return O::select(O::lt(x, O::set1(0)), constant<O>(NAN), r);
}

} // namespace special_math
