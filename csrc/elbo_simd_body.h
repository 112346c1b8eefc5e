// The vectorised CPU kernels of the ELBO op, written once against the Vec
// interface of simd_vec_cpu.h. Included by elbo_simd_cpu.cpp once per ISA,
// inside namespace klanneal::cpu::<isa> with `Isa` naming the traits tag and
// the ISA's target pragma in force (so every function here is compiled for
// that ISA, and only these functions). No #include and no include guard:
// it is meant to be included more than once.

template <typename T> using VecT = simd::Vec<Isa, T>;

// A group of elements with max m_new is added by rescaling the running sum
// once to the new max, shifting by 0 in lanes still at -inf so that
// exp(-inf - shift) = 0 rather than exp(NaN).
template <typename T> inline typename VecT<T>::R shift_for(typename VecT<T>::R m_new) {
  using W = VecT<T>;
  return W::select(W::eq(m_new, W::set1(-INFINITY)), W::zero(), m_new);
}

// Categorical row (CategoricalRow in elbo_simd_cpu.h): one read for the
// online max / log-sum-exp (blocks of 4 vectors: one rescale of the running
// sum per block, one exp per element), lanes merged in order with the
// scalar lse_merge, then one pass writing the gradient.
template <typename T> double categorical_row(const T *x, int64_t n, int64_t t, T *grad, T scale) {
  using W = VecT<T>;
  using R = typename W::R;
  constexpr int L = W::kLanes;
  const R neg_inf = W::set1(-INFINITY);
  R vm = neg_inf;   // running max per lane; never NaN (it is max's second operand)
  R vs = W::zero(); // sum of exp(x - vm) per lane; NaN once a NaN was seen
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    const R a0 = W::loadu(x + i);
    const R a1 = W::loadu(x + i + L);
    const R a2 = W::loadu(x + i + 2 * L);
    const R a3 = W::loadu(x + i + 3 * L);
    const R m_new = W::max(W::max(W::max(a0, a1), W::max(a2, a3)), vm);
    const R shift = shift_for<T>(m_new);
    const R e01 = W::add(W::exp(W::sub(a0, shift)), W::exp(W::sub(a1, shift)));
    const R e23 = W::add(W::exp(W::sub(a2, shift)), W::exp(W::sub(a3, shift)));
    vs = W::fmadd(vs, W::exp(W::sub(vm, shift)), W::add(e01, e23));
    vm = m_new;
  }
  for (; i < n; i += L) {
    const R a = W::load_tail(x + i, n - i, neg_inf);
    const R m_new = W::max(a, vm);
    const R shift = shift_for<T>(m_new);
    vs = W::fmadd(vs, W::exp(W::sub(vm, shift)), W::exp(W::sub(a, shift)));
    vm = m_new;
  }
  alignas(64) T m[L], s[L];
  W::storeu(m, vm);
  W::storeu(s, vs);
  LseState<T> st{m[0], s[0]};
  for (int l = 1; l < L; ++l)
    st = lse_merge(st, LseState<T>{m[l], s[l]});
  const T row_max = st.m, ls = lse_log_sum(st);
  const T x_target = x[t];
  if (grad != nullptr) {
    const R vmax = W::set1(row_max), vls = W::set1(ls), vscale = W::set1(scale);
    for (i = 0; i + L <= n; i += L) {
      const R p = W::exp(W::sub(W::sub(W::loadu(x + i), vmax), vls));
      W::storeu(grad + i, W::mul(p, vscale));
    }
    if (i < n) {
      const R p = W::exp(W::sub(W::sub(W::load_tail(x + i, n - i, W::zero()), vmax), vls));
      W::store_tail(grad + i, n - i, W::mul(p, vscale));
    }
    grad[t] = categorical_grad(x_target, row_max, ls, true, scale);
  }
  return static_cast<double>(categorical_nll(row_max, ls, x_target));
}

// The per-element loss (returned) and gradient times scale (in *grad) of
// the formulas of elbo_math.h, on fp32 lanes. kKind: static_cast<int>(Likelihood).
template <int kKind>
inline typename VecT<float>::R pointwise(typename VecT<float>::R x, typename VecT<float>::R y,
                                         typename VecT<float>::R *grad, const PointwiseConsts &c) {
  using W = VecT<float>;
  using R = typename W::R;
  const R one = W::set1(1.0f), zero = W::zero();
  if constexpr (kKind == static_cast<int>(Likelihood::kBernoulli)) {
    // max(x, 0) - x*y + log1p(exp(-|x|)); grad sigmoid(x) - y, with the
    // sigmoid from the same e = exp(-|x|) (one exp per element):
    // 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0.
    const R e = W::exp(W::sub(zero, W::abs(x)));
    const R r = W::div(one, W::add(one, e));
    const R sig = W::select(W::lt(x, zero), W::mul(e, r), r);
    *grad = W::mul(W::sub(sig, y), W::set1(c.scale));
    // bernoulli_linear_part: x * (1 - y) for x > 0, -(x * y) otherwise, 0
    // where the target factor is exactly 0 (the limits at infinite logits).
    const R w = W::sub(one, y);
    const R pos = W::select(W::eq(w, zero), zero, W::mul(x, w));
    const R neg = W::select(W::eq(y, zero), zero, W::sub(zero, W::mul(x, y)));
    return W::add(W::select(W::gt(x, zero), pos, neg), W::log1p_unit(e));
  } else if constexpr (kKind == static_cast<int>(Likelihood::kGaussian)) {
    const R d = W::sub(x, y);
    const R inv_var = W::set1(c.inv_var);
    *grad = W::mul(W::mul(d, inv_var), W::set1(c.scale));
    return W::mul(W::set1(0.5f), W::fmadd(W::mul(d, d), inv_var, W::set1(c.log_norm)));
  } else {
    const R d = W::sub(x, y);
    *grad = W::mul(W::mul(W::set1(2.0f), d), W::set1(c.scale));
    return W::mul(d, d);
  }
}

// PointwiseChunkF32 (elbo_simd_cpu.h): lanes accumulated in double, summed
// in lane order at the end. Full vectors use plain loads and stores; only
// the tail is masked (masked stores are slow on some CPUs, AMD's in particular).
template <int kKind>
double pointwise_chunk(const float *x, const float *y, int64_t n, float *grad,
                       const PointwiseConsts &c) {
  using W = VecT<float>;
  using R = typename W::R;
  constexpr int L = W::kLanes;
  typename W::Wide lo = W::zero_wide(), hi = W::zero_wide();
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    R g;
    const R l = pointwise<kKind>(W::loadu(x + i), W::loadu(y + i), &g, c);
    W::add_widened(&lo, &hi, l);
    if (grad != nullptr)
      W::storeu(grad + i, g);
  }
  if (i < n) {
    const int64_t left = n - i;
    R g;
    const R l = pointwise<kKind>(W::load_tail(x + i, left, W::zero()),
                                 W::load_tail(y + i, left, W::zero()), &g, c);
    W::add_widened(&lo, &hi, W::keep_head(l, left)); // lanes past the end add 0
    if (grad != nullptr)
      W::store_tail(grad + i, left, g);
  }
  alignas(64) double lanes[L];
  W::store_wide(lanes, lo);
  W::store_wide(lanes + L / 2, hi);
  double sum = 0.0;
  for (double v : lanes)
    sum += v;
  return sum;
}

// ValidPrefixF32 (elbo_simd_cpu.h).
inline int64_t unit_interval_prefix(const float *y, int64_t n) {
  using W = VecT<float>;
  constexpr int L = W::kLanes;
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    const auto ok = W::both(
        W::both(W::in_unit_interval(W::loadu(y + i)), W::in_unit_interval(W::loadu(y + i + L))),
        W::both(W::in_unit_interval(W::loadu(y + i + 2 * L)),
                W::in_unit_interval(W::loadu(y + i + 3 * L))));
    if (!W::all(ok))
      return i;
  }
  return i;
}
