// Array loops of csrc/special_cpu.cpp over special_math_body.h and
// count_likelihoods_body.h, written once against an ops traits OpsT<T>
// (ScalarOps or simd::Vec<Isa, T>) that the including namespace defines,
// next to its instantiation of the two bodies. No #include and no include
// guard: included once per SIMD level.

template <typename T> typename OpsT<T>::R special_apply(SpecialFn fn, typename OpsT<T>::R x) {
  using O = OpsT<T>;
  switch (fn) {
  case SpecialFn::kLgamma:
    return special_math::lgamma<O>(x);
  case SpecialFn::kDigamma:
    return special_math::digamma<O>(x);
  case SpecialFn::kStirlingDelta:
    return special_math::stirling_delta<O>(x);
  case SpecialFn::kLog:
    return O::log(x);
  case SpecialFn::kLog1p:
    return special_math::log1p<O>(x);
  case SpecialFn::kExpm1:
    return special_math::expm1<O>(x);
  case SpecialFn::kLog1pmx:
    return special_math::log1pmx<O>(x, O::add(O::set1(T(1)), x));
  case SpecialFn::kSoftplus:
    return special_math::softplus_pair<O>(x).softplus_pos;
  case SpecialFn::kLogSigmoid:
    return O::sub(O::set1(T(0)), special_math::softplus_pair<O>(x).softplus_neg);
  case SpecialFn::kSigmoid:
    return special_math::softplus_pair<O>(x).sigmoid_pos;
  }
  return O::set1(T(NAN));
}

// Loads lane-block i (a tail block of `left` < kLanes lanes filled with 1).
template <typename T> typename OpsT<T>::R load_block(const T *p, int64_t i, int64_t left) {
  using O = OpsT<T>;
  if constexpr (O::kLanes > 1) {
    if (left < O::kLanes)
      return O::load_tail(p + i, left, O::set1(T(1)));
  }
  return O::loadu(p + i);
}

template <typename T> void store_block(T *p, int64_t i, int64_t left, typename OpsT<T>::R v) {
  using O = OpsT<T>;
  if constexpr (O::kLanes > 1) {
    if (left < O::kLanes) {
      O::store_tail(p + i, left, v);
      return;
    }
  }
  O::storeu(p + i, v);
}

template <typename T> void special_map(SpecialFn fn, const T *x, T *out, int64_t n) {
  for (int64_t i = 0; i < n; i += OpsT<T>::kLanes)
    store_block(out, i, n - i, special_apply<T>(fn, load_block(x, i, n - i)));
}

template <typename T>
void count_map(CountFamily family, const T *x, const T *mu, const T *theta, const T *zi_logits,
               T *nll, T *d_mu, T *d_theta, T *d_zi, int64_t n) {
  using O = OpsT<T>;
  using R = typename O::R;
  const R zero = O::set1(T(0));
  for (int64_t i = 0; i < n; i += O::kLanes) {
    const int64_t left = n - i;
    const R xv = load_block(x, i, left), mv = load_block(mu, i, left);
    R loss = zero, gm = zero, gt = zero, gz = zero;
    if (family == CountFamily::kPoisson) {
      const auto r = count_nll::Poisson<O>::nll_grad(xv, mv);
      loss = r.nll;
      gm = r.d_mu;
    } else if (family == CountFamily::kNegBinomial) {
      const auto r = count_nll::NegBinomial<O>::nll_grad(xv, mv, load_block(theta, i, left));
      loss = r.nll;
      gm = r.d_mu;
      gt = r.d_theta;
    } else {
      const auto r = count_nll::ZeroInflatedNegBinomial<O>::nll_grad(
          xv, mv, load_block(theta, i, left), load_block(zi_logits, i, left));
      loss = r.nll;
      gm = r.d_mu;
      gt = r.d_theta;
      gz = r.d_zi_logits;
    }
    store_block(nll, i, left, loss);
    store_block(d_mu, i, left, gm);
    store_block(d_theta, i, left, gt);
    store_block(d_zi, i, left, gz);
  }
}
