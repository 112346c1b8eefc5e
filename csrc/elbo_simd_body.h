// The vectorised CPU kernels of the ELBO op, written once against the Vec
// interface of simd_vec_cpu.h. Included by elbo_simd_cpu.cpp once per ISA,
// inside namespace klanneal::cpu::<isa> with `Isa` naming the traits tag and
// the ISA's target pragma in force (so every function here is compiled for
// that ISA, and only these functions). No #include and no include guard:
// it is meant to be included more than once.

template <typename T> using VecT = simd::Vec<Isa, T>;

// Categorical rows (CategoricalRun in elbo_simd_cpu.h), one exp per element
// (the exp is most of the cost: a memory-bound row would need no more).
// Per row:
//   1. the row max (4 accumulators; max's second operand wins on NaN, so the
//      max ignores NaNs, which reach the sum through their exp instead);
//   2. e_i = exp(x_i - max), summed in 4 accumulators and, with a gradient,
//      stored into grad;
//   3. grad_i = e_i * (scale / sum), and the target's entry from
//      categorical_grad.
// The passes are software-pipelined over the rows of the run: one loop over
// the columns computes row r's exps (arithmetic-bound), row r+1's max
// (loads: the row's one read from memory) and row r-1's scaling (loads and
// stores of a row still in L2), so the max and scale passes' memory
// traffic runs beside the exp's arithmetic instead of after it. Each value
// goes through the same operations in the same order as in three separate
// passes. An all -inf row shifts by 0 and sums to 0 (a NaN loss, as the
// reference); a +inf logit gives exp(inf - inf) = NaN.
template <typename T> inline T lanes_max(typename VecT<T>::R v) {
  using W = VecT<T>;
  alignas(64) T lanes[W::kLanes];
  W::storeu(lanes, v);
  T m = lanes[0];
  for (int l = 1; l < W::kLanes; ++l)
    m = lanes[l] > m ? lanes[l] : m;
  return m;
}

template <typename T> inline T lanes_sum(typename VecT<T>::R v) {
  using W = VecT<T>;
  alignas(64) T lanes[W::kLanes];
  W::storeu(lanes, v);
  T s = T(0);
  for (int l = 0; l < W::kLanes; ++l)
    s += lanes[l];
  return s;
}

// Pass 1 alone: the max of x[0, n) (the first row of a run).
template <typename T> T row_max_pass(const T *x, int64_t n) {
  using W = VecT<T>;
  using R = typename W::R;
  constexpr int L = W::kLanes;
  const R neg_inf = W::set1(-INFINITY);
  R m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf;
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    m0 = W::max(W::loadu(x + i), m0);
    m1 = W::max(W::loadu(x + i + L), m1);
    m2 = W::max(W::loadu(x + i + 2 * L), m2);
    m3 = W::max(W::loadu(x + i + 3 * L), m3);
  }
  for (; i < n; i += L)
    m0 = W::max(W::load_tail(x + i, n - i, neg_inf), m0);
  return lanes_max<T>(W::max(W::max(m0, m1), W::max(m2, m3)));
}

// Pass 3 alone: prev[0, n) *= factor (the last row of a run).
template <typename T> void row_scale_pass(T *prev, int64_t n, T factor) {
  using W = VecT<T>;
  constexpr int L = W::kLanes;
  const typename W::R f = W::set1(factor);
  int64_t i = 0;
  for (; i + L <= n; i += L)
    W::storeu(prev + i, W::mul(W::loadu(prev + i), f));
  if (i < n)
    W::store_tail(prev + i, n - i, W::mul(W::load_tail(prev + i, n - i, W::zero()), f));
}

// The sum of p[0, n) (the exps a row's pass 2 stored into grad).
template <typename T> T row_sum_pass(const T *p, int64_t n) {
  using W = VecT<T>;
  using R = typename W::R;
  constexpr int L = W::kLanes;
  R s0 = W::zero(), s1 = W::zero(), s2 = W::zero(), s3 = W::zero();
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    s0 = W::add(s0, W::loadu(p + i));
    s1 = W::add(s1, W::loadu(p + i + L));
    s2 = W::add(s2, W::loadu(p + i + 2 * L));
    s3 = W::add(s3, W::loadu(p + i + 3 * L));
  }
  for (; i < n; i += L)
    s0 = W::add(s0, W::load_tail(p + i, n - i, W::zero()));
  return lanes_sum<T>(W::add(W::add(s0, s1), W::add(s2, s3)));
}

// Pass 2 of x[0, n) (returns the sum of the exps; stores them into grad
// with kGrad), fused with pass 1 of next[0, n) (its max into *next_max,
// with kNext) and pass 3 of prev[0, n) (with kPrev).
template <typename T, bool kGrad, bool kNext, bool kPrev>
T fused_row_pass(const T *x, int64_t n, T row_max, T *grad, const T *next, T *next_max, T *prev,
                 T prev_factor) {
  using W = VecT<T>;
  using R = typename W::R;
  constexpr int L = W::kLanes;
  const R neg_inf = W::set1(-INFINITY);
  const R shift = W::set1(row_max == -INFINITY ? T(0) : row_max);
  const R f = W::set1(prev_factor);
  R s0 = W::zero(), s1 = W::zero(), s2 = W::zero(), s3 = W::zero();
  R m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf;
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    if constexpr (kNext) {
      m0 = W::max(W::loadu(next + i), m0);
      m1 = W::max(W::loadu(next + i + L), m1);
      m2 = W::max(W::loadu(next + i + 2 * L), m2);
      m3 = W::max(W::loadu(next + i + 3 * L), m3);
    }
    const R e0 = W::exp_nonpos(W::sub(W::loadu(x + i), shift));
    const R e1 = W::exp_nonpos(W::sub(W::loadu(x + i + L), shift));
    const R e2 = W::exp_nonpos(W::sub(W::loadu(x + i + 2 * L), shift));
    const R e3 = W::exp_nonpos(W::sub(W::loadu(x + i + 3 * L), shift));
    s0 = W::add(s0, e0);
    s1 = W::add(s1, e1);
    s2 = W::add(s2, e2);
    s3 = W::add(s3, e3);
    if constexpr (kGrad) {
      W::storeu(grad + i, e0);
      W::storeu(grad + i + L, e1);
      W::storeu(grad + i + 2 * L, e2);
      W::storeu(grad + i + 3 * L, e3);
    }
    if constexpr (kPrev) {
      W::storeu(prev + i, W::mul(W::loadu(prev + i), f));
      W::storeu(prev + i + L, W::mul(W::loadu(prev + i + L), f));
      W::storeu(prev + i + 2 * L, W::mul(W::loadu(prev + i + 2 * L), f));
      W::storeu(prev + i + 3 * L, W::mul(W::loadu(prev + i + 3 * L), f));
    }
  }
  for (; i < n; i += L) {
    const int64_t left = n - i;
    if constexpr (kNext)
      m0 = W::max(W::load_tail(next + i, left, neg_inf), m0);
    const R e = W::exp_nonpos(W::sub(W::load_tail(x + i, left, neg_inf), shift)); // 0 past the end
    s0 = W::add(s0, e);
    if constexpr (kGrad)
      W::store_tail(grad + i, left, e);
    if constexpr (kPrev)
      W::store_tail(prev + i, left, W::mul(W::load_tail(prev + i, left, W::zero()), f));
  }
  if constexpr (kNext)
    *next_max = lanes_max<T>(W::max(W::max(m0, m1), W::max(m2, m3)));
  return lanes_sum<T>(W::add(W::add(s0, s1), W::add(s2, s3)));
}

// LseState's rest of row x[0, n) from its pass 2: sum = the sum of every
// exp(x_i - max), 1 for each maximal element included. sum - 1 carries the
// rounding of the adds made after a lane took the max's 1 (an ulp of 1
// each), which is most of rest when the max dominates. So a confident row
// (the target is the finite max and sum < 2: a second maximal element
// would make sum >= 2, so the target is the only one) sums its other terms
// again without the 1: the exps pass 2 stored into grad (read from L2, no
// exp), or, without a gradient, the exps of x around the target. Other
// rows keep sum - 1 (exact for sum < 2^24): the hot loop is unchanged.
template <typename T>
T row_rest(const T *x, const T *grad, int64_t n, int64_t t, T x_target, T row_max, T sum) {
  if (!(x_target == row_max && sum < T(2) && std::fabs(row_max) != T(INFINITY)))
    return sum - T(1);
  if (grad != nullptr)
    return row_sum_pass(grad, t) + row_sum_pass(grad + t + 1, n - t - 1);
  return fused_row_pass<T, false, false, false>(x, t, row_max, nullptr, nullptr, nullptr, nullptr,
                                                T(0)) +
         fused_row_pass<T, false, false, false>(x + t + 1, n - t - 1, row_max, nullptr, nullptr,
                                                nullptr, nullptr, T(0));
}

template <typename T>
void categorical_run(const T *x, int64_t rows, int64_t n, const int64_t *target, T *grad, T scale,
                     double *loss) {
  if (rows <= 0)
    return;
  T row_max = row_max_pass(x, n);
  // The previous row's gradient, waiting for its scale pass (by prev_factor)
  // and then its target's entry (prev_target_grad at prev_t).
  T *prev = nullptr;
  T prev_factor = T(0), prev_target_grad = T(0);
  int64_t prev_t = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T *xr = x + r * n;
    T *gr = grad != nullptr ? grad + r * n : nullptr;
    const int64_t t = target[r];
    const T x_target = xr[t]; // before grad (which may alias x) is written
    const T *next = r + 1 < rows ? xr + n : nullptr;
    T next_max = T(0);
    T sum;
    if (gr == nullptr)
      sum = next != nullptr ? fused_row_pass<T, false, true, false>(xr, n, row_max, nullptr, next,
                                                                    &next_max, nullptr, T(0))
                            : fused_row_pass<T, false, false, false>(
                                  xr, n, row_max, nullptr, nullptr, nullptr, nullptr, T(0));
    else if (prev == nullptr)
      sum = next != nullptr ? fused_row_pass<T, true, true, false>(xr, n, row_max, gr, next,
                                                                   &next_max, nullptr, T(0))
                            : fused_row_pass<T, true, false, false>(xr, n, row_max, gr, nullptr,
                                                                    nullptr, nullptr, T(0));
    else
      sum = next != nullptr ? fused_row_pass<T, true, true, true>(xr, n, row_max, gr, next,
                                                                  &next_max, prev, prev_factor)
                            : fused_row_pass<T, true, false, true>(xr, n, row_max, gr, nullptr,
                                                                   nullptr, prev, prev_factor);
    if (prev != nullptr) // its scale pass is done
      prev[prev_t] = prev_target_grad;
    const T rest = row_rest(xr, gr, n, t, x_target, row_max, sum);
    const T ls = lse_log_sum(LseState<T>{row_max, rest});
    loss[r] = static_cast<double>(categorical_nll(row_max, ls, x_target));
    if (gr != nullptr) {
      prev = gr;
      prev_factor = scale / (T(1) + rest);
      prev_target_grad = categorical_grad(x_target, row_max, ls, rest, true, scale);
      prev_t = t;
    }
    row_max = next_max;
  }
  if (prev != nullptr) {
    row_scale_pass(prev, n, prev_factor);
    prev[prev_t] = prev_target_grad;
  }
}

// ElementwiseChunkF32 (elbo_simd_cpu.h): the vector form of likelihood Lik,
// from this ISA's copy of its traits struct (elementwise_likelihoods_body.h),
// on the constants of `loss`, the struct built once per launch in namespace
// klanneal. Lanes accumulated in double, summed in lane order at the end.
// Full vectors use plain loads and stores; only the tail is masked (masked
// stores are slow on some CPUs, AMD's in particular).
template <Likelihood Lik>
double elementwise_chunk(const klanneal::ElementwiseLoss<Lik, float> &loss, const float *x,
                         const float *y, int64_t n, float *grad, float scale) {
  using W = VecT<float>;
  using R = typename W::R;
  using Loss = ElementwiseLoss<Lik, float>; // this ISA's copy
  constexpr int L = W::kLanes;
  typename W::Wide lo = W::zero_wide(), hi = W::zero_wide();
  int64_t i = 0;
  if constexpr (Loss::kLanesPrepass) {
    // Two passes over blocks of kBlock elements: lanes_pre (bernoulli: the
    // exps) into an L1 buffer, then the rest from them. One vector's chain
    // of dependent operations (bernoulli: the exp, then a division and
    // log1p's polynomial) is ~110 cycles long, more than the out-of-order
    // window overlaps: one pass ran at ~39 cycles per vector on Zen 3, the
    // throughput bound being ~17. Split in two, more vectors are in flight:
    // 1.3-1.6x faster there (one thread, B=128 x 784). Splitting further
    // (the gradient and the loss in passes of their own) was slower. The
    // same operations in the same order: the same bits.
    constexpr int64_t kBlock = 64 * L;
    alignas(64) float pre[kBlock];
    while (i + L <= n) {
      const int64_t m = std::min<int64_t>(kBlock, (n - i) / L * L);
      for (int64_t j = 0; j < m; j += L)
        W::storeu(pre + j, Loss::template lanes_pre<W>(W::loadu(x + i + j)));
      for (int64_t j = 0; j < m; j += L) {
        R g;
        const R l = Loss::template lanes_from_pre<W>(loss, W::loadu(x + i + j), W::loadu(y + i + j),
                                                     W::loadu(pre + j), scale, &g);
        W::add_widened(&lo, &hi, l);
        if (grad != nullptr)
          W::storeu(grad + i + j, g);
      }
      i += m;
    }
  }
  for (; i + L <= n; i += L) {
    R g;
    const R l = Loss::template lanes<W>(loss, W::loadu(x + i), W::loadu(y + i), scale, &g);
    W::add_widened(&lo, &hi, l);
    if (grad != nullptr)
      W::storeu(grad + i, g);
  }
  if (i < n) {
    const int64_t left = n - i;
    R g;
    const R l = Loss::template lanes<W>(loss, W::load_tail(x + i, left, W::zero()),
                                        W::load_tail(y + i, left, W::zero()), scale, &g);
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

// ValidPrefixF32 (elbo_simd_cpu.h), for a likelihood that checks its targets.
template <Likelihood Lik> int64_t valid_target_prefix(const float *y, int64_t n) {
  using W = VecT<float>;
  using Loss = ElementwiseLoss<Lik, float>;
  constexpr int L = W::kLanes;
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    const auto ok = W::both(W::both(Loss::template valid_lanes<W>(W::loadu(y + i)),
                                    Loss::template valid_lanes<W>(W::loadu(y + i + L))),
                            W::both(Loss::template valid_lanes<W>(W::loadu(y + i + 2 * L)),
                                    Loss::template valid_lanes<W>(W::loadu(y + i + 3 * L))));
    if (!W::all(ok))
      return i;
  }
  return i;
}

// KlRowStandard (elbo_simd_cpu.h): gaussian_kl_elem of elbo_math.h (the
// N(0, I) prior) on lanes, the same operations in the same order; lanes
// past n load mu = logvar = 0, whose KL is exactly 0.
template <typename T>
double kl_row_standard(const T *mu, const T *logvar, int64_t n, T w, T *kl, T *grad_mu,
                       T *grad_logvar) {
  using W = VecT<T>;
  using R = typename W::R;
  constexpr int L = W::kLanes;
  const R one = W::set1(T(1)), half = W::set1(T(0.5)), minus_half = W::set1(T(-0.5));
  const R vw = W::set1(w);
  R sum = W::zero();                                                 // fp64 rows
  typename VecT<float>::Wide lo = VecT<float>::zero_wide(), hi = lo; // fp32 rows, widened
  for (int64_t i = 0; i < n; i += L) {
    const int64_t left = n - i;
    const bool full = left >= L;
    const R m = full ? W::loadu(mu + i) : W::load_tail(mu + i, left, W::zero());
    const R lv = full ? W::loadu(logvar + i) : W::load_tail(logvar + i, left, W::zero());
    const R var = W::exp(lv);
    const R k = W::mul(minus_half, W::sub(W::sub(W::add(one, lv), W::mul(m, m)), var));
    const R g_mu = W::mul(m, vw);
    const R g_lv = W::mul(W::mul(half, W::sub(var, one)), vw);
    if (full) {
      W::storeu(kl + i, k);
      if (grad_mu != nullptr)
        W::storeu(grad_mu + i, g_mu);
      if (grad_logvar != nullptr)
        W::storeu(grad_logvar + i, g_lv);
    } else {
      W::store_tail(kl + i, left, k);
      if (grad_mu != nullptr)
        W::store_tail(grad_mu + i, left, g_mu);
      if (grad_logvar != nullptr)
        W::store_tail(grad_logvar + i, left, g_lv);
    }
    if constexpr (std::is_same_v<T, float>)
      W::add_widened(&lo, &hi, k);
    else
      sum = W::add(sum, k);
  }
  double total = 0.0;
  if constexpr (std::is_same_v<T, float>) {
    alignas(64) double lanes[L];
    W::store_wide(lanes, lo);
    W::store_wide(lanes + L / 2, hi);
    for (double v : lanes)
      total += v;
  } else {
    alignas(64) double lanes[L];
    W::storeu(lanes, sum);
    for (double v : lanes)
      total += v;
  }
  return total;
}

// exp_nonpos_mismatches (elbo_simd_cpu.h): exp_nonpos against exp, lane by lane.
inline int64_t exp_nonpos_mismatches(uint32_t stride) {
  using W = VecT<float>;
  constexpr int L = W::kLanes;
  int64_t bad = 0;
  alignas(64) uint32_t bits[L];
  alignas(64) float a[L], b[L];
  const uint64_t step = stride < uint32_t(L) ? uint64_t(L) : uint64_t(stride);
  for (uint64_t u = 0x80000000u; u + L - 1 <= 0xFFFFFFFFu; u += step) {
    for (int l = 0; l < L; ++l)
      bits[l] = static_cast<uint32_t>(u + l);
    bits[0] = u == 0x80000000u ? 0u : bits[0]; // +0 as well as -0
    float x[L];
    std::memcpy(x, bits, sizeof(x));
    W::storeu(a, W::exp(W::loadu(x)));
    W::storeu(b, W::exp_nonpos(W::loadu(x)));
    for (int l = 0; l < L; ++l) {
      if (a[l] != a[l] && b[l] != b[l])
        continue; // both NaN
      uint32_t ia, ib;
      std::memcpy(&ia, a + l, 4);
      std::memcpy(&ib, b + l, 4);
      bad += ia != ib;
    }
  }
  return bad;
}
