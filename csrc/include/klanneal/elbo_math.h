// Per-element math of the ELBO op and its derivatives: the one definition
// used by both the CPU kernels and the CUDA kernels, so the CPU tests
// exercise the same formulas the GPU runs. Arithmetic is in T = float for
// fp32/fp16/bf16 inputs and T = double for fp64. Here: the categorical
// rows' log-sum-exp and the Gaussian KL; the elementwise likelihoods are
// traits structs (elementwise_likelihoods_body.h), what follows the sums is
// elbo_reduction.h.
#pragma once

#include <cmath>

#include "klanneal/common.h"

namespace klanneal {

#if !defined(__CUDACC__)
// On the host, make the unqualified calls below pick the float overloads
// for T = float (plain <cmath> would find only ::exp(double) and compute in
// double). nvcc provides its own float overloads.
using std::exp;
using std::fabs;
using std::log;
using std::log1p;
#endif

// ---- categorical: online log-sum-exp --------------------------------------
// State of a running max m and rest = sum_j exp(x_j - m) over every element
// but one maximal one (the row's sum s of exp(x_j - m) is 1 + rest). The
// row's log-sum-exp is m + log1p(rest). Keeping rest rather than s keeps a
// confident row's digits: when the max dominates, s = 1 + rest rounds rest
// to an ulp of 1 (rest = 2.6e-6 kept 2% of error in fp32), while rest
// itself is a sum of small terms with a small relative error. NaN
// propagates: exp(NaN - m) is NaN.
template <typename T> struct LseState {
  T m;
  T rest;
};

template <typename T> KLANNEAL_HD LseState<T> lse_init() { return {-INFINITY, T(0)}; }

// Adds one element. Invariants: m is never NaN (NaN > m is false), rest == 0
// while m == -inf (no element is the max yet), and a NaN element makes rest
// NaN for good, so a NaN logit gives a NaN loss as in the reference. -inf
// elements add nothing; a row of only -inf ends with m = -inf and a NaN
// loss, also as the reference. A new max x turns the old one into a
// non-maximal term: rest' = (rest + 1) * exp(m - x), formed as
// rest * w + w so that no 1 + rest is rounded.
template <typename T> KLANNEAL_HD LseState<T> lse_push(LseState<T> st, T x) {
  if (x > st.m) {
    const T w = exp(st.m - x); // 0 for the first element (m = -inf, rest = 0)
    st.rest = st.rest * w + w;
    st.m = x;
  } else if (x != -INFINITY) {
    st.rest += exp(x - st.m); // a tie with the max adds its 1 here
  }
  return st;
}

// Merges two partial states (tree or lane reductions).
template <typename T> KLANNEAL_HD LseState<T> lse_merge(LseState<T> a, LseState<T> b) {
  if (b.m > a.m) {
    LseState<T> t = a;
    a = b;
    b = t;
  }
  // Now a.m >= b.m. An empty (all -inf) b has no max and rest == 0, and adds
  // nothing; a NaN rest in either carries through the sum. Otherwise b's
  // max joins a's rest with the rest of b: (b.rest + 1) * exp(b.m - a.m).
  if (b.m == -INFINITY)
    return {a.m, a.rest + b.rest};
  const T w = exp(b.m - a.m);
  return {a.m, a.rest + (b.rest * w + w)};
}

// log(s) = log1p(rest), the row's log-sum-exp minus its max. The loss and
// the gradient are formed from (m, log s) without ever forming
// lse = m + log(s): that sum rounds to one ulp of |m|, so with logits around
// 1e4 it would cost the loss (a few nats) most of its digits. x - m is exact
// for the elements that matter (Sterbenz), and log(s) lies in [0, log V].
// A +inf logit (m == +inf) gives NaN, as the reference's inf - inf does (the
// online update would leave rest = 0: an inf loss and a mostly finite gradient).
template <typename T> KLANNEAL_HD T lse_log_sum(LseState<T> st) {
  return st.m == T(INFINITY) ? T(NAN) : log1p(st.rest);
}

// Loss of one row: logsumexp(x) - x[target] = log(s) - (x[target] - m); for
// a target that is the row's max, log1p(rest) to the last digits.
template <typename T> KLANNEAL_HD T categorical_nll(T m, T log_sum, T x_target) {
  return log_sum - (x_target - m);
}

// d loss / d x_j = softmax_j - [j == target], times scale, with softmax_j =
// exp((x_j - m) - log(s)). The target term is formed in T (fp32 at least)
// before any cast to a low-precision dtype: p_t - 1 loses everything if p_t
// is first rounded to fp16/bf16. When the target is the row's (finite) max,
// p_t - 1 = 1/(1 + rest) - 1 = -rest / (1 + rest), formed from rest: p_t - 1
// would cancel to the rounding error of p_t (4e-4 relative at p_t = 0.99985
// in fp32). Ties are included: another maximal element is 1 of rest.
template <typename T>
KLANNEAL_HD T categorical_grad(T x, T m, T log_sum, T rest, bool is_target, T scale) {
  if (is_target && x == m && fabs(m) != T(INFINITY))
    return -(rest / (T(1) + rest)) * scale;
  const T p = exp((x - m) - log_sum);
  return (is_target ? p - T(1) : p) * scale;
}

// ---- Gaussian KL per element and its derivatives ----------------------------
// KL(N(mu, exp(lv)) || N(0, 1)) = -0.5 * (1 + lv - mu^2 - exp(lv)), and with a
// learned prior N(pmu, exp(plv)):
//   KL = 0.5 * (plv - lv + (exp(lv) + (mu - pmu)^2) / exp(plv) - 1).
// KlElem holds the value and d KL / d (mu, lv, pmu, plv).
template <typename T> struct KlElem {
  T kl, d_mu, d_logvar, d_prior_mu, d_prior_logvar;
};

template <typename T> KLANNEAL_HD KlElem<T> gaussian_kl_elem(T mu, T logvar) {
  const T var = exp(logvar);
  return {T(-0.5) * (T(1) + logvar - mu * mu - var), mu, T(0.5) * (var - T(1)), T(0), T(0)};
}

template <typename T>
KLANNEAL_HD KlElem<T> gaussian_kl_elem(T mu, T logvar, T prior_mu, T prior_logvar) {
  const T diff = mu - prior_mu;
  const T inv_prior_var = exp(-prior_logvar);
  const T ratio = exp(logvar - prior_logvar); // var / prior_var
  const T mahalanobis = diff * diff * inv_prior_var;
  const T d_mu = diff * inv_prior_var;
  return {T(0.5) * ((prior_logvar - logvar) + ratio + mahalanobis - T(1)), d_mu,
          T(0.5) * (ratio - T(1)), -d_mu, T(0.5) * (T(1) - ratio - mahalanobis)};
}

// The latent gradients of one element, KL's derivatives times the weight w
// (beta, the reduction's scale, the free-bits mask and the capacity's
// sign); a null pointer skips that gradient.
template <typename G, typename T>
KLANNEAL_HD void store_kl_grads(const KlElem<T> &e, T w, int64_t k, G *grad_mu, G *grad_logvar,
                                G *grad_prior_mu, G *grad_prior_logvar) {
  if (grad_mu != nullptr)
    grad_mu[k] = static_cast<G>(e.d_mu * w);
  if (grad_logvar != nullptr)
    grad_logvar[k] = static_cast<G>(e.d_logvar * w);
  if (grad_prior_mu != nullptr)
    grad_prior_mu[k] = static_cast<G>(e.d_prior_mu * w);
  if (grad_prior_logvar != nullptr)
    grad_prior_logvar[k] = static_cast<G>(e.d_prior_logvar * w);
}

} // namespace klanneal
