// CPU launcher of the fused ELBO op.
//
// Work is split in units of a fixed size that does not depend on the thread
// count: one logits row for the categorical likelihood, a chunk of kChunk
// elements of an example otherwise. Each unit writes its loss into its own
// slot of a buffer and the slots are summed afterwards, sequentially in
// double precision, so the result is bitwise identical for any n_threads.
//
// Categorical rows (vector kernels): per row the max, one exp per element
// (summed and stored into the gradient row), then that row scaled to
// softmax - onehot; the three passes are pipelined over each run of rows
// with class targets (row r's exps beside row r+1's max and row r-1's
// scaling), so each row is read from memory once, by its max pass, and
// rescaled while it is still in L2. The scalar kernel keeps the online
// log-sum-exp of elbo_math.h and a second exp per element in its gradient
// pass. fp32 rows use the AVX-512 or AVX2 kernels where the CPU has them
// (elbo_simd_cpu.h: one body per formula, compiled per ISA), else the
// scalar formulas of elbo_math.h; fp64 rows have the same kernels with
// fp64 lanes; fp16/bf16 rows are widened to an fp32 scratch row and take
// the fp32 path. Threads: parallel_cpu.h; storage types: half_cpu.h.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "klanneal/buffer_pool.h"
#include "klanneal/cpu_features.h"
#include "klanneal/elbo.h"
#include "klanneal/elbo_math.h"
#include "klanneal/elbo_reduction.h"
#include "klanneal/elbo_simd_cpu.h"
#include "klanneal/elementwise_likelihoods.h"
#include "klanneal/half_cpu.h"
#include "klanneal/parallel_cpu.h"

namespace klanneal {
namespace {

using cpu::BFloat16;
using cpu::categorical_run_f32;
using cpu::categorical_run_f64;
using cpu::CategoricalRun;
using cpu::Elem;
using cpu::elementwise_chunk_f32;
using cpu::ElementwiseChunkF32;
using cpu::Grad;
using cpu::Half;
using cpu::kl_row_standard_f32;
using cpu::kl_row_standard_f64;
using cpu::KlRowStandard;
using cpu::parallel_for;
using cpu::valid_target_prefix_f32;
using cpu::ValidPrefixF32;

constexpr int64_t kChunk = 16384; // elements per unit, elementwise likelihoods
// Elements per thread below which a thread costs more than it saves. A
// categorical element costs ~0.7 ns (fp32, AVX-512), a bernoulli one ~1.8
// ns (AVX2), a gaussian one less; handing a range to another thread costs a
// few microseconds. With klanneal's own pool, a worker sharing its core with
// torch's still-spinning OpenMP threads made the image case (100K bernoulli
// elements) slower on 2 threads than on one, so the elementwise likelihoods
// had a thread per 256K elements only; on torch's OpenMP team
// (parallel_cpu.cpp) 2 threads took the image case from 1.52-1.56x to
// 1.81-1.97x the hand-written loss in the suite.
constexpr int64_t kMinElemsPerThreadCategorical = 1 << 15;
constexpr int64_t kMinElemsPerThreadElementwise = 1 << 15;
// Latent elements (B * D) from which the KL pass uses the worker threads:
// each costs an exp (two with a learned prior) and its derivatives, ~2 ns
// in the vector row kernel (fp32, AVX2): the gaussian case's 256 x 64
// latents took 44 us on one thread and 72 us on two.
constexpr int64_t kMinLatentsPerThread = 1 << 17;

// ---- categorical rows -------------------------------------------------------
// The scalar run kernel (CategoricalRun in elbo_simd_cpu.h), for CPUs
// without AVX2 and non-x86 builds.

template <typename T>
void categorical_run_scalar(const T *x, int64_t rows, int64_t V, const int64_t *target, T *grad,
                            T scale, double *loss) {
  for (int64_t r = 0; r < rows; ++r) {
    const T *xr = x + r * V;
    T *gr = grad != nullptr ? grad + r * V : nullptr;
    const int64_t t = target[r];
    LseState<T> st = lse_init<T>();
    for (int64_t i = 0; i < V; ++i)
      st = lse_push(st, xr[i]);
    const T m = st.m, ls = lse_log_sum(st);
    const T x_target = xr[t];
    if (gr != nullptr) {
      for (int64_t i = 0; i < V; ++i)
        gr[i] = categorical_grad(xr[i], m, ls, st.rest, false, scale);
      gr[t] = categorical_grad(x_target, m, ls, st.rest, true, scale);
    }
    loss[r] = static_cast<double>(categorical_nll(m, ls, x_target));
  }
}

// The run kernel for fp32 (T = float) or fp64 rows at this SIMD level.
template <typename T> CategoricalRun<T> categorical_run(SimdLevel level) {
  CategoricalRun<T> vector_run = nullptr;
  if constexpr (std::is_same_v<T, float>)
    vector_run = categorical_run_f32(level);
  else
    vector_run = categorical_run_f64(level);
  return vector_run != nullptr ? vector_run : categorical_run_scalar<T>;
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

// Index in [0, n) of the first target that likelihood L's check rejects
// (NaN included), or -1; always -1 for a likelihood without a check.
template <typename S, Likelihood L>
int64_t first_invalid_target(const S *y, int64_t n, SimdLevel level) {
  using T = typename Elem<S>::T;
  using Loss = ElementwiseLoss<L, T>;
  if constexpr (!Loss::kChecksTargets) {
    return -1;
  } else {
    int64_t i = 0;
    if constexpr (std::is_same_v<S, float>) {
      if (const ValidPrefixF32 prefix = valid_target_prefix_f32<L>(level))
        i = prefix(y, n); // skips whole blocks of valid values
    }
    (void)level;
    for (; i < n; ++i)
      if (!Loss::valid_target(Elem<S>::load(y[i])))
        return i;
    return -1;
  }
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
  const T scale = reduction_scale<T>(p);
  const CategoricalRun<float> run_f32 = categorical_run<float>(level);
  const CategoricalRun<double> run_f64 = categorical_run<double>(level);
  const G zero = G(0);
  const G nan = std::numeric_limits<G>::quiet_NaN();

  const auto is_class = [&](int64_t t) { return t != p.ignore_index && t >= 0 && t < V; };

  parallel_for(p.n_rows, n_threads, [&](int64_t begin, int64_t end) {
    std::vector<float> widened; // fp16/bf16 row in fp32
    int64_t r = begin;
    while (r < end) {
      const int64_t t = target[r];
      if (!is_class(t)) {
        const bool ignored = t == p.ignore_index;
        unit_loss[r] = ignored ? 0.0 : std::numeric_limits<double>::quiet_NaN();
        if (grad != nullptr)
          std::fill(grad + r * V, grad + (r + 1) * V, ignored ? zero : nan);
        ++r;
        continue;
      }
      // The run of rows from r whose targets are all classes.
      int64_t stop = r + 1;
      while (stop < end && is_class(target[stop]))
        ++stop;
      G *gr = grad != nullptr ? grad + r * V : nullptr;
      if constexpr (std::is_same_v<S, double>) {
        run_f64(x + r * V, stop - r, V, target + r, gr, scale, unit_loss + r);
      } else if constexpr (std::is_same_v<S, float>) {
        run_f32(x + r * V, stop - r, V, target + r, gr, scale, unit_loss + r);
      } else {
        widened.resize(V);
        for (int64_t q = r; q < stop; ++q) { // one row at a time, fp32 gradient
          for (int64_t i = 0; i < V; ++i)
            widened[i] = Elem<S>::load(x[q * V + i]);
          run_f32(widened.data(), 1, V, target + q, gr == nullptr ? nullptr : gr + (q - r) * V,
                  scale, unit_loss + q);
        }
      }
      r = stop;
    }
  });
}

// Unit u covers elements [lo, hi) of example u / chunks_per_row: kChunk of
// them, fewer at the end of the row.
struct ChunkBounds {
  int64_t lo, hi;
};
ChunkBounds chunk_bounds(const ElboParams &p, int64_t chunks_per_row, int64_t u) {
  const int64_t row = u / chunks_per_row;
  const int64_t lo = row * p.row_len + (u % chunks_per_row) * kChunk;
  return {lo, std::min(lo + kChunk, (row + 1) * p.row_len)};
}

// Elementwise likelihood L (ElementwiseLoss<L, T>), unit u covering the
// elements of chunk_bounds: the vector form for fp32 inputs where the CPU
// has one (elbo_simd_cpu.h), else the scalar form.
// unit_bad (nullptr: no check): for a likelihood that checks its targets,
// unit_bad[u] = flat index of the first invalid target of unit u, or -1,
// found while the unit's targets are still in cache.
template <typename S, Likelihood L>
void elementwise_units(const ElboParams &p, double *unit_loss, int64_t *unit_bad,
                       int64_t chunks_per_row, SimdLevel level, int n_threads) {
  using T = typename Elem<S>::T;
  const auto *x = static_cast<const S *>(p.recon_input);
  const auto *y = static_cast<const S *>(p.target);
  using G = Grad<S>;
  auto *grad = static_cast<G *>(p.grad_recon);
  const T scale = reduction_scale<T>(p);
  const ElementwiseLoss<L, T> loss(p);

  auto check_unit = [&](int64_t u, int64_t lo, int64_t hi) {
    if (unit_bad != nullptr) {
      const int64_t i = first_invalid_target<S, L>(y + lo, hi - lo, level);
      unit_bad[u] = i < 0 ? -1 : lo + i;
    }
  };
  if constexpr (std::is_same_v<S, float>) {
    const ElementwiseChunkF32<L> chunk =
        loss.has_lanes() ? elementwise_chunk_f32<L>(level) : nullptr;
    if (chunk != nullptr) {
      parallel_for(p.n_rows * chunks_per_row, n_threads, [&](int64_t begin, int64_t end) {
        for (int64_t u = begin; u < end; ++u) {
          const auto [lo, hi] = chunk_bounds(p, chunks_per_row, u);
          unit_loss[u] =
              chunk(loss, x + lo, y + lo, hi - lo, grad != nullptr ? grad + lo : nullptr, scale);
          check_unit(u, lo, hi);
        }
      });
      return;
    }
  }
  parallel_for(p.n_rows * chunks_per_row, n_threads, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const auto [lo, hi] = chunk_bounds(p, chunks_per_row, u);
      double acc = 0.0;
      for (int64_t i = lo; i < hi; ++i) {
        const T xv = Elem<S>::load(x[i]);
        const T yv = Elem<S>::load(y[i]);
        acc += static_cast<double>(loss.nll(xv, yv));
        if (grad != nullptr) // (the compiler drops nll_grad's loss: inline and pure)
          grad[i] = static_cast<G>(loss.nll_grad(xv, yv).d_x * scale);
      }
      unit_loss[u] = acc;
      check_unit(u, lo, hi);
    }
  });
}

template <typename S>
void recon_units(const ElboParams &p, double *unit_loss, int64_t *unit_bad, int64_t chunks_per_row,
                 SimdLevel level, int n_threads) {
  if (p.likelihood == Likelihood::kCategorical) {
    categorical_rows<S>(p, unit_loss, level, n_threads);
    return;
  }
  with_elementwise_likelihood(p.likelihood, [&](auto l) {
    elementwise_units<S, decltype(l)::value>(p, unit_loss, unit_bad, chunks_per_row, level,
                                             n_threads);
  });
}

// Flat index of the first invalid target of elementwise likelihood L, or -1,
// in a pass of its own (for inplace calls, which must not overwrite
// recon_input when they fail).
template <typename S, Likelihood L>
int64_t first_invalid_target_prepass(const ElboParams &p, int64_t chunks_per_row, SimdLevel level,
                                     int n_threads) {
  const auto *y = static_cast<const S *>(p.target);
  const int64_t n_units = p.n_rows * chunks_per_row;
  std::vector<int64_t> unit_bad(static_cast<size_t>(n_units));
  parallel_for(n_units, n_threads, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const auto [lo, hi] = chunk_bounds(p, chunks_per_row, u);
      const int64_t i = first_invalid_target<S, L>(y + lo, hi - lo, level);
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
template <typename S> KlElem<typename Elem<S>::T> kl_at(const ElboParams &p, int64_t k) {
  const auto *mu = static_cast<const S *>(p.mu);
  const auto *logvar = static_cast<const S *>(p.logvar);
  if (p.prior_mu == nullptr)
    return gaussian_kl_elem(Elem<S>::load(mu[k]), Elem<S>::load(logvar[k]));
  const auto *prior_mu = static_cast<const S *>(p.prior_mu);
  const auto *prior_logvar = static_cast<const S *>(p.prior_logvar);
  return gaussian_kl_elem(Elem<S>::load(mu[k]), Elem<S>::load(logvar[k]),
                          Elem<S>::load(prior_mu[k]), Elem<S>::load(prior_logvar[k]));
}

// Fills kl_b (true KL per example), klterm_b (per-example KL term before
// the capacity: free bits in "sample" mode), kl_per_dim, and the latent
// gradients; returns the batch's KL term and, in sign_b, each example's
// d term / d (term before the capacity) (elbo_reduction.h: batch_kl_term or,
// for kNone, example_kl_term; klterm_b then holds the terms after it).
template <typename S>
double kl_term(const ElboParams &p, double beta, double capacity, int n_threads, SimdLevel level,
               std::vector<double> &kl_b, std::vector<double> &klterm_b) {
  using T = typename Elem<S>::T;
  const int64_t B = p.batch, D = p.latent_dim;
  using G = Grad<S>;
  auto *grad_mu = static_cast<G *>(p.grad_mu);
  auto *grad_logvar = static_cast<G *>(p.grad_logvar);
  auto *grad_prior_mu = static_cast<G *>(p.grad_prior_mu);
  auto *grad_prior_logvar = static_cast<G *>(p.grad_prior_logvar);
  const bool any_grad = any_latent_grad(p);
  const bool sample_mode = sample_free_bits(p);
  const bool batch_mode = batch_free_bits(p);
  const T lambda = static_cast<T>(p.free_bits);
  const T weight = kl_grad_weight<T>(p, beta);

  // Pass 1, examples in parallel: each KL_bd (with its derivatives computed
  // once), the per-example sums, and the gradients times the weight and the
  // sample-mode mask. The batch-mode mask and the capacity's sign are
  // applied in pass 3, where they are not all 1.
  std::vector<T> kl(static_cast<size_t>(B * D));
  const int threads = B * D >= kMinLatentsPerThread ? n_threads : 1;
  // fp32/fp64 latents, the N(0, I) prior and no per-element mask: the
  // vector row kernel (same formulas, lanes).
  KlRowStandard<T> vector_row = nullptr;
  if constexpr (std::is_same_v<S, float>)
    vector_row = kl_row_standard_f32(level);
  else if constexpr (std::is_same_v<S, double>)
    vector_row = kl_row_standard_f64(level);
  if (p.prior_mu != nullptr || sample_mode)
    vector_row = nullptr;
  parallel_for(B, threads, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if constexpr (std::is_same_v<S, T>) {
        if (vector_row != nullptr) {
          const int64_t row = b * D;
          const auto *mu = static_cast<const T *>(p.mu) + row;
          const auto *logvar = static_cast<const T *>(p.logvar) + row;
          kl_b[b] = vector_row(mu, logvar, D, weight, kl.data() + row,
                               grad_mu != nullptr ? grad_mu + row : nullptr,
                               grad_logvar != nullptr ? grad_logvar + row : nullptr);
          klterm_b[b] = kl_b[b]; // unused in batch mode (the clamp is on the batch mean)
          continue;
        }
      }
      double kb = 0.0, tb = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t i = b * D + d;
        const KlElem<T> e = kl_at<S>(p, i);
        const KlTermElem<T> t = kl_term_elem(sample_mode, e.kl, lambda);
        kl[i] = e.kl;
        kb += static_cast<double>(e.kl);
        tb += static_cast<double>(t.term);
        if (any_grad)
          store_kl_grads(e, t.pass ? weight : T(0), i, grad_mu, grad_logvar, grad_prior_mu,
                         grad_prior_logvar);
      }
      kl_b[b] = kb;
      klterm_b[b] = tb;
    }
  });

  // Pass 2, in a fixed order: the per-dimension batch means and the totals.
  std::vector<double> dim_sum(static_cast<size_t>(D), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t d = 0; d < D; ++d)
      dim_sum[d] += static_cast<double>(kl[b * D + d]);
  // sum: what batch_kl_term takes, sum_b klterm_b or the clamped means' sum.
  std::vector<double> dim_factor(static_cast<size_t>(D), 1.0);
  bool masked = false;
  double sum = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double local = kl_dim_mean(p, dim_sum[d]);
    if (p.kl_per_dim != nullptr)
      p.kl_per_dim[d] = local;
    if (batch_mode) {
      const KlDimTerm t = batch_free_bits_dim(p, d, local);
      sum += t.term;
      if (!t.pass) {
        dim_factor[d] = 0.0;
        masked = true;
      }
    }
  }
  if (!batch_mode)
    for (int64_t b = 0; b < B; ++b)
      sum += klterm_b[b];
  // The capacity: per example (kNone) or for the batch; sign_b stays 1 without one.
  std::vector<double> sign_b(static_cast<size_t>(B), 1.0);
  double total = 0.0;
  if (p.reduction != Reduction::kNone) {
    const KlTerm t = batch_kl_term(p, sum, capacity);
    total = t.term;
    if (p.has_capacity)
      std::fill(sign_b.begin(), sign_b.end(), t.sign);
  } else if (p.has_capacity) {
    for (int64_t b = 0; b < B; ++b) {
      const KlTerm t = example_kl_term(p, klterm_b[b], capacity);
      klterm_b[b] = t.term;
      sign_b[b] = t.sign;
    }
  }

  // Pass 3: the batch-mode mask and the capacity's sign (factors of 0 and
  // +-1, so the gradients are those of one product weight * factor).
  if (any_grad && (masked || p.has_capacity)) {
    G *grads[4] = {grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar};
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t d = 0; d < D; ++d) {
        const T factor = static_cast<T>(dim_factor[d] * sign_b[b]);
        if (factor == T(1))
          continue;
        for (G *g : grads)
          if (g != nullptr)
            g[b * D + d] = static_cast<G>(static_cast<T>(g[b * D + d]) * factor);
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
                                                : kMinElemsPerThreadElementwise))));

  // Target checks: class ids (n_rows values) and, for inplace calls, the
  // targets of an elementwise likelihood that checks them before anything
  // is written; otherwise those targets in the main pass.
  const bool inplace = p.grad_recon != nullptr && p.grad_recon == p.recon_input;
  bool check_in_pass = false;
  if (p.first_invalid_target != nullptr) {
    int64_t bad = -1;
    if (categorical)
      bad = first_invalid_class(p);
    else if (checks_targets(p.likelihood) && inplace)
      bad = with_elementwise_likelihood(p.likelihood, [&](auto l) {
        return dispatch_dtype(p.recon_dtype, [&](auto s) {
          return first_invalid_target_prepass<decltype(s), decltype(l)::value>(p, chunks_per_row,
                                                                               level, n_threads);
        });
      });
    else
      check_in_pass = !categorical && checks_targets(p.likelihood);
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
  const double klterm_total = dispatch_dtype(p.latent_dtype, [&](auto s) {
    return kl_term<decltype(s)>(p, beta, capacity, p.n_threads, level, kl_b, klterm_b);
  });

  // Fixed-order sums: units of example b are consecutive.
  const int64_t units_per_example = n_units / B;
  double recon_total = 0.0, kl_total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    double recon_b = 0.0;
    for (int64_t u = b * units_per_example; u < (b + 1) * units_per_example; ++u)
      recon_b += unit_loss[u];
    if (p.reduction == Reduction::kNone)
      store_example_outputs(p, b, beta, recon_b, kl_b[b], klterm_b[b]);
    recon_total += recon_b;
    kl_total += kl_b[b];
  }
  if (p.reduction != Reduction::kNone)
    store_batch_outputs(p, beta, recon_total, kl_total, klterm_total);
}

} // namespace klanneal
