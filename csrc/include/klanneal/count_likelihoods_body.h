// Count likelihoods for single-cell VAEs -- Poisson, negative binomial (NB)
// and zero-inflated NB (ZINB), in scvi-tools' parameterisation (mean mu,
// inverse dispersion theta, zero-inflation logits) -- as one traits struct
// per family over an ops traits O (see special_math_body.h): the negative
// log-likelihood of one element and, in the same pass, its gradients.
//
// No #include and no include guard: included after special_math_body.h, in
// the same namespace (count_likelihoods.h for the scalar traits; a SIMD
// translation unit once per ISA), with klanneal/count_family.h's CountFamily
// visible. Names live in namespace count_nll.
//
// Inputs: x >= 0 (a count; any finite real >= 0 is accepted), mu >= 0,
// 0 < theta < inf, zi_logits any real. No epsilon is added to any value:
// mu = 0 with x = 0 is a loss of 0, with x > 0 a loss of +inf.
//
// Method. The textbook NB log-density
//   theta log(theta/(theta+mu)) + x log(mu/(theta+mu))
//     + lgamma(x+theta) - lgamma(theta) - lgamma(x+1)
// subtracts terms of size x log x and theta log theta to get a result of
// size log x: with counts near 1e6 (or theta near 1e8) fp32 keeps no digit
// of it. Written with Stirling's remainder delta(z) = lgamma(z) - [(z-1/2)
// log z - z + log(2 pi)/2] (Loader's saddle-point form, as R's dnbinom_mu),
// with n = x + theta, d = (x - mu)/(theta + mu) and L(u) = log1p(u) - u:
//   -log p = -theta L(d) - x L(theta (mu - x) / (x (theta + mu)))
//            + [log x + log1p(x/theta)] / 2 + log(2 pi)/2
//            + delta(theta) - delta(n) + delta(x)            (x > 0)
// (check: the terms in log p of order n log n cancel exactly, and the
// identity follows by expanding each lgamma). Every term is >= 0 for x >= 1
// (L <= 0, delta decreasing), so the sum has no cancellation: over theta in
// [1e-6, 1e8], mu in {0} and [1e-10, 1e8], x up to 1e6, the loss is within
// 11 eps (fp64) / 4 eps (fp32) of the exact value, d/dmu within 2 eps, and
// d/dtheta within 17 / 13 eps of |L(-w)| + |E| (below), at every level
// (tests/test_special_math.py, against mpmath). L's arguments are passed
// with 1 + u formed as a ratio (L(u) = log(1 + u) - u), so 1 + u -> 0 (tiny
// mu, x > 0) gives a large finite loss, not log(0). theta -> inf turns it
// into the Poisson form below; Poisson is the same with theta = inf:
//   -log p = -x L((mu - x)/x) + log(x)/2 + log(2 pi)/2 + delta(x)   (x > 0)
//   -log p = mu                                                    (x = 0).
namespace count_nll {

// ---- valid inputs --------------------------------------------------------------------
// The validity rule of each input, lane by lane, over an ops traits O (first_invalid_input
// of count_recon.h with ScalarOps<T>; the CPU tile's check of whole vectors):
// mu and theta finite and > 0, counts finite, >= 0 and whole, zi_logits not
// NaN. Comparisons are ordered (false for NaN).
template <class O> struct CountInputRule {
  using R = typename O::R;
  using C = typename O::C;
  static KLANNEAL_HD R inf() { return O::set1(static_cast<typename O::T>(INFINITY)); }
  static KLANNEAL_HD C positive(R v) { return O::both(O::gt(v, O::set1(0)), O::lt(v, inf())); }
  static KLANNEAL_HD C count(R x) {
    return O::both(O::both(O::ge(x, O::set1(0)), O::lt(x, inf())), O::eq(x, O::floor(x)));
  }
  static KLANNEAL_HD C logit(R z) { return O::eq(z, z); }
  // Every input of the lane valid (a family's absent parameters: valid filler).
  static KLANNEAL_HD C all(R x, R mu, R theta, R zi) {
    return O::both(O::both(positive(mu), count(x)), O::both(positive(theta), logit(zi)));
  }
};

// ---- Poisson(mu) ---------------------------------------------------------------
// loss = mu - x log mu + lgamma(x + 1);  d loss/d mu = 1 - x/mu = (mu - x)/mu
// (x = 0: loss mu, gradient 1, also at mu = 0).
template <class O> struct Poisson {
  using R = typename O::R;
  struct Result {
    R nll;
    R d_mu;
  };

  // x = 0 alone (nll_grad's value at a zero count).
  static KLANNEAL_HD Result nll_grad_zero(R mu) { return {mu, O::set1(1)}; }

  static KLANNEAL_HD Result nll_grad(R x, R mu) {
    const typename O::C zero_count = O::eq(x, O::set1(0));
    const Result at_zero = nll_grad_zero(mu);
    const R mu_minus_x = O::sub(mu, x);
    const R u = O::div(mu_minus_x, x);
    const R rho = O::div(mu, x); // 1 + u as a ratio
    // log(x)/2 + log(2 pi)/2 - x L(u) + delta(x)
    R pos = O::fmadd(special_math::constant<O>(0.5), O::log(x),
                     special_math::constant<O>(0.91893853320467274178));
    pos = O::sub(pos, O::mul(x, special_math::log1pmx<O>(u, rho)));
    pos = O::add(pos, special_math::stirling_delta<O>(x));
    return {O::select(zero_count, at_zero.nll, pos),
            O::select(zero_count, at_zero.d_mu, O::div(mu_minus_x, mu))};
  }

  static KLANNEAL_HD R nll(R x, R mu) { return nll_grad(x, mu).nll; }

  // A count: finite and >= 0 (false for NaN).
  static KLANNEAL_HD typename O::C valid_target(R x) {
    return O::both(O::ge(x, O::set1(0)), O::lt(x, special_math::constant<O>(INFINITY)));
  }
};

// ---- NB(mu, theta) ---------------------------------------------------------------
// Gradients of loss = -log p (from the textbook form; w = mu/(theta+mu),
// q = theta/(theta+mu) = 1 - w):
//   d/d mu:    theta/(theta+mu) - x/mu + x/(theta+mu) = q (mu - x)/mu.
//   d/d theta: -[log q + 1 - q - x/(theta+mu) + psi(x+theta) - psi(theta)]
//            = -[L(-w) + E],   L(-w) = log q + w <= 0,
//              E = psi(x+theta) - psi(theta) - x/(theta+mu).
// For large theta each of log q + w, psi(x+theta) - psi(theta) and
// x/(theta+mu) is O(1/theta) while the gradient is O(1/theta^2):
//   E = D(theta, x) + x w / theta,  D(theta, x) = psi(theta+x) - psi(theta) - x/theta,
// and for theta >= stirling_min D comes from the digamma series,
//   D(t, y) = L(y/t) + y/(2 t (t+y)) - [T(t+y) - T(t)],  T(z) = log z - 1/(2z) - psi(z),
// after one step of psi(t+1) = psi(t) + 1/t for x >= 1:
//   D(theta, x) = D(theta+1, x-1) - (x-1)/(theta (theta+1)),
// which makes D exactly 0 at x = 1. (For x above theta, L(y/t) and x w/theta
// would cancel instead: there log((t+y)/t) replaces L(y/t) + y/t, see
// below.) Below stirling_min (theta small, where psi(theta) ~ -1/theta),
//   E = psi(n) - psi(theta+1) + (mu - theta (x-1))/(theta (theta+mu))   (x >= 1:
//       the 1/theta of psi(theta) taken out exactly), psi(n) - psi(theta+1) summed
//       term by term for whole x <= 8;
//   E = psi(n) - psi(theta) - x/(theta+mu)                              (x < 1).
// x = 0: loss -theta log q, d/d mu = q, d/d theta = -L(-w).
// nll() alone computes the gradients too, in registers; everything is inline
// and pure, so the compiler drops what is not used.
template <class O> struct NegBinomial {
  using R = typename O::R;
  using C = typename O::C;
  // Below stirling_min, counts up to this sum psi(x+theta) - psi(theta+1) term by term.
  static constexpr int kExactCounts = 8;
  struct Result {
    R nll;
    R d_mu;
    R d_theta;
  };

  // The pieces of x = 0, which need no count (ZINB's x = 0 is built on them;
  // the x > 0 formulas reuse tm and w).
  struct ZeroParts {
    R tm;       // theta + mu
    R w;        // mu / (theta + mu)
    R q;        // theta / (theta + mu) = d loss(0)/d mu
    R nll_zero; // -log p(0) = -theta log q >= 0
    R lw;       // L(-w) = log q + w = -d loss(0)/d theta
  };

  // The pieces ZINB shares: the loss and gradients at x = 0 and at x > 0.
  struct Parts {
    ZeroParts zero;
    R nll_pos;  // -log p(x) for x > 0
    R d_mu_pos; // d loss(x)/d mu, x > 0
    R d_theta_pos;
  };

  static KLANNEAL_HD ZeroParts zero_parts(R mu, R theta) {
    const R zero = O::set1(0);
    const R tm = O::add(theta, mu);
    const R q = O::div(theta, tm);
    const R w = O::div(mu, tm);
    // log q: a ratio in (0, 1/2) for theta < mu, else -log1p(mu/theta) with
    // mu/theta <= 1 (no overflow for tiny theta, full digits for large).
    const R log_q = O::select(O::lt(theta, mu), O::log(q),
                              O::sub(zero, special_math::log1p<O>(O::div(mu, theta))));
    // log q + w cancels to O(w^2) for small w: L's series keeps it.
    return {tm, w, q, O::sub(zero, O::mul(theta, log_q)),
            special_math::log1pmx<O>(O::sub(zero, w), q)};
  }

  // The loss and gradients at x = 0 from its pieces.
  static KLANNEAL_HD Result zero_result(const ZeroParts &z) {
    return {z.nll_zero, z.q, O::sub(O::set1(0), z.lw)};
  }

  static KLANNEAL_HD Parts parts(R x, R mu, R theta) {
    using special_math::constant;
    using special_math::log1pmx;
    using special_math::stirling_delta;
    const R zero = O::set1(0);
    const R one = constant<O>(1.0);
    const ZeroParts at_zero = zero_parts(mu, theta);
    const R tm = at_zero.tm, q = at_zero.q, w = at_zero.w;

    // -log p(x), x > 0 (the header's form). 1 + d = n/(theta+mu) and
    // 1 + u2 = (mu/x) (n/(theta+mu)) are ratios, never 1 + (something); the
    // latter not as w n / x: w = mu/(theta+mu) is subnormal in fp32 for a
    // tiny mu and a large theta (1e-37 / 4e7), and the loss ~ x log(rho2)
    // kept one digit of it.
    const R n = O::add(theta, x);
    const R x_minus_mu = O::sub(x, mu);
    const R d = O::div(x_minus_mu, tm);
    const R l1 = log1pmx<O>(d, O::div(n, tm));
    const R u2 = O::div(O::mul(q, O::sub(zero, x_minus_mu)), x);
    const R l2 = log1pmx<O>(u2, O::mul(O::div(mu, x), O::div(n, tm)));
    R nll_pos = O::add(O::log(x), special_math::log1p<O>(O::div(x, theta)));
    nll_pos = O::fmadd(constant<O>(0.5), nll_pos, constant<O>(0.91893853320467274178));
    nll_pos = O::sub(nll_pos, O::add(O::mul(theta, l1), O::mul(x, l2)));
    nll_pos = O::add(nll_pos, O::add(O::sub(stirling_delta<O>(theta), stirling_delta<O>(n)),
                                     stirling_delta<O>(x)));

    // d/d mu and E (see above).
    const R d_mu_pos = O::div(O::mul(q, O::sub(zero, x_minus_mu)), mu);
    const C from_one = O::ge(x, one);
    const R theta1 = O::select(from_one, O::add(theta, one), theta);
    const R x1 = O::select(from_one, O::sub(x, one), x);
    // theta >= stirling_min: psi(n) - psi(theta1) from the series,
    // log(rho1) + x1/(2 theta1 n) - [T(n) - T(theta1)], rho1 = n/theta1 = 1 + u1.
    // For u1 <= 1 log(rho1) = L(u1) + u1 and the O(x/theta) terms
    // u1 + [1/theta] - x/(theta+mu) are summed exactly as
    // x w/theta - [(x-1)/(theta (theta+1))]; for u1 > 1 (x above theta) that
    // sum would cancel against L(u1) instead, so log(rho1) is taken whole.
    const R u1 = O::div(x1, theta1);
    const R rho1 = O::div(n, theta1);
    const R shift = O::select(from_one, O::div(x1, O::mul(theta, theta1)), zero);
    const R near = O::add(log1pmx<O>(u1, rho1), O::sub(O::div(O::mul(x, w), theta), shift));
    const R inv_theta = O::select(from_one, O::div(one, theta), zero);
    const R far = O::sub(O::add(O::log(rho1), inv_theta), O::div(x, tm));
    const R t_diff = O::sub(special_math::digamma_stirling_tail<O>(n),
                            special_math::digamma_stirling_tail<O>(theta1));
    const R e_large = O::sub(
        O::add(O::select(O::le(u1, one), near, far), O::div(x1, O::mul(O::add(theta1, theta1), n))),
        t_diff);
    // mu - theta (x - 1) with one rounding: it cancels where mu ~ theta (x - 1)
    // (theta = 1e-6, x = 1e6, mu = 1), and its inputs are exact.
    const R e_small_rest =
        O::select(from_one, O::div(O::fma_exact(O::sub(zero, theta), x1, mu), O::mul(theta, tm)),
                  O::sub(zero, O::div(x, tm)));
    // psi(n) - psi(theta1): for a whole x <= kExactCounts the sum
    // 1/(theta+1) + ... + 1/(theta+x-1) (as one fraction), whose terms are
    // all positive; the difference of the two digammas would keep only an
    // ulp of psi(n) where it is much smaller than psi(n) (theta = 7.5, x = 2).
    R num = zero, den = one;
    for (int k = 1; k < kExactCounts; ++k) {
      const C in = O::gt(x, special_math::constant<O>(k));
      const R theta_k = O::add(theta, special_math::constant<O>(k));
      num = O::select(in, O::fmadd(num, theta_k, den), num);
      den = O::select(in, O::mul(den, theta_k), den);
    }
    const C exact =
        O::both(O::le(x, special_math::constant<O>(kExactCounts)), O::eq(x, O::floor(x)));
    const R psi_diff =
        O::select(exact, O::div(num, den),
                  O::sub(special_math::digamma<O>(n), special_math::digamma<O>(theta1)));
    const R e_small = O::add(psi_diff, e_small_rest);
    const R e = O::select(O::ge(theta, special_math::stirling_min<O>()), e_large, e_small);
    return {at_zero, nll_pos, d_mu_pos, O::sub(zero, O::add(at_zero.lw, e))};
  }

  // x = 0 alone (nll_grad's value at a zero count).
  static KLANNEAL_HD Result nll_grad_zero(R mu, R theta) {
    return zero_result(zero_parts(mu, theta));
  }

  static KLANNEAL_HD Result nll_grad(R x, R mu, R theta) {
    const Parts p = parts(x, mu, theta);
    const Result at_zero = zero_result(p.zero);
    const C zero_count = O::eq(x, O::set1(0));
    return {O::select(zero_count, at_zero.nll, p.nll_pos),
            O::select(zero_count, at_zero.d_mu, p.d_mu_pos),
            O::select(zero_count, at_zero.d_theta, p.d_theta_pos)};
  }

  static KLANNEAL_HD R nll(R x, R mu, R theta) { return nll_grad(x, mu, theta).nll; }

  static KLANNEAL_HD C valid_target(R x) { return Poisson<O>::valid_target(x); }
};

// ---- ZINB(mu, theta, zi_logits) -----------------------------------------------------
// p(x) = pi [x = 0] + (1 - pi) NB(x; mu, theta), pi = sigmoid(z), z = zi_logits,
// in log space: log pi = -softplus(-z), log(1 - pi) = -softplus(z).
//   x > 0: loss = softplus(z) + NB loss;  d/dz = sigmoid(z); mu, theta as NB.
//   x = 0: with nb0 = theta log q = log NB(0) <= 0, A = log pi, B = log(1-pi) + nb0,
//     log p(0) = logsumexp(A, B), A - B = z - nb0 (formed directly);
//     = log1p(a), a = -(1 - pi)(1 - e^nb0) = sigmoid(-z) expm1(nb0) in (-1, 0],
//       used while a >= -1/2 (p(0) >= 1/2: the logsumexp would cancel there);
//     the weights wA = pi/p(0) = sigmoid(z - nb0), wB = 1 - wA = sigmoid(nb0 - z);
//     d loss/dz     = -wA (1 - pi)(1 - e^nb0) = wA sigmoid(-z) expm1(nb0)  (<= 0; no
//                     difference of the two weights is ever taken),
//     d loss/d mu   = wB q,   d loss/d theta = -wB L(-w).
// Stable at |z| = 80 and beyond (sigmoid(-80) = 1.8e-35 is kept in fp32).
template <class O> struct ZeroInflatedNegBinomial {
  using R = typename O::R;
  using C = typename O::C;
  struct Result {
    R nll;
    R d_mu;
    R d_theta;
    R d_zi_logits;
  };

  // The loss and gradients at x = 0 from NB's zero pieces and softplus(+-z).
  static KLANNEAL_HD Result zero_result(const typename NegBinomial<O>::ZeroParts &nb,
                                        const special_math::SoftplusPair<O> &sp, R zi_logits) {
    const R zero = O::set1(0);
    const R nb0 = O::sub(zero, nb.nll_zero);
    const R gap = O::sub(zi_logits, nb0); // A - B
    const R e = O::exp(O::sub(zero, O::abs(gap)));
    const R inv = O::div(special_math::constant<O>(1.0), O::add(special_math::constant<O>(1.0), e));
    const C a_wins = O::ge(gap, zero);
    const R w_a = O::select(a_wins, inv, O::mul(e, inv)); // sigmoid(gap)
    const R w_b = O::select(a_wins, O::mul(e, inv), inv); // sigmoid(-gap)
    const R em1 = special_math::expm1<O>(nb0);
    const R a = O::mul(sp.sigmoid_neg, em1);
    const R lse =
        O::add(O::select(a_wins, O::sub(zero, sp.softplus_neg), O::sub(nb0, sp.softplus_pos)),
               special_math::log1p<O>(e));
    const R log_p0 =
        O::select(O::ge(a, special_math::constant<O>(-0.5)), special_math::log1p<O>(a), lse);
    return {O::sub(zero, log_p0), O::mul(w_b, nb.q), O::sub(zero, O::mul(w_b, nb.lw)),
            O::mul(O::mul(w_a, sp.sigmoid_neg), em1)};
  }

  // x = 0 alone (nll_grad's value at a zero count).
  static KLANNEAL_HD Result nll_grad_zero(R mu, R theta, R zi_logits) {
    return zero_result(NegBinomial<O>::zero_parts(mu, theta),
                       special_math::softplus_pair<O>(zi_logits), zi_logits);
  }

  static KLANNEAL_HD Result nll_grad(R x, R mu, R theta, R zi_logits) {
    const typename NegBinomial<O>::Parts nb = NegBinomial<O>::parts(x, mu, theta);
    const special_math::SoftplusPair<O> sp = special_math::softplus_pair<O>(zi_logits);
    const Result at_zero = zero_result(nb.zero, sp, zi_logits);
    const C zero_count = O::eq(x, O::set1(0));
    return {O::select(zero_count, at_zero.nll, O::add(sp.softplus_pos, nb.nll_pos)),
            O::select(zero_count, at_zero.d_mu, nb.d_mu_pos),
            O::select(zero_count, at_zero.d_theta, nb.d_theta_pos),
            O::select(zero_count, at_zero.d_zi_logits, sp.sigmoid_pos)};
  }

  static KLANNEAL_HD R nll(R x, R mu, R theta, R zi_logits) {
    return nll_grad(x, mu, theta, zi_logits).nll;
  }

  static KLANNEAL_HD C valid_target(R x) { return Poisson<O>::valid_target(x); }
};

// ---- one interface for every family -------------------------------------------------
// FamilyNll<F, O>::nll_grad(x, mu, theta, zi_logits) -> {nll, d_mu, d_theta, d_zi_logits}
// for the family F of count_family.h (CountFamily): the row kernels
// (count_simd_body.h, cuda/count_cuda.cu) are written once against it and
// instantiated per family from KLANNEAL_COUNT_FAMILIES. A family ignores the
// parameters it does not have (kHasTheta, kHasZi) and returns 0 for their
// gradients. nll_grad_zero(mu, theta, zi_logits) is nll_grad at x = 0, bit
// for bit (nll_grad selects the same helpers' result there), at a fraction
// of the cost: no lgamma or digamma. The CPU tile evaluates the zero counts
// of sparse data (most of a single-cell matrix) with it.
template <class O> struct CountGrads {
  typename O::R nll, d_mu, d_theta, d_zi_logits;
};

template <CountFamily F, class O> struct FamilyNll;

template <class O> struct FamilyNll<CountFamily::kPoisson, O> {
  using R = typename O::R;
  static constexpr bool kHasTheta = false, kHasZi = false;
  static KLANNEAL_HD CountGrads<O> nll_grad(R x, R mu, R, R) {
    const typename Poisson<O>::Result r = Poisson<O>::nll_grad(x, mu);
    return {r.nll, r.d_mu, O::set1(0), O::set1(0)};
  }
  static KLANNEAL_HD CountGrads<O> nll_grad_zero(R mu, R, R) {
    const typename Poisson<O>::Result r = Poisson<O>::nll_grad_zero(mu);
    return {r.nll, r.d_mu, O::set1(0), O::set1(0)};
  }
};

template <class O> struct FamilyNll<CountFamily::kNegBinomial, O> {
  using R = typename O::R;
  static constexpr bool kHasTheta = true, kHasZi = false;
  static KLANNEAL_HD CountGrads<O> nll_grad(R x, R mu, R theta, R) {
    const typename NegBinomial<O>::Result r = NegBinomial<O>::nll_grad(x, mu, theta);
    return {r.nll, r.d_mu, r.d_theta, O::set1(0)};
  }
  static KLANNEAL_HD CountGrads<O> nll_grad_zero(R mu, R theta, R) {
    const typename NegBinomial<O>::Result r = NegBinomial<O>::nll_grad_zero(mu, theta);
    return {r.nll, r.d_mu, r.d_theta, O::set1(0)};
  }
};

template <class O> struct FamilyNll<CountFamily::kZinb, O> {
  using R = typename O::R;
  static constexpr bool kHasTheta = true, kHasZi = true;
  static KLANNEAL_HD CountGrads<O> nll_grad(R x, R mu, R theta, R zi_logits) {
    const typename ZeroInflatedNegBinomial<O>::Result r =
        ZeroInflatedNegBinomial<O>::nll_grad(x, mu, theta, zi_logits);
    return {r.nll, r.d_mu, r.d_theta, r.d_zi_logits};
  }
  static KLANNEAL_HD CountGrads<O> nll_grad_zero(R mu, R theta, R zi_logits) {
    const typename ZeroInflatedNegBinomial<O>::Result r =
        ZeroInflatedNegBinomial<O>::nll_grad_zero(mu, theta, zi_logits);
    return {r.nll, r.d_mu, r.d_theta, r.d_zi_logits};
  }
};

} // namespace count_nll
