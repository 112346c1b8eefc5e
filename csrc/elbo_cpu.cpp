// CPU launcher of the fused ELBO op.
//
// Work is split in units of a fixed size that does not depend on the thread
// count: one logits row for the categorical likelihood, a chunk of kChunk
// elements of an example otherwise. Each unit writes its loss into its own
// slot of a buffer and the slots are summed afterwards, sequentially in
// double precision, so the result is bitwise identical for any n_threads.
//
// Categorical rows: one read of the row for the online max / log-sum-exp
// (blocks of 4 vectors: one rescale of the running sum per block, one exp per
// element), then one pass writing the gradient softmax - onehot. fp32 rows
// use the AVX-512 or AVX2 kernels where the CPU has them (simd_exp_cpu.h),
// else the scalar formulas of elbo_math.h; fp64 rows have the same kernels
// with fp64 lanes; fp16/bf16 rows are widened to an fp32 scratch row and take
// the fp32 path.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "klanneal/buffer_pool.h"
#include "klanneal/cpu_features.h"
#include "klanneal/elbo.h"
#include "klanneal/elbo_math.h"
#include "klanneal/simd_exp_cpu.h"

#if defined(__linux__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace klanneal {
namespace {

constexpr int64_t kChunk = 16384;               // elements per unit, non-categorical
// Elements per thread below which a thread costs more than it saves. A
// categorical element costs ~0.7 ns (fp32, AVX-512), a bernoulli one ~1 ns,
// a gaussian one less; waking a pool worker costs a few microseconds, but a
// worker preempted in the middle of its range (a busy machine, or torch's
// own OpenMP threads still spinning) holds the call up for a time slice. On
// the 2-core development machine the image case (100K bernoulli elements)
// took 1.2 ms with 2 threads against 0.35 ms with one: the cheap pointwise
// likelihoods get a thread per 256K elements (>= ~0.2 ms of work) only.
constexpr int64_t kMinElemsPerThreadCategorical = 1 << 15;
constexpr int64_t kMinElemsPerThreadPointwise = 1 << 18;

// ---- storage types and conversions -----------------------------------------

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t bits_from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE fp16 -> fp32 with subnormals, Inf and NaN
// (the bit-exact method of Maratyszcza's FP16 library).
inline float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = float_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = float_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result =
      sign | (two_w < (1u << 27) ? bits_from_float(denormalized) : bits_from_float(normalized));
  return float_from_bits(result);
}

inline float bfloat16_to_float(uint16_t h) {
  return float_from_bits(static_cast<uint32_t>(h) << 16);
}

// Arithmetic type T of a storage type S (float for fp32/fp16/bf16, double
// for fp64) and the load conversion (gradients are stored as Grad<S>, below).
template <typename S> struct Elem;
template <> struct Elem<float> {
  using T = float;
  static T load(float v) { return v; }
};
template <> struct Elem<double> {
  using T = double;
  static T load(double v) { return v; }
};
template <> struct Elem<Half> {
  using T = float;
  static T load(Half v) { return half_to_float(v.bits); }
};
template <> struct Elem<BFloat16> {
  using T = float;
  static T load(BFloat16 v) { return bfloat16_to_float(v.bits); }
};

// Storage type of the gradients (grad_recon, grad_mu, grad_logvar) of inputs
// stored as S: S itself for fp32/fp64, fp32 for fp16/bf16. A half-precision
// gradient stored before backward applies the upstream gradient would lose
// what a loss scaler exists to keep: values below fp16's 6e-8 flush to 0
// before they are multiplied by 2^16, and values above 65504 overflow to
// inf although the scaled value fits (see docs/elbo.md, mixed precision).
template <typename S> struct GradOf {
  using type = S;
};
template <> struct GradOf<Half> {
  using type = float;
};
template <> struct GradOf<BFloat16> {
  using type = float;
};
template <typename S> using Grad = typename GradOf<S>::type;

// ---- categorical rows -------------------------------------------------------
// Each takes one row x[0, V) with a target 0 <= t < V, returns the row's loss
// logsumexp(x) - x[t] and, if grad is not null, writes
// (softmax(x) - onehot(t)) * scale into grad (which may alias x: x[t] is read
// before the gradient pass).

template <typename T>
double categorical_row_scalar(const T *x, int64_t V, int64_t t, T *grad, T scale) {
  LseState<T> st = lse_init<T>();
  for (int64_t i = 0; i < V; ++i)
    st = lse_push(st, x[i]);
  const T m = st.m, ls = lse_log_sum(st);
  const T x_target = x[t];
  if (grad != nullptr) {
    for (int64_t i = 0; i < V; ++i)
      grad[i] = categorical_grad(x[i], m, ls, false, scale);
    grad[t] = categorical_grad(x_target, m, ls, true, scale);
  }
  return static_cast<double>(categorical_nll(m, ls, x_target));
}

#if defined(KLANNEAL_X86_SIMD)

// Per-lane (max, sum) states merged in lane order with the scalar lse_merge.
template <int kLanes, typename T> LseState<T> merge_lanes(const T *m, const T *s) {
  LseState<T> st{m[0], s[0]};
  for (int l = 1; l < kLanes; ++l)
    st = lse_merge(st, LseState<T>{m[l], s[l]});
  return st;
}

// A group of elements with max m_new is added by rescaling the running sum
// once to the new max, shifting by 0 in lanes still at -inf so that
// exp(-inf - shift) = 0 rather than exp(NaN).
KLANNEAL_TARGET_AVX2 inline __m256 shift_for(__m256 m_new) {
  const __m256 is_neg_inf = _mm256_cmp_ps(m_new, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ);
  return _mm256_blendv_ps(m_new, _mm256_setzero_ps(), is_neg_inf);
}

KLANNEAL_TARGET_AVX2 inline __m256i tail_mask(__m256i lane, int64_t left) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(left, 8))), lane);
}

KLANNEAL_TARGET_AVX512 inline __m512 shift_for(__m512 m_new) {
  const __mmask16 is_neg_inf = _mm512_cmp_ps_mask(m_new, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ);
  return _mm512_mask_blend_ps(is_neg_inf, m_new, _mm512_setzero_ps());
}

inline __mmask16 tail_mask16(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

KLANNEAL_TARGET_AVX2
double categorical_row_avx2(const float *x, int64_t V, int64_t t, float *grad, float scale) {
  const __m256 neg_inf = _mm256_set1_ps(-INFINITY);
  const __m256 zero = _mm256_setzero_ps();
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 vm = neg_inf; // running max per lane; never NaN (it is max's second operand)
  __m256 vs = zero;    // sum of exp(x - vm) per lane; NaN once a NaN was seen

  int64_t i = 0;
  for (; i + 32 <= V; i += 32) {
    const __m256 a0 = _mm256_loadu_ps(x + i);
    const __m256 a1 = _mm256_loadu_ps(x + i + 8);
    const __m256 a2 = _mm256_loadu_ps(x + i + 16);
    const __m256 a3 = _mm256_loadu_ps(x + i + 24);
    const __m256 m_new =
        _mm256_max_ps(_mm256_max_ps(_mm256_max_ps(a0, a1), _mm256_max_ps(a2, a3)), vm);
    const __m256 shift = shift_for(m_new);
    const __m256 e01 = _mm256_add_ps(simd::exp_avx2(_mm256_sub_ps(a0, shift)),
                                     simd::exp_avx2(_mm256_sub_ps(a1, shift)));
    const __m256 e23 = _mm256_add_ps(simd::exp_avx2(_mm256_sub_ps(a2, shift)),
                                     simd::exp_avx2(_mm256_sub_ps(a3, shift)));
    vs = _mm256_fmadd_ps(vs, simd::exp_avx2(_mm256_sub_ps(vm, shift)), _mm256_add_ps(e01, e23));
    vm = m_new;
  }
  for (; i < V; i += 8) {
    const __m256i mask = tail_mask(lane, V - i);
    const __m256 a =
        _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(x + i, mask), _mm256_castsi256_ps(mask));
    const __m256 m_new = _mm256_max_ps(a, vm);
    const __m256 shift = shift_for(m_new);
    vs = _mm256_fmadd_ps(vs, simd::exp_avx2(_mm256_sub_ps(vm, shift)),
                         simd::exp_avx2(_mm256_sub_ps(a, shift)));
    vm = m_new;
  }
  alignas(32) float m[8], s[8];
  _mm256_store_ps(m, vm);
  _mm256_store_ps(s, vs);
  const LseState<float> st = merge_lanes<8>(m, s);
  const float row_max = st.m, ls = lse_log_sum(st);
  const float x_target = x[t];
  if (grad != nullptr) {
    const __m256 vmax = _mm256_set1_ps(row_max), vls = _mm256_set1_ps(ls);
    const __m256 vscale = _mm256_set1_ps(scale);
    for (i = 0; i < V; i += 8) {
      const __m256i mask = tail_mask(lane, V - i);
      const __m256 a = _mm256_maskload_ps(x + i, mask);
      _mm256_maskstore_ps(grad + i, mask,
                          _mm256_mul_ps(simd::exp_avx2(_mm256_sub_ps(_mm256_sub_ps(a, vmax), vls)), vscale));
    }
    grad[t] = categorical_grad(x_target, row_max, ls, true, scale);
  }
  return static_cast<double>(categorical_nll(row_max, ls, x_target));
}

KLANNEAL_TARGET_AVX512
double categorical_row_avx512(const float *x, int64_t V, int64_t t, float *grad, float scale) {
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  const __m512 zero = _mm512_setzero_ps();
  __m512 vm = neg_inf; // as in the AVX2 kernel
  __m512 vs = zero;
  int64_t i = 0;
  for (; i + 64 <= V; i += 64) {
    const __m512 a0 = _mm512_loadu_ps(x + i);
    const __m512 a1 = _mm512_loadu_ps(x + i + 16);
    const __m512 a2 = _mm512_loadu_ps(x + i + 32);
    const __m512 a3 = _mm512_loadu_ps(x + i + 48);
    const __m512 m_new =
        _mm512_max_ps(_mm512_max_ps(_mm512_max_ps(a0, a1), _mm512_max_ps(a2, a3)), vm);
    const __m512 shift = shift_for(m_new);
    const __m512 e01 = _mm512_add_ps(simd::exp_avx512(_mm512_sub_ps(a0, shift)),
                                     simd::exp_avx512(_mm512_sub_ps(a1, shift)));
    const __m512 e23 = _mm512_add_ps(simd::exp_avx512(_mm512_sub_ps(a2, shift)),
                                     simd::exp_avx512(_mm512_sub_ps(a3, shift)));
    vs = _mm512_fmadd_ps(vs, simd::exp_avx512(_mm512_sub_ps(vm, shift)), _mm512_add_ps(e01, e23));
    vm = m_new;
  }
  for (; i < V; i += 16) {
    const __m512 a = _mm512_mask_loadu_ps(neg_inf, tail_mask16(V - i), x + i);
    const __m512 m_new = _mm512_max_ps(a, vm);
    const __m512 shift = shift_for(m_new);
    vs = _mm512_fmadd_ps(vs, simd::exp_avx512(_mm512_sub_ps(vm, shift)),
                         simd::exp_avx512(_mm512_sub_ps(a, shift)));
    vm = m_new;
  }
  alignas(64) float m[16], s[16];
  _mm512_store_ps(m, vm);
  _mm512_store_ps(s, vs);
  const LseState<float> st = merge_lanes<16>(m, s);
  const float row_max = st.m, ls = lse_log_sum(st);
  const float x_target = x[t];
  if (grad != nullptr) {
    const __m512 vmax = _mm512_set1_ps(row_max), vls = _mm512_set1_ps(ls);
    const __m512 vscale = _mm512_set1_ps(scale);
    for (i = 0; i + 16 <= V; i += 16) {
      const __m512 a = _mm512_loadu_ps(x + i);
      _mm512_storeu_ps(grad + i, _mm512_mul_ps(simd::exp_avx512(_mm512_sub_ps(_mm512_sub_ps(a, vmax), vls)), vscale));
    }
    if (i < V) {
      const __mmask16 mask = tail_mask16(V - i);
      const __m512 a = _mm512_maskz_loadu_ps(mask, x + i);
      _mm512_mask_storeu_ps(grad + i, mask,
                            _mm512_mul_ps(simd::exp_avx512(_mm512_sub_ps(_mm512_sub_ps(a, vmax), vls)), vscale));
    }
    grad[t] = categorical_grad(x_target, row_max, ls, true, scale);
  }
  return static_cast<double>(categorical_nll(row_max, ls, x_target));
}

// fp64 rows: the fp32 kernels above with 4 (AVX2) or 8 (AVX-512) lanes.

KLANNEAL_TARGET_AVX2 inline __m256d shift_for(__m256d m_new) {
  const __m256d is_neg_inf = _mm256_cmp_pd(m_new, _mm256_set1_pd(-INFINITY), _CMP_EQ_OQ);
  return _mm256_blendv_pd(m_new, _mm256_setzero_pd(), is_neg_inf);
}

KLANNEAL_TARGET_AVX2 inline __m256i tail_mask64(__m256i lane, int64_t left) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(std::min<int64_t>(left, 4)), lane);
}

KLANNEAL_TARGET_AVX512 inline __m512d shift_for(__m512d m_new) {
  const __mmask8 is_neg_inf = _mm512_cmp_pd_mask(m_new, _mm512_set1_pd(-INFINITY), _CMP_EQ_OQ);
  return _mm512_mask_blend_pd(is_neg_inf, m_new, _mm512_setzero_pd());
}

inline __mmask8 tail_mask8(int64_t left) {
  return left >= 8 ? static_cast<__mmask8>(0xFF) : static_cast<__mmask8>((1u << left) - 1u);
}

KLANNEAL_TARGET_AVX2
double categorical_row_avx2_f64(const double *x, int64_t V, int64_t t, double *grad, double scale) {
  const __m256d neg_inf = _mm256_set1_pd(-INFINITY);
  const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
  __m256d vm = neg_inf;
  __m256d vs = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 16 <= V; i += 16) {
    const __m256d a0 = _mm256_loadu_pd(x + i);
    const __m256d a1 = _mm256_loadu_pd(x + i + 4);
    const __m256d a2 = _mm256_loadu_pd(x + i + 8);
    const __m256d a3 = _mm256_loadu_pd(x + i + 12);
    const __m256d m_new =
        _mm256_max_pd(_mm256_max_pd(_mm256_max_pd(a0, a1), _mm256_max_pd(a2, a3)), vm);
    const __m256d shift = shift_for(m_new);
    const __m256d e01 = _mm256_add_pd(simd::exp_avx2(_mm256_sub_pd(a0, shift)),
                                      simd::exp_avx2(_mm256_sub_pd(a1, shift)));
    const __m256d e23 = _mm256_add_pd(simd::exp_avx2(_mm256_sub_pd(a2, shift)),
                                      simd::exp_avx2(_mm256_sub_pd(a3, shift)));
    vs = _mm256_fmadd_pd(vs, simd::exp_avx2(_mm256_sub_pd(vm, shift)), _mm256_add_pd(e01, e23));
    vm = m_new;
  }
  for (; i < V; i += 4) {
    const __m256i mask = tail_mask64(lane, V - i);
    const __m256d a =
        _mm256_blendv_pd(neg_inf, _mm256_maskload_pd(x + i, mask), _mm256_castsi256_pd(mask));
    const __m256d m_new = _mm256_max_pd(a, vm);
    const __m256d shift = shift_for(m_new);
    vs = _mm256_fmadd_pd(vs, simd::exp_avx2(_mm256_sub_pd(vm, shift)),
                         simd::exp_avx2(_mm256_sub_pd(a, shift)));
    vm = m_new;
  }
  alignas(32) double m[4], s[4];
  _mm256_store_pd(m, vm);
  _mm256_store_pd(s, vs);
  const LseState<double> st = merge_lanes<4>(m, s);
  const double row_max = st.m, ls = lse_log_sum(st);
  const double x_target = x[t];
  if (grad != nullptr) {
    const __m256d vmax = _mm256_set1_pd(row_max), vls = _mm256_set1_pd(ls);
    const __m256d vscale = _mm256_set1_pd(scale);
    for (i = 0; i < V; i += 4) {
      const __m256i mask = tail_mask64(lane, V - i);
      const __m256d a = _mm256_maskload_pd(x + i, mask);
      _mm256_maskstore_pd(grad + i, mask,
                          _mm256_mul_pd(simd::exp_avx2(_mm256_sub_pd(_mm256_sub_pd(a, vmax), vls)), vscale));
    }
    grad[t] = categorical_grad(x_target, row_max, ls, true, scale);
  }
  return categorical_nll(row_max, ls, x_target);
}

KLANNEAL_TARGET_AVX512
double categorical_row_avx512_f64(const double *x, int64_t V, int64_t t, double *grad,
                                  double scale) {
  const __m512d neg_inf = _mm512_set1_pd(-INFINITY);
  __m512d vm = neg_inf;
  __m512d vs = _mm512_setzero_pd();
  int64_t i = 0;
  for (; i + 32 <= V; i += 32) {
    const __m512d a0 = _mm512_loadu_pd(x + i);
    const __m512d a1 = _mm512_loadu_pd(x + i + 8);
    const __m512d a2 = _mm512_loadu_pd(x + i + 16);
    const __m512d a3 = _mm512_loadu_pd(x + i + 24);
    const __m512d m_new =
        _mm512_max_pd(_mm512_max_pd(_mm512_max_pd(a0, a1), _mm512_max_pd(a2, a3)), vm);
    const __m512d shift = shift_for(m_new);
    const __m512d e01 = _mm512_add_pd(simd::exp_avx512(_mm512_sub_pd(a0, shift)),
                                      simd::exp_avx512(_mm512_sub_pd(a1, shift)));
    const __m512d e23 = _mm512_add_pd(simd::exp_avx512(_mm512_sub_pd(a2, shift)),
                                      simd::exp_avx512(_mm512_sub_pd(a3, shift)));
    vs = _mm512_fmadd_pd(vs, simd::exp_avx512(_mm512_sub_pd(vm, shift)), _mm512_add_pd(e01, e23));
    vm = m_new;
  }
  for (; i < V; i += 8) {
    const __m512d a = _mm512_mask_loadu_pd(neg_inf, tail_mask8(V - i), x + i);
    const __m512d m_new = _mm512_max_pd(a, vm);
    const __m512d shift = shift_for(m_new);
    vs = _mm512_fmadd_pd(vs, simd::exp_avx512(_mm512_sub_pd(vm, shift)),
                         simd::exp_avx512(_mm512_sub_pd(a, shift)));
    vm = m_new;
  }
  alignas(64) double m[8], s[8];
  _mm512_store_pd(m, vm);
  _mm512_store_pd(s, vs);
  const LseState<double> st = merge_lanes<8>(m, s);
  const double row_max = st.m, ls = lse_log_sum(st);
  const double x_target = x[t];
  if (grad != nullptr) {
    const __m512d vmax = _mm512_set1_pd(row_max), vls = _mm512_set1_pd(ls);
    const __m512d vscale = _mm512_set1_pd(scale);
    for (i = 0; i < V; i += 8) {
      const __mmask8 mask = tail_mask8(V - i);
      const __m512d a = _mm512_maskz_loadu_pd(mask, x + i);
      _mm512_mask_storeu_pd(grad + i, mask,
                            _mm512_mul_pd(simd::exp_avx512(_mm512_sub_pd(_mm512_sub_pd(a, vmax), vls)), vscale));
    }
    grad[t] = categorical_grad(x_target, row_max, ls, true, scale);
  }
  return categorical_nll(row_max, ls, x_target);
}

// ---- bernoulli / gaussian / mse on fp32, vectorised -------------------------
// The formulas of elbo_math.h on 8 or 16 lanes; each lane's loss is widened
// to double before it is accumulated, lanes are summed in order at the end.

struct PointwiseConsts {
  float scale;    // 1/B for batchmean, else 1
  float inv_var;  // gaussian
  float log_norm; // gaussian: log(2 pi var)
};

template <int kKind> // static_cast<int>(Likelihood)
KLANNEAL_TARGET_AVX2 inline __m256 pointwise_avx2(__m256 x, __m256 y, __m256 *grad,
                                                  const PointwiseConsts &c) {
  const __m256 one = _mm256_set1_ps(1.0f);
  if constexpr (kKind == static_cast<int>(Likelihood::kBernoulli)) {
    // max(x, 0) - x*y + log1p(exp(-|x|)); grad sigmoid(x) - y, with the
    // sigmoid from the same e = exp(-|x|) (one exp per element):
    // 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0.
    const __m256 abs_x = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
    const __m256 e = simd::exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), abs_x));
    const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, e));
    const __m256 sig =
        _mm256_blendv_ps(r, _mm256_mul_ps(e, r), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
    *grad = _mm256_mul_ps(_mm256_sub_ps(sig, y), _mm256_set1_ps(c.scale));
    // bernoulli_linear_part: x * (1 - y) for x > 0, -(x * y) otherwise, 0
    // where the target factor is exactly 0 (the limits at infinite logits).
    const __m256 zero = _mm256_setzero_ps();
    const __m256 w = _mm256_sub_ps(one, y);
    const __m256 pos = _mm256_andnot_ps(_mm256_cmp_ps(w, zero, _CMP_EQ_OQ), _mm256_mul_ps(x, w));
    const __m256 neg = _mm256_andnot_ps(_mm256_cmp_ps(y, zero, _CMP_EQ_OQ),
                                        _mm256_sub_ps(zero, _mm256_mul_ps(x, y)));
    const __m256 linear = _mm256_blendv_ps(neg, pos, _mm256_cmp_ps(x, zero, _CMP_GT_OQ));
    return _mm256_add_ps(linear, simd::log1p_unit_avx2(e));
  } else if constexpr (kKind == static_cast<int>(Likelihood::kGaussian)) {
    const __m256 d = _mm256_sub_ps(x, y);
    const __m256 inv_var = _mm256_set1_ps(c.inv_var);
    *grad = _mm256_mul_ps(_mm256_mul_ps(d, inv_var), _mm256_set1_ps(c.scale));
    return _mm256_mul_ps(_mm256_set1_ps(0.5f),
                         _mm256_fmadd_ps(_mm256_mul_ps(d, d), inv_var, _mm256_set1_ps(c.log_norm)));
  } else {
    const __m256 d = _mm256_sub_ps(x, y);
    *grad = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(2.0f), d), _mm256_set1_ps(c.scale));
    return _mm256_mul_ps(d, d);
  }
}

template <int kKind>
KLANNEAL_TARGET_AVX512 inline __m512 pointwise_avx512(__m512 x, __m512 y, __m512 *grad,
                                                      const PointwiseConsts &c) {
  const __m512 one = _mm512_set1_ps(1.0f);
  if constexpr (kKind == static_cast<int>(Likelihood::kBernoulli)) {
    const __m512 abs_x = _mm512_abs_ps(x); // as in the AVX2 kernel: one exp
    const __m512 e = simd::exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), abs_x));
    const __m512 r = _mm512_div_ps(one, _mm512_add_ps(one, e));
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 sig = _mm512_mask_mul_ps(r, negative, e, r);
    *grad = _mm512_mul_ps(_mm512_sub_ps(sig, y), _mm512_set1_ps(c.scale));
    // bernoulli_linear_part, as in the AVX2 kernel.
    const __m512 zero = _mm512_setzero_ps();
    const __m512 w = _mm512_sub_ps(one, y);
    const __m512 pos = _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(w, zero, _CMP_NEQ_UQ), x, w);
    const __m512 neg = _mm512_maskz_sub_ps(_mm512_cmp_ps_mask(y, zero, _CMP_NEQ_UQ), zero,
                                           _mm512_mul_ps(x, y));
    const __m512 linear =
        _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ), neg, pos);
    return _mm512_add_ps(linear, simd::log1p_unit_avx512(e));
  } else if constexpr (kKind == static_cast<int>(Likelihood::kGaussian)) {
    const __m512 d = _mm512_sub_ps(x, y);
    const __m512 inv_var = _mm512_set1_ps(c.inv_var);
    *grad = _mm512_mul_ps(_mm512_mul_ps(d, inv_var), _mm512_set1_ps(c.scale));
    return _mm512_mul_ps(_mm512_set1_ps(0.5f),
                         _mm512_fmadd_ps(_mm512_mul_ps(d, d), inv_var, _mm512_set1_ps(c.log_norm)));
  } else {
    const __m512 d = _mm512_sub_ps(x, y);
    *grad = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(2.0f), d), _mm512_set1_ps(c.scale));
    return _mm512_mul_ps(d, d);
  }
}

template <int kKind>
KLANNEAL_TARGET_AVX2 double pointwise_chunk_avx2(const float *x, const float *y, int64_t n,
                                                 float *grad, const PointwiseConsts &c) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256d acc_lo = _mm256_setzero_pd(), acc_hi = _mm256_setzero_pd();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256i mask = tail_mask(lane, n - i);
    __m256 g;
    __m256 l = pointwise_avx2<kKind>(_mm256_maskload_ps(x + i, mask),
                                     _mm256_maskload_ps(y + i, mask), &g, c);
    l = _mm256_and_ps(l, _mm256_castsi256_ps(mask)); // lanes past the end add 0
    acc_lo = _mm256_add_pd(acc_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(l)));
    acc_hi = _mm256_add_pd(acc_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(l, 1)));
    if (grad != nullptr)
      _mm256_maskstore_ps(grad + i, mask, g);
  }
  alignas(32) double lanes[8];
  _mm256_store_pd(lanes, acc_lo);
  _mm256_store_pd(lanes + 4, acc_hi);
  double sum = 0.0;
  for (double v : lanes)
    sum += v;
  return sum;
}

template <int kKind>
KLANNEAL_TARGET_AVX512 double pointwise_chunk_avx512(const float *x, const float *y, int64_t n,
                                                     float *grad, const PointwiseConsts &c) {
  __m512d acc_lo = _mm512_setzero_pd(), acc_hi = _mm512_setzero_pd();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask16(n - i);
    __m512 g;
    __m512 l = pointwise_avx512<kKind>(_mm512_maskz_loadu_ps(mask, x + i),
                                       _mm512_maskz_loadu_ps(mask, y + i), &g, c);
    l = _mm512_maskz_mov_ps(mask, l); // lanes past the end add 0
    acc_lo = _mm512_add_pd(acc_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(l)));
    acc_hi = _mm512_add_pd(acc_hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(l, 1)));
    if (grad != nullptr)
      _mm512_mask_storeu_ps(grad + i, mask, g);
  }
  alignas(64) double lanes[16];
  _mm512_store_pd(lanes, acc_lo);
  _mm512_store_pd(lanes + 8, acc_hi);
  double sum = 0.0;
  for (double v : lanes)
    sum += v;
  return sum;
}

using PointwiseChunkF32 = double (*)(const float *, const float *, int64_t, float *,
                                     const PointwiseConsts &);

// nullptr: no vector kernel at this level (the scalar loop runs).
PointwiseChunkF32 pointwise_chunk_f32(SimdLevel level, Likelihood likelihood) {
  constexpr int kB = static_cast<int>(Likelihood::kBernoulli);
  constexpr int kG = static_cast<int>(Likelihood::kGaussian);
  constexpr int kM = static_cast<int>(Likelihood::kMse);
  if (level == SimdLevel::kAvx512) {
    if (likelihood == Likelihood::kBernoulli)
      return pointwise_chunk_avx512<kB>;
    if (likelihood == Likelihood::kGaussian)
      return pointwise_chunk_avx512<kG>;
    return pointwise_chunk_avx512<kM>;
  }
  if (level == SimdLevel::kAvx2) {
    if (likelihood == Likelihood::kBernoulli)
      return pointwise_chunk_avx2<kB>;
    if (likelihood == Likelihood::kGaussian)
      return pointwise_chunk_avx2<kG>;
    return pointwise_chunk_avx2<kM>;
  }
  return nullptr;
}

// Index of the first block of 32 values holding one outside [0, 1] (NaN
// included), or the start of the tail shorter than a block: the caller
// scans on from there.
KLANNEAL_TARGET_AVX2 inline __m256 in_unit_interval(const float *y) {
  const __m256 v = _mm256_loadu_ps(y); // ordered compares: false for NaN
  return _mm256_and_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ),
                       _mm256_cmp_ps(v, _mm256_set1_ps(1.0f), _CMP_LE_OQ));
}

KLANNEAL_TARGET_AVX2 int64_t first_invalid_probability_avx2(const float *y, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256 ok = _mm256_and_ps(
        _mm256_and_ps(in_unit_interval(y + i), in_unit_interval(y + i + 8)),
        _mm256_and_ps(in_unit_interval(y + i + 16), in_unit_interval(y + i + 24)));
    if (_mm256_movemask_ps(ok) != 0xFF)
      return i;
  }
  return i;
}

#endif // KLANNEAL_X86_SIMD

template <typename T> using CategoricalRow = double (*)(const T *, int64_t, int64_t, T *, T);

// The row kernel for fp32 (T = float) or fp64 rows at this SIMD level.
template <typename T> CategoricalRow<T> categorical_row(SimdLevel level) {
#if defined(KLANNEAL_X86_SIMD)
  if constexpr (std::is_same_v<T, float>) {
    if (level == SimdLevel::kAvx512)
      return categorical_row_avx512;
    if (level == SimdLevel::kAvx2)
      return categorical_row_avx2;
  } else {
    if (level == SimdLevel::kAvx512)
      return categorical_row_avx512_f64;
    if (level == SimdLevel::kAvx2)
      return categorical_row_avx2_f64;
  }
#endif
  (void)level;
  return categorical_row_scalar<T>;
}

// ---- threading --------------------------------------------------------------
//
// parallel_for(n_units, n_threads, fn) calls fn(begin, end) on disjoint
// ranges covering [0, n_units). Ranges are claimed dynamically, `grain`
// units at a time, by the calling thread and by up to n_threads - 1 workers
// of a persistent pool: a worker the OS has not scheduled yet leaves its
// share to the others instead of holding up the call. Which thread runs a
// unit never changes a result: every unit writes only its own output slots.
//
// The pool is created on first use and grows to the largest thread count
// asked for. One call uses it at a time; a concurrent call (another Python
// thread) starts threads of its own instead of waiting. The pool is never
// destroyed: its workers are detached and sleep on a condition variable, so
// nothing is joined or torn down at interpreter exit. A fork()ed child gets
// a fresh pool on first use (the parent's workers do not exist there).

// Claims ranges of `grain` units from `next` until none are left.
template <typename F>
void claim_units(std::atomic<int64_t> &next, int64_t n_units, int64_t grain, const F &fn) {
  for (;;) {
    const int64_t begin = next.fetch_add(grain, std::memory_order_relaxed);
    if (begin >= n_units)
      return;
    fn(begin, std::min(begin + grain, n_units));
  }
}

class WorkerPool {
public:
  // Runs job() on the calling thread and on up to n_helpers workers; returns
  // when every thread that started on it has finished. False (nothing ran)
  // if the pool is busy with another call or cannot start its threads.
  bool run(int n_helpers, void (*job)(void *), void *context) {
    std::unique_lock<std::mutex> dispatch(dispatch_mutex_, std::try_to_lock);
    if (!dispatch.owns_lock() || !grow(n_helpers))
      return false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = job;
      context_ = context;
      seats_ = n_helpers;
      ++generation_;
    }
    wake_.notify_all();
    std::exception_ptr error;
    try {
      job(context);
    } catch (...) { // the workers still use the caller's stack: wait for them first
      error = std::current_exception();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    seats_ = 0; // a worker waking from now on has nothing left to do
    idle_.wait(lock, [this] { return running_ == 0; });
    if (error)
      std::rethrow_exception(error);
    return true;
  }

private:
  bool grow(int n_helpers) {
    try {
      while (static_cast<int>(n_workers_) < n_helpers) {
        std::thread([this] { work(); }).detach();
        ++n_workers_;
      }
    } catch (...) { // std::system_error: no more threads
      return false;
    }
    return true;
  }

  void work() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (seats_ == 0)
        continue;
      --seats_;
      ++running_;
      void (*job)(void *) = job_;
      void *context = context_;
      lock.unlock();
      job(context);
      lock.lock();
      if (--running_ == 0)
        idle_.notify_one();
    }
  }

  std::mutex dispatch_mutex_; // held by the one call using the pool
  std::mutex mutex_;          // guards the fields below
  std::condition_variable wake_, idle_;
  uint64_t generation_ = 0; // bumped once per call
  int seats_ = 0;           // workers that may still join the current call
  int running_ = 0;         // workers inside the current call's job
  size_t n_workers_ = 0;
  void (*job_)(void *) = nullptr;
  void *context_ = nullptr;
};

std::atomic<WorkerPool *> g_pool{nullptr};
std::once_flag g_atfork_once;

WorkerPool &worker_pool() {
  std::call_once(g_atfork_once, [] {
#if defined(__linux__) || defined(__APPLE__)
    // The child of a fork has none of the workers: forget the pool there.
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); });
#endif
  });
  WorkerPool *pool = g_pool.load();
  if (pool == nullptr) {
    auto *fresh = new WorkerPool; // never deleted: see above
    if (g_pool.compare_exchange_strong(pool, fresh))
      pool = fresh;
    else
      delete fresh; // another thread created it first; `pool` holds that one
  }
  return *pool;
}

// More threads than the machine has cores only add switching: the pool is
// capped there, whatever torch.get_num_threads() says (set_num_threads(256)
// on 2 cores would otherwise leave hundreds of idle workers behind).
int max_threads() {
  static const int n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return n;
}

template <typename F> void parallel_for(int64_t n_units, int n_threads, const F &fn) {
  n_threads = std::min(n_threads, max_threads());
  n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n_units)));
  if (n_threads == 1) {
    fn(0, n_units);
    return;
  }
  // About 8 claims per thread: small enough to balance a late or slow
  // thread, large enough that the atomic is never contended.
  const int64_t grain = std::max<int64_t>(1, n_units / (8 * static_cast<int64_t>(n_threads)));
  std::atomic<int64_t> next{0};
  struct Job {
    std::atomic<int64_t> *next;
    int64_t n_units, grain;
    const F *fn;
  } job{&next, n_units, grain, &fn};
  auto run_job = [](void *context) {
    const Job &j = *static_cast<const Job *>(context);
    claim_units(*j.next, j.n_units, j.grain, *j.fn);
  };
  if (worker_pool().run(n_threads - 1, run_job, &job))
    return;
  // Pool busy (a concurrent call) or out of threads: threads of our own.
  std::vector<std::thread> workers;
  workers.reserve(n_threads - 1);
  for (int k = 1; k < n_threads; ++k) {
    try {
      workers.emplace_back(run_job, &job);
    } catch (...) {
      break; // the threads that did start, and this one, share the work
    }
  }
  run_job(&job);
  for (auto &w : workers)
    w.join();
}

// ---- target checks (ElboParams::first_invalid_target) ------------------------

// Flat index of the first class id outside [0, V) that is not ignore_index, or -1.
int64_t first_invalid_class(const ElboParams &p) {
  const auto *target = static_cast<const int64_t *>(p.target);
  for (int64_t r = 0; r < p.n_rows; ++r) {
    const int64_t t = target[r];
    if (t != p.ignore_index && (t < 0 || t >= p.row_len))
      return r;
  }
  return -1;
}

// Index in [0, n) of the first bernoulli target outside [0, 1] (NaN
// included), or -1.
template <typename S> int64_t first_invalid_probability(const S *y, int64_t n, SimdLevel level) {
  using T = typename Elem<S>::T;
  int64_t i = 0;
#if defined(KLANNEAL_X86_SIMD)
  if constexpr (std::is_same_v<S, float>) {
    if (level == SimdLevel::kAvx2 || level == SimdLevel::kAvx512)
      i = first_invalid_probability_avx2(y, n); // skips whole blocks of valid values
  }
#endif
  (void)level;
  for (; i < n; ++i) {
    const T v = Elem<S>::load(y[i]);
    if (!(v >= T(0) && v <= T(1)))
      return i;
  }
  return -1;
}

// ---- reconstruction term ----------------------------------------------------

// Categorical: unit_loss[r] = loss of row r. Rows whose target is
// ignore_index contribute 0 and a zero gradient; a target outside [0, V)
// gives a NaN loss and a NaN gradient row, and is never used as an index.
template <typename S>
void categorical_rows(const ElboParams &p, double *unit_loss, SimdLevel level, int n_threads) {
  using T = typename Elem<S>::T;
  const auto *x = static_cast<const S *>(p.recon_input);
  const auto *target = static_cast<const int64_t *>(p.target);
  using G = Grad<S>;
  auto *grad = static_cast<G *>(p.grad_recon);
  const int64_t V = p.row_len;
  const T scale = p.reduction == Reduction::kBatchMean ? T(1) / static_cast<T>(p.batch) : T(1);
  const CategoricalRow<float> row_f32 = categorical_row<float>(level);
  const CategoricalRow<double> row_f64 = categorical_row<double>(level);
  const G zero = G(0);
  const G nan = std::numeric_limits<G>::quiet_NaN();

  parallel_for(p.n_rows, n_threads, [&](int64_t begin, int64_t end) {
    std::vector<float> widened; // fp16/bf16 row in fp32
    for (int64_t r = begin; r < end; ++r) {
      const S *xr = x + r * V;
      G *gr = grad != nullptr ? grad + r * V : nullptr;
      const int64_t t = target[r];
      if (t == p.ignore_index || t < 0 || t >= V) {
        const bool ignored = t == p.ignore_index;
        unit_loss[r] = ignored ? 0.0 : std::numeric_limits<double>::quiet_NaN();
        if (gr != nullptr)
          std::fill(gr, gr + V, ignored ? zero : nan);
        continue;
      }
      if constexpr (std::is_same_v<S, double>) {
        unit_loss[r] = row_f64(xr, V, t, gr, scale);
      } else if constexpr (std::is_same_v<S, float>) {
        unit_loss[r] = row_f32(xr, V, t, gr, scale);
      } else {
        widened.resize(V);
        for (int64_t i = 0; i < V; ++i)
          widened[i] = Elem<S>::load(xr[i]);
        unit_loss[r] = row_f32(widened.data(), V, t, gr, scale); // fp32 gradient (GradOf)
      }
    }
  });
}

// Bernoulli / gaussian / mse: unit u covers elements [c * kChunk, ...) of
// example u / chunks_per_row.
// unit_bad (nullptr: no check): bernoulli only, unit_bad[u] = flat index of
// the first invalid target of unit u, or -1, found while the unit's targets
// are still in cache.
template <typename S>
void pointwise_units(const ElboParams &p, double *unit_loss, int64_t *unit_bad,
                     int64_t chunks_per_row, SimdLevel level, int n_threads) {
  using T = typename Elem<S>::T;
  const auto *x = static_cast<const S *>(p.recon_input);
  const auto *y = static_cast<const S *>(p.target);
  using G = Grad<S>;
  auto *grad = static_cast<G *>(p.grad_recon);
  const int64_t n = p.row_len;
  const T scale = p.reduction == Reduction::kBatchMean ? T(1) / static_cast<T>(p.batch) : T(1);
  const T inv_var = T(1) / static_cast<T>(p.gaussian_var);
  const T log_norm = static_cast<T>(gaussian_log_norm(p.gaussian_var));

  auto chunk_bounds = [&](int64_t u) {
    const int64_t row = u / chunks_per_row;
    const int64_t lo = row * n + (u % chunks_per_row) * kChunk;
    return std::make_pair(lo, std::min(lo + kChunk, (row + 1) * n));
  };
  auto check_unit = [&](int64_t u, int64_t lo, int64_t hi) {
    if (unit_bad != nullptr) {
      const int64_t i = first_invalid_probability(y + lo, hi - lo, level);
      unit_bad[u] = i < 0 ? -1 : lo + i;
    }
  };
#if defined(KLANNEAL_X86_SIMD)
  if constexpr (std::is_same_v<S, float>) {
    if (const PointwiseChunkF32 chunk = pointwise_chunk_f32(level, p.likelihood)) {
      const PointwiseConsts c{scale, inv_var, log_norm};
      parallel_for(p.n_rows * chunks_per_row, n_threads, [&](int64_t begin, int64_t end) {
        for (int64_t u = begin; u < end; ++u) {
          const auto [lo, hi] = chunk_bounds(u);
          unit_loss[u] = chunk(x + lo, y + lo, hi - lo, grad != nullptr ? grad + lo : nullptr, c);
          check_unit(u, lo, hi);
        }
      });
      return;
    }
  }
#endif
  (void)level;
  auto run = [&](auto nll, auto dnll) {
    parallel_for(p.n_rows * chunks_per_row, n_threads, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const auto [lo, hi] = chunk_bounds(u);
        double acc = 0.0;
        for (int64_t i = lo; i < hi; ++i) {
          const T xv = Elem<S>::load(x[i]);
          const T yv = Elem<S>::load(y[i]);
          acc += static_cast<double>(nll(xv, yv));
          if (grad != nullptr)
            grad[i] = static_cast<G>(dnll(xv, yv) * scale);
        }
        unit_loss[u] = acc;
        check_unit(u, lo, hi);
      }
    });
  };
  switch (p.likelihood) {
  case Likelihood::kBernoulli:
    run([](T a, T b) { return bernoulli_nll(a, b); },
        [](T a, T b) { return bernoulli_grad(a, b); });
    break;
  case Likelihood::kGaussian:
    run([&](T a, T b) { return gaussian_nll(a, b, inv_var, log_norm); },
        [&](T a, T b) { return gaussian_grad(a, b, inv_var); });
    break;
  default:
    run([](T a, T b) { return mse_nll(a, b); }, [](T a, T b) { return mse_grad(a, b); });
    break;
  }
}

template <typename S>
void recon_units(const ElboParams &p, double *unit_loss, int64_t *unit_bad,
                 int64_t chunks_per_row, SimdLevel level, int n_threads) {
  if (p.likelihood == Likelihood::kCategorical)
    categorical_rows<S>(p, unit_loss, level, n_threads);
  else
    pointwise_units<S>(p, unit_loss, unit_bad, chunks_per_row, level, n_threads);
}

// Flat index of the first invalid bernoulli target, or -1, in a pass of its
// own (for inplace calls, which must not overwrite recon_input when they fail).
template <typename S>
int64_t first_invalid_bernoulli_prepass(const ElboParams &p, int64_t chunks_per_row,
                                        SimdLevel level, int n_threads) {
  const auto *y = static_cast<const S *>(p.target);
  const int64_t n = p.row_len, n_units = p.n_rows * chunks_per_row;
  std::vector<int64_t> unit_bad(static_cast<size_t>(n_units));
  parallel_for(n_units, n_threads, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t row = u / chunks_per_row;
      const int64_t lo = row * n + (u % chunks_per_row) * kChunk;
      const int64_t hi = std::min(lo + kChunk, (row + 1) * n);
      const int64_t i = first_invalid_probability(y + lo, hi - lo, level);
      unit_bad[u] = i < 0 ? -1 : lo + i;
    }
  });
  for (int64_t bad : unit_bad)
    if (bad >= 0)
      return bad;
  return -1;
}

// ---- KL term and the outputs -----------------------------------------------

// KL of latent element k, against the learned prior if there is one.
template <typename S>
KlElem<typename Elem<S>::T> kl_at(const ElboParams &p, int64_t k) {
  const auto *mu = static_cast<const S *>(p.mu);
  const auto *logvar = static_cast<const S *>(p.logvar);
  if (p.prior_mu == nullptr)
    return gaussian_kl_elem(Elem<S>::load(mu[k]), Elem<S>::load(logvar[k]));
  const auto *prior_mu = static_cast<const S *>(p.prior_mu);
  const auto *prior_logvar = static_cast<const S *>(p.prior_logvar);
  return gaussian_kl_elem(Elem<S>::load(mu[k]), Elem<S>::load(logvar[k]),
                          Elem<S>::load(prior_mu[k]), Elem<S>::load(prior_logvar[k]));
}

// Fills kl_b (true KL per example), klterm_b (per-example KL term: free
// bits in "sample" mode, then the capacity for kNone), kl_per_dim, and the
// latent gradients; returns the batch's KL term (free bits, then capacity).
// At a tie with lambda the gradient passes (torch.clamp). The precision of
// the comparisons, the same on CPU, CUDA and in the reference: "sample" mode
// compares each KL_bd in T (the latent dtype's arithmetic type), "batch" mode
// compares the batch mean, a float64 sum (or the caller's all-reduced
// global_kl_per_dim), in float64; the capacity compares in float64.
template <typename S>
double kl_term(const ElboParams &p, double beta, double capacity, std::vector<double> &kl_b,
               std::vector<double> &klterm_b) {
  using T = typename Elem<S>::T;
  const int64_t B = p.batch, D = p.latent_dim;
  using G = Grad<S>;
  auto *grad_mu = static_cast<G *>(p.grad_mu);
  auto *grad_logvar = static_cast<G *>(p.grad_logvar);
  auto *grad_prior_mu = static_cast<G *>(p.grad_prior_mu);
  auto *grad_prior_logvar = static_cast<G *>(p.grad_prior_logvar);
  const bool free_bits = p.free_bits > 0.0;
  const bool batch_mode = free_bits && p.free_bits_mode == FreeBitsMode::kBatch;
  const T lambda = static_cast<T>(p.free_bits);

  std::vector<T> kl(static_cast<size_t>(B * D));
  std::vector<double> dim_sum(static_cast<size_t>(D), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    double kb = 0.0, tb = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const T k = kl_at<S>(p, b * D + d).kl;
      kl[b * D + d] = k;
      kb += static_cast<double>(k);
      dim_sum[d] += static_cast<double>(k);
      tb += static_cast<double>(free_bits && k < lambda ? lambda : k); // clamp keeps NaN
    }
    kl_b[b] = kb;
    klterm_b[b] = tb;
  }
  std::vector<double> dim_mean(static_cast<size_t>(D));
  double total = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double local = dim_sum[d] / static_cast<double>(B);
    if (p.kl_per_dim != nullptr)
      p.kl_per_dim[d] = local;
    const double mean = p.global_kl_per_dim != nullptr ? p.global_kl_per_dim[d] : local;
    dim_mean[d] = mean;
    if (batch_mode)
      total += mean < p.free_bits ? p.free_bits : mean; // keeps NaN
  }
  if (batch_mode) {
    total *= static_cast<double>(B);
  } else {
    for (int64_t b = 0; b < B; ++b)
      total += klterm_b[b];
  }
  // Capacity: |t - C| per example (kNone) or B * |t / B - C| for the batch;
  // the gradients take sign(. - C).
  std::vector<double> sign_b(static_cast<size_t>(B), 1.0);
  if (p.has_capacity) {
    if (p.reduction == Reduction::kNone) {
      for (int64_t b = 0; b < B; ++b) {
        sign_b[b] = capacity_sign(klterm_b[b], capacity);
        klterm_b[b] = capacity_term(klterm_b[b], capacity);
      }
    } else {
      const double per_example = total / static_cast<double>(B);
      std::fill(sign_b.begin(), sign_b.end(), capacity_sign(per_example, capacity));
      total = static_cast<double>(B) * capacity_term(per_example, capacity);
    }
  }

  if (grad_mu != nullptr || grad_logvar != nullptr || grad_prior_mu != nullptr ||
      grad_prior_logvar != nullptr) {
    const double scale = p.reduction == Reduction::kBatchMean ? 1.0 / static_cast<double>(B) : 1.0;
    for (int64_t b = 0; b < B; ++b) {
      const T weight = static_cast<T>(beta * scale * sign_b[b]);
      for (int64_t d = 0; d < D; ++d) {
        const int64_t i = b * D + d;
        bool pass = true;
        if (batch_mode)
          pass = dim_mean[d] >= p.free_bits;
        else if (free_bits)
          pass = kl[i] >= lambda;
        store_kl_grads(kl_at<S>(p, i), pass ? weight : T(0), i, grad_mu, grad_logvar,
                       grad_prior_mu, grad_prior_logvar);
      }
    }
  }
  return total;
}

template <typename F> auto dispatch_dtype(DType dtype, const F &f) {
  switch (dtype) {
  case DType::kFloat64:
    return f(double{});
  case DType::kFloat16:
    return f(Half{});
  case DType::kBFloat16:
    return f(BFloat16{});
  default:
    return f(float{});
  }
}

size_t dtype_size(DType d) { return d == DType::kFloat64 ? 8 : d == DType::kFloat32 ? 4 : 2; }

} // namespace

void launch_elbo_cpu(const ElboParams &p) {
  check_elbo_params(p);
  const SimdLevel level = cpu_simd_level();
  const double beta = resolve_beta(p);
  // A schedule with a negative start or stop, or a beta tensor holding one,
  // must not become a negative KL weight silently.
  KLANNEAL_CHECK_ARG(std::isfinite(beta) && beta >= 0.0,
                     "elbo: beta must be finite and >= 0, got " + std::to_string(beta));
  *p.beta_out = beta;
  const double capacity = p.has_capacity ? resolve_capacity(p) : 0.0;
  KLANNEAL_CHECK_ARG(std::isfinite(capacity) && capacity >= 0.0,
                     "elbo: capacity must be finite and >= 0, got " + std::to_string(capacity));

  const bool categorical = p.likelihood == Likelihood::kCategorical;
  const int64_t chunks_per_row = categorical ? 1 : (p.row_len + kChunk - 1) / kChunk;
  const int64_t n_units = p.n_rows * chunks_per_row;
  const int64_t elems = p.n_rows * p.row_len;
  const int n_threads = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(std::max(p.n_threads, 1),
                           elems / (categorical ? kMinElemsPerThreadCategorical
                                                : kMinElemsPerThreadPointwise))));

  // Target checks: class ids (n_rows values) and, for inplace calls,
  // bernoulli targets before anything is written; otherwise bernoulli
  // targets in the main pass.
  const bool inplace = p.grad_recon != nullptr && p.grad_recon == p.recon_input;
  bool check_in_pass = false;
  if (p.first_invalid_target != nullptr) {
    int64_t bad = -1;
    if (categorical)
      bad = first_invalid_class(p);
    else if (p.likelihood == Likelihood::kBernoulli && inplace)
      bad = dispatch_dtype(p.recon_dtype, [&](auto s) {
        return first_invalid_bernoulli_prepass<decltype(s)>(p, chunks_per_row, level, n_threads);
      });
    else
      check_in_pass = p.likelihood == Likelihood::kBernoulli;
    *p.first_invalid_target = bad;
    if (bad >= 0)
      return;
  }

  if (p.grad_recon != nullptr && !inplace)
    advise_huge_pages(p.grad_recon,
                      static_cast<size_t>(elems) * dtype_size(grad_dtype(p.recon_dtype)));

  std::vector<double> unit_loss(static_cast<size_t>(n_units));
  std::vector<int64_t> unit_bad(check_in_pass ? static_cast<size_t>(n_units) : 0);
  dispatch_dtype(p.recon_dtype, [&](auto s) {
    recon_units<decltype(s)>(p, unit_loss.data(), check_in_pass ? unit_bad.data() : nullptr,
                             chunks_per_row, level, n_threads);
    return 0;
  });
  for (int64_t bad : unit_bad) { // units in flat order: the first found is the first
    if (bad >= 0) {
      *p.first_invalid_target = bad;
      return;
    }
  }

  const int64_t B = p.batch;
  std::vector<double> kl_b(static_cast<size_t>(B), 0.0), klterm_b(static_cast<size_t>(B), 0.0);
  const double klterm_total = dispatch_dtype(
      p.latent_dtype,
      [&](auto s) { return kl_term<decltype(s)>(p, beta, capacity, kl_b, klterm_b); });

  // Fixed-order sums: units of example b are consecutive.
  const int64_t units_per_example = n_units / B;
  double recon_total = 0.0, kl_total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    double recon_b = 0.0;
    for (int64_t u = b * units_per_example; u < (b + 1) * units_per_example; ++u)
      recon_b += unit_loss[u];
    if (p.reduction == Reduction::kNone) {
      p.loss[b] = recon_b + beta * klterm_b[b];
      p.recon[b] = recon_b;
      p.kl[b] = kl_b[b];
      if (p.kl_weight != nullptr)
        p.kl_weight[b] = klterm_b[b];
    }
    recon_total += recon_b;
    kl_total += kl_b[b];
  }
  if (p.reduction != Reduction::kNone) {
    const double divisor = p.reduction == Reduction::kBatchMean ? static_cast<double>(B) : 1.0;
    *p.loss = (recon_total + beta * klterm_total) / divisor;
    *p.recon = recon_total / divisor;
    *p.kl = kl_total / divisor;
    if (p.kl_weight != nullptr)
      *p.kl_weight = klterm_total / divisor;
  }
}

} // namespace klanneal
