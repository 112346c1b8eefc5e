// The elementwise likelihoods of the ELBO op (every one but the categorical):
// one traits struct per likelihood, the single definition of its per-element
// loss, its gradient and what a valid target is, in the scalar form the CPU
// scalar loop and the CUDA kernel run and the vector form the SIMD body runs.
// Each is named by its entry of KLANNEAL_ELEMENTWISE_LIKELIHOODS (elbo.h),
// through which every backend instantiates it: ElementwiseLoss<L, T> below.
//
// No #include and no include guard: included in namespace klanneal by
// elementwise_likelihoods.h (the scalar forms, KLANNEAL_HD, for the CPU and
// CUDA), and again in each ISA namespace of csrc/elbo_simd_cpu.cpp under that
// ISA's target pragma, where the vector forms are compiled (as
// count_likelihoods_body.h is). The vector forms are static and read the
// constants from `self`, the struct built once per launch in namespace
// klanneal: the copy compiled for an ISA is another type.
//
// A traits struct Loss<T>, T = float (fp32/fp16/bf16 inputs) or double
// (fp64), x the reconstruction input and y the target of one element:
//   explicit Loss(const ElboParams &p)  the per-launch constants (host code)
//   nll(x, y)              the element's loss, T or double; summed in float64
//   nll_grad(x, y)         {nll, d_x}: the loss and d loss / d x, in T
//   kChecksTargets         whether targets are checked (validate=True) ...
//   valid_target(y)        ... and the check (false for NaN where it applies)
//   has_lanes()            whether the vector form applies to these constants
//   lanes<W>(self, x, y, scale, &grad)   the loss on W = simd::Vec<Isa, float>
//                          lanes, and d_x * scale into grad (fp32 only)
//   valid_lanes<W>(y)      valid_target on lanes (where kChecksTargets)
//   kLanesPrepass          lanes = lanes_from_pre(self, x, y, lanes_pre(x)): the
//                          SIMD body runs lanes_pre over a block first (see there)
// The scalar kernels sum nll and store nll_grad's d_x (both inline and pure:
// the compiler computes what they share once and drops the unused loss).
// nll_grad's result is the pattern for likelihoods with per-element
// parameters (count_likelihoods.h: a negative binomial's theta, a
// zero-inflation logit), none wired yet: they take them after y and add
// their derivatives to the result ({nll, d_x, d_theta, ...}, count_nll's
// Result), which the kernel that loads them stores beside grad_recon.
//
// The scalar and the vector form of one likelihood may round differently
// (the vector form's own exp and log1p, one FMA): each backend and SIMD
// level gives the same bits from run to run and for any thread count.

// ---- bernoulli: binary cross-entropy with logits ---------------------------------
// max(x, 0) - x*y + log1p(exp(-|x|)); soft targets y in [0, 1] allowed. The
// first two terms are written x * (1 - y) for x > 0 and -x * y otherwise,
// each taken as 0 when its target factor is exactly 0: so infinite logits
// give the limits of the loss, +inf where the target disagrees (x = +inf,
// y < 1) and 0 where it agrees exactly (x = +inf, y = 1), instead of the
// NaN of inf - inf or inf * 0. Gradient sigmoid(x) - y.
template <typename T> struct BernoulliLoss {
  struct Result {
    T nll, d_x;
  };
  static constexpr bool kChecksTargets = true;
  static constexpr bool kLanesPrepass = true;

  explicit BernoulliLoss(const ElboParams &) {}

  static KLANNEAL_HD T linear_part(T x, T y) {
    if (x > T(0)) {
      const T w = T(1) - y;
      return w == T(0) ? T(0) : x * w;
    }
    return y == T(0) ? T(0) : -(x * y);
  }
  KLANNEAL_HD T nll(T x, T y) const { return linear_part(x, y) + log1p(exp(-fabs(x))); }
  KLANNEAL_HD Result nll_grad(T x, T y) const { return {nll(x, y), T(1) / (T(1) + exp(-x)) - y}; }
  // A probability: 0 <= y <= 1 (false for NaN).
  static KLANNEAL_HD bool valid_target(T y) { return y >= T(0) && y <= T(1); }

  bool has_lanes() const { return true; }
  // e = exp(-|x|), the one exp of an element on lanes.
  template <class W> static typename W::R lanes_pre(typename W::R x) {
    return W::exp_nonpos(W::sub(W::zero(), W::abs(x)));
  }
  // The loss from e = lanes_pre(x), the gradient's sigmoid from the same e:
  // 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0.
  template <class W, class Self>
  static typename W::R lanes_from_pre(const Self &, typename W::R x, typename W::R y,
                                      typename W::R e, float scale, typename W::R *grad) {
    using R = typename W::R;
    const R one = W::set1(1.0f), zero = W::zero();
    const R r = W::div(one, W::add(one, e));
    const R sig = W::select(W::lt(x, zero), W::mul(e, r), r);
    *grad = W::mul(W::sub(sig, y), W::set1(scale));
    // linear_part as one product x * f, f = step(x) - y (step: 1 for x > 0,
    // else 0): x * (0 - y) is -(x * y) exactly, and f == 0 exactly where the
    // target factor is.
    const R f = W::sub(W::select(W::gt(x, zero), one, zero), y);
    const R linear = W::select(W::eq(f, zero), zero, W::mul(x, f));
    return W::add(linear, W::log1p_unit(e));
  }
  template <class W, class Self>
  static typename W::R lanes(const Self &self, typename W::R x, typename W::R y, float scale,
                             typename W::R *grad) {
    return lanes_from_pre<W>(self, x, y, lanes_pre<W>(x), scale, grad);
  }
  template <class W> static typename W::C valid_lanes(typename W::R y) {
    return W::both(W::ge(y, W::zero()), W::le(y, W::set1(1.0f)));
  }
};

// ---- gaussian with a fixed variance ----------------------------------------------
// 0.5 * ((x - y)^2 / var + log(2 pi var)); gradient (x - y) / var. 1/var and
// log(2 pi var) = log(2 pi) + log(var) (2 pi var overflows for var > 2.8e307)
// are formed once per launch. A var whose reciprocal overflows T (below
// 1/FLT_MAX ~ 2.9e-39 with fp32 arithmetic, ~5.6e-309 with fp64) would make
// every x == y element 0 * inf = NaN: such a var divides instead, in float64
// (d = x - y rounded in T as otherwise), so the loss is finite wherever it
// fits in float64 (it is summed in float64) and the gradient wherever it
// fits in T; only the scalar form does that.
template <typename T> struct GaussianLoss {
  struct Result {
    double nll;
    T d_x;
  };
  static constexpr bool kChecksTargets = false;
  static constexpr bool kLanesPrepass = false;

  bool divide; // 1/var overflows T
  double var, log_norm_wide;
  T inv_var, log_norm; // 1/var (0 when divide), log(2 pi var)

  explicit GaussianLoss(const ElboParams &p)
      : divide(!(1.0 / p.gaussian_var <= static_cast<double>(std::numeric_limits<T>::max()))),
        var(p.gaussian_var), log_norm_wide(1.8378770664093454835606594728112 + log(var)),
        inv_var(divide ? T(0) : static_cast<T>(1.0 / var)),
        log_norm(static_cast<T>(log_norm_wide)) {}

  KLANNEAL_HD double nll(T x, T y) const {
    if (divide) {
      const double d = static_cast<double>(x - y);
      return 0.5 * (d * d / var + log_norm_wide);
    }
    const T d = x - y;
    return static_cast<double>(T(0.5) * (d * d * inv_var + log_norm));
  }
  KLANNEAL_HD Result nll_grad(T x, T y) const {
    return {nll(x, y),
            divide ? static_cast<T>(static_cast<double>(x - y) / var) : (x - y) * inv_var};
  }
  static KLANNEAL_HD bool valid_target(T) { return true; }

  bool has_lanes() const { return !divide; }
  template <class W, class Self>
  static typename W::R lanes(const Self &self, typename W::R x, typename W::R y, float scale,
                             typename W::R *grad) {
    using R = typename W::R;
    const R d = W::sub(x, y);
    const R iv = W::set1(self.inv_var);
    *grad = W::mul(W::mul(d, iv), W::set1(scale));
    return W::mul(W::set1(0.5f), W::fmadd(W::mul(d, d), iv, W::set1(self.log_norm)));
  }
};

// ---- plain squared error -----------------------------------------------------------
// (x - y)^2; gradient 2 (x - y).
template <typename T> struct MseLoss {
  struct Result {
    T nll, d_x;
  };
  static constexpr bool kChecksTargets = false;
  static constexpr bool kLanesPrepass = false;

  explicit MseLoss(const ElboParams &) {}

  KLANNEAL_HD T nll(T x, T y) const {
    const T d = x - y;
    return d * d;
  }
  KLANNEAL_HD Result nll_grad(T x, T y) const { return {nll(x, y), T(2) * (x - y)}; }
  static KLANNEAL_HD bool valid_target(T) { return true; }

  bool has_lanes() const { return true; }
  template <class W, class Self>
  static typename W::R lanes(const Self &, typename W::R x, typename W::R y, float scale,
                             typename W::R *grad) {
    using R = typename W::R;
    const R d = W::sub(x, y);
    *grad = W::mul(W::mul(W::set1(2.0f), d), W::set1(scale));
    return W::mul(d, d);
  }
};

// ElementwiseLoss<L, T>: the traits struct of likelihood L, from its entry
// of KLANNEAL_ELEMENTWISE_LIKELIHOODS.
template <Likelihood L, typename T> struct ElementwiseLossOf;
#define KLANNEAL_ELEMENTWISE_LOSS_OF(enumerator, name, Loss)                                       \
  template <typename T> struct ElementwiseLossOf<Likelihood::enumerator, T> {                      \
    using type = Loss<T>;                                                                          \
  };
KLANNEAL_ELEMENTWISE_LIKELIHOODS(KLANNEAL_ELEMENTWISE_LOSS_OF)
#undef KLANNEAL_ELEMENTWISE_LOSS_OF
template <Likelihood L, typename T> using ElementwiseLoss = typename ElementwiseLossOf<L, T>::type;
