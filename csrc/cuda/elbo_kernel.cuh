// CUDA kernels of the fused ELBO op (launched by elbo_cuda.cu).
//
// Work is split into four kernels, enqueued in this order on one stream:
//
//   1. recon:    categorical_warp_kernel / categorical_block_kernel (one warp
//                or one block per row of logits) or elementwise_kernel (one
//                block per chunk of an example's row, the scalar form of the
//                likelihood's traits struct). Writes one float64
//                partial loss per row (chunk) to the workspace and, in the
//                same pass, the gradient w.r.t. recon_input.
//   2. example:  one block per example: sums the example's recon partials and
//                its KL over the latent dimensions (true KL and the per-sample
//                free-bits term); writes the mu/logvar gradients unless the
//                free-bits mask depends on the batch mean.
//   3. kl_dims:  one block per latent dimension: kl_per_dim = mean_b KL_bd,
//                and the gradients of "batch" free bits, whose mask needs that
//                mean first.
//   4. finalize: a single block reduces the per-example values in a fixed
//                order and writes loss / recon / kl / beta_out (float64).
//
// What is done with the sums (the reduction's scale, free bits, the
// capacity, the outputs) is klanneal/elbo_reduction.h, shared with the CPU.
//
// No floating-point atomics anywhere: every sum is a CUB block (or warp)
// reduction over a fixed assignment of elements to threads, so the loss is
// bitwise identical from run to run. Nothing here synchronises with the host;
// beta is read (or evaluated from the schedule and the step) on the device.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>

#include "klanneal/elbo.h"
#include "klanneal/elbo_math.h"
#include "klanneal/elbo_reduction.h"
#include "klanneal/elementwise_likelihoods.h"
#include "klanneal/schedule.h"

namespace klanneal {
namespace cuda {

// Threads per block of the block-per-row, per-example and finalize kernels.
constexpr int kBlockThreads = 256;
// Rows of at most this many classes get one warp each; longer rows a block.
constexpr int64_t kWarpRowMaxLen = 1024;
constexpr int kWarpsPerBlock = kBlockThreads / 32;
// Elements of a non-categorical example row handled by one block: long rows
// (images) are split so that small batches still fill the GPU. A multiple of
// every vector width, so each chunk starts as aligned as its row.
constexpr int64_t kElementwiseChunk = 4096;

// ---- element types -----------------------------------------------------------
// Arithmetic in float for fp32/fp16/bf16 inputs, in double for fp64.
template <typename T> struct AccType {
  using type = float;
};
template <> struct AccType<double> {
  using type = double;
};
template <typename T> using Acc = typename AccType<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// 16-byte vectors: 4 floats, 2 doubles, 8 halves / bfloat16s per load.
constexpr int kVectorBytes = 16;
template <typename T> constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(T));

template <typename T> struct alignas(kVectorBytes) Packed {
  T v[kVec<T>];
};

// Gradients are stored in Acc<T> (ElboParams: fp32 for fp16/bf16 inputs), a
// vector of them per input vector.
template <typename T> struct alignas(kVectorBytes) GradPacked {
  Acc<T> v[kVec<T>];
};

__device__ __forceinline__ bool is_vector_aligned(const void *ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % kVectorBytes == 0;
}

// ---- latents -------------------------------------------------------------------
// KL of latent element k, against the learned prior if there is one.
template <typename T>
__device__ __forceinline__ KlElem<Acc<T>> kl_at(const ElboParams &p, int64_t k) {
  const T *mu = static_cast<const T *>(p.mu);
  const T *logvar = static_cast<const T *>(p.logvar);
  if (p.prior_mu == nullptr)
    return gaussian_kl_elem(to_acc(mu[k]), to_acc(logvar[k]));
  const T *prior_mu = static_cast<const T *>(p.prior_mu);
  const T *prior_logvar = static_cast<const T *>(p.prior_logvar);
  return gaussian_kl_elem(to_acc(mu[k]), to_acc(logvar[k]), to_acc(prior_mu[k]),
                          to_acc(prior_logvar[k]));
}

// Stores element k's latent gradients, KL's derivatives times w.
template <typename T>
__device__ __forceinline__ void store_latent_grads(const ElboParams &p, const KlElem<Acc<T>> &e,
                                                   Acc<T> w, int64_t k) {
  using A = Acc<T>;
  store_kl_grads(e, w, k, static_cast<A *>(p.grad_mu), static_cast<A *>(p.grad_logvar),
                 static_cast<A *>(p.grad_prior_mu), static_cast<A *>(p.grad_prior_logvar));
}

// ---- reduction operators for CUB ------------------------------------------------
template <typename A> struct LseMergeOp {
  __device__ __forceinline__ LseState<A> operator()(const LseState<A> &a,
                                                    const LseState<A> &b) const {
    return lse_merge(a, b);
  }
};

struct DoubleSum {
  __device__ __forceinline__ double operator()(double a, double b) const { return a + b; }
};

// The three running float64 sums of an example (or of the batch), reduced
// together: one block reduction and one barrier instead of three.
struct ElboSums {
  double recon;   // reconstruction NLL
  double kl;      // true KL
  double kl_term; // KL term after free bits, before the capacity
};
struct ElboSumsOp {
  __device__ __forceinline__ ElboSums operator()(const ElboSums &x, const ElboSums &y) const {
    return {x.recon + y.recon, x.kl + y.kl, x.kl_term + y.kl_term};
  }
};

// ---- categorical rows ----------------------------------------------------------
// Both passes over a row use the same assignment of elements to the `lanes`
// threads (thread `lane` takes vectors lane, lane + lanes, ... and then the
// same pattern over the scalar tail), so with inplace (grad aliases logits)
// every element is written only by the thread that read it, after it read
// it: pass 2 re-reads x_j right before overwriting it.

// Pass 1: this thread's online log-sum-exp state over its share of the row.
template <typename T>
__device__ __forceinline__ LseState<Acc<T>> row_lse_partial(const T *x, int64_t len,
                                                            bool vectorised, int lane, int lanes) {
  LseState<Acc<T>> st = lse_init<Acc<T>>();
  int64_t tail_begin = 0;
  if (vectorised) {
    const int64_t n_vec = len / kVec<T>;
    const Packed<T> *xv = reinterpret_cast<const Packed<T> *>(x);
    for (int64_t i = lane; i < n_vec; i += lanes) {
      const Packed<T> pk = xv[i];
#pragma unroll
      for (int k = 0; k < kVec<T>; ++k)
        st = lse_push(st, to_acc(pk.v[k]));
    }
    tail_begin = n_vec * kVec<T>;
  }
  for (int64_t j = tail_begin + lane; j < len; j += lanes)
    st = lse_push(st, to_acc(x[j]));
  return st;
}

// Pass 2: grad_j = (softmax_j - [j == target]) * scale, the target term
// formed in Acc (fp32 at least) by categorical_grad before the cast (from
// the row's rest when the target is its max).
template <typename T>
__device__ __forceinline__ void
row_write_grad(const T *x, Acc<T> *grad, int64_t len, bool vectorised, int lane, int lanes,
               Acc<T> m, Acc<T> log_sum, Acc<T> rest, int64_t target, Acc<T> scale) {
  int64_t tail_begin = 0;
  if (vectorised) {
    const int64_t n_vec = len / kVec<T>;
    const Packed<T> *xv = reinterpret_cast<const Packed<T> *>(x);
    GradPacked<T> *gv = reinterpret_cast<GradPacked<T> *>(grad);
    for (int64_t i = lane; i < n_vec; i += lanes) {
      const Packed<T> pk = xv[i];
      GradPacked<T> out;
#pragma unroll
      for (int k = 0; k < kVec<T>; ++k) {
        const int64_t j = i * kVec<T> + k;
        out.v[k] = categorical_grad(to_acc(pk.v[k]), m, log_sum, rest, j == target, scale);
      }
      gv[i] = out;
    }
    tail_begin = n_vec * kVec<T>;
  }
  for (int64_t j = tail_begin + lane; j < len; j += lanes) {
    grad[j] = categorical_grad(to_acc(x[j]), m, log_sum, rest, j == target, scale);
  }
}

// Ignored rows get a zero gradient, rows with an invalid target a NaN one.
template <typename A>
__device__ __forceinline__ void row_fill(A *grad, int64_t len, int lane, int lanes, A value) {
  for (int64_t j = lane; j < len; j += lanes)
    grad[j] = value;
}

// What a row's target asks for. Out-of-range targets are never used as an
// index: the row's loss is NaN (Python validates first when validate=True).
enum class RowKind { kNormal, kIgnored, kInvalid };

__device__ __forceinline__ RowKind row_kind(int64_t target, int64_t len, int64_t ignore_index) {
  if (target == ignore_index)
    return RowKind::kIgnored;
  if (target < 0 || target >= len)
    return RowKind::kInvalid;
  return RowKind::kNormal;
}

// One warp per row, for short rows (V <= kWarpRowMaxLen): a block per row
// would leave most of its threads idle.
//   partials: [n_rows] float64, the loss of each row
//   scale:    d loss / d row loss (1/B for batchmean, else 1)
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    categorical_warp_kernel(const ElboParams p, double *partials, Acc<T> scale) {
  using A = Acc<T>;
  using WarpReduce = cub::WarpReduce<LseState<A>>;
  __shared__ typename WarpReduce::TempStorage temp[kWarpsPerBlock];
  __shared__ A row_max[kWarpsPerBlock], row_log_sum[kWarpsPerBlock], row_rest[kWarpsPerBlock];

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t len = p.row_len;
  const T *logits = static_cast<const T *>(p.recon_input);
  const int64_t *target = static_cast<const int64_t *>(p.target);
  A *grad = static_cast<A *>(p.grad_recon);
  const A nan = A(NAN);

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < p.n_rows;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    // All 32 lanes of the warp work on this row: every branch below that
    // depends on the row is warp-uniform.
    const int64_t t = target[row];
    const T *x = logits + row * len;
    A *g = grad == nullptr ? nullptr : grad + row * len;
    const RowKind kind = row_kind(t, len, p.ignore_index);
    if (kind != RowKind::kNormal) {
      if (lane == 0)
        partials[row] = kind == RowKind::kIgnored ? 0.0 : double(NAN);
      if (g != nullptr)
        row_fill(g, len, lane, 32, kind == RowKind::kIgnored ? A(0) : nan);
      continue;
    }
    const bool vectorised = is_vector_aligned(x) && (g == nullptr || is_vector_aligned(g));
    // Read before the reduction: no lane writes the row until after it.
    const A x_target = lane == 0 ? to_acc(x[t]) : A(0);
    LseState<A> st = row_lse_partial(x, len, vectorised, lane, 32);
    st = WarpReduce(temp[warp]).Reduce(st, LseMergeOp<A>{});
    if (lane == 0) {
      const A log_sum = lse_log_sum(st);
      row_max[warp] = st.m;
      row_log_sum[warp] = log_sum;
      row_rest[warp] = st.rest;
      partials[row] = static_cast<double>(categorical_nll(st.m, log_sum, x_target));
    }
    __syncwarp();
    if (g != nullptr) {
      row_write_grad(x, g, len, vectorised, lane, 32, row_max[warp], row_log_sum[warp],
                     row_rest[warp], t, scale);
    }
    // row_max, row_log_sum, row_rest and temp of this warp are reused by its next row.
    __syncwarp();
  }
}

// One block of kBlockThreads per row, for long rows.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    categorical_block_kernel(const ElboParams p, double *partials, Acc<T> scale) {
  using A = Acc<T>;
  using BlockReduce = cub::BlockReduce<LseState<A>, kBlockThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  __shared__ A row_max, row_log_sum, row_rest;

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t len = p.row_len;
  const T *logits = static_cast<const T *>(p.recon_input);
  const int64_t *target = static_cast<const int64_t *>(p.target);
  A *grad = static_cast<A *>(p.grad_recon);
  const A nan = A(NAN);

  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    // Every branch below that depends on the row is block-uniform, so all
    // threads reach the barriers together.
    const int64_t t = target[row];
    const T *x = logits + row * len;
    A *g = grad == nullptr ? nullptr : grad + row * len;
    const RowKind kind = row_kind(t, len, p.ignore_index);
    if (kind != RowKind::kNormal) {
      if (tid == 0)
        partials[row] = kind == RowKind::kIgnored ? 0.0 : double(NAN);
      if (g != nullptr) {
        row_fill(g, len, tid, kBlockThreads, kind == RowKind::kIgnored ? A(0) : nan);
      }
      continue; // no shared memory touched: no barrier needed
    }
    const bool vectorised = is_vector_aligned(x) && (g == nullptr || is_vector_aligned(g));
    const A x_target = tid == 0 ? to_acc(x[t]) : A(0);
    LseState<A> st = row_lse_partial(x, len, vectorised, tid, kBlockThreads);
    st = BlockReduce(temp).Reduce(st, LseMergeOp<A>{});
    if (tid == 0) {
      const A log_sum = lse_log_sum(st);
      row_max = st.m;
      row_log_sum = log_sum;
      row_rest = st.rest;
      partials[row] = static_cast<double>(categorical_nll(st.m, log_sum, x_target));
    }
    // Also orders thread 0's read of x[t] before any write of the row.
    __syncthreads();
    if (g != nullptr) {
      row_write_grad(x, g, len, vectorised, tid, kBlockThreads, row_max, row_log_sum, row_rest, t,
                     scale);
    }
    // row_max, row_log_sum, row_rest and temp are reused by the next row.
    __syncthreads();
  }
}

// ---- elementwise likelihoods ---------------------------------------------------------
// One block per (example row, chunk of kElementwiseChunk elements), the
// per-element loss and gradient of likelihood L's traits struct
// (elementwise_likelihoods_body.h).
//   partials: [n_rows * chunks_per_row] float64, chunk sums, row-major
//   scale:    d loss / d element loss (reduction_scale)
// Each element is read and its gradient written by the same thread, so an
// aliased grad_recon (inplace) is safe.
template <typename T, Likelihood L>
__global__ void __launch_bounds__(kBlockThreads)
    elementwise_kernel(const ElboParams p, double *partials, int64_t chunks_per_row,
                       ElementwiseLoss<L, Acc<T>> loss, Acc<T> scale) {
  using A = Acc<T>;
  using BlockReduce = cub::BlockReduce<double, kBlockThreads>;
  __shared__ typename BlockReduce::TempStorage temp;

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t len = p.row_len;
  const T *input = static_cast<const T *>(p.recon_input);
  const T *target = static_cast<const T *>(p.target);
  A *grad = static_cast<A *>(p.grad_recon);
  const int64_t n_items = p.n_rows * chunks_per_row;

  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
    const int64_t row = item / chunks_per_row;
    const int64_t begin = (item % chunks_per_row) * kElementwiseChunk;
    const int64_t n = (len - begin < kElementwiseChunk) ? len - begin : kElementwiseChunk;
    const int64_t offset = row * len + begin;
    const T *x = input + offset;
    const T *y = target + offset;
    A *g = grad == nullptr ? nullptr : grad + offset;
    const bool vectorised =
        is_vector_aligned(x) && is_vector_aligned(y) && (g == nullptr || is_vector_aligned(g));

    double sum = 0.0;
    int64_t tail_begin = 0;
    if (vectorised) {
      const int64_t n_vec = n / kVec<T>;
      const Packed<T> *xv = reinterpret_cast<const Packed<T> *>(x);
      const Packed<T> *yv = reinterpret_cast<const Packed<T> *>(y);
      GradPacked<T> *gv = reinterpret_cast<GradPacked<T> *>(g);
      for (int64_t i = tid; i < n_vec; i += kBlockThreads) {
        const Packed<T> xp = xv[i];
        const Packed<T> yp = yv[i];
        GradPacked<T> out;
#pragma unroll
        for (int k = 0; k < kVec<T>; ++k) {
          const A xa = to_acc(xp.v[k]);
          const A ya = to_acc(yp.v[k]);
          sum += static_cast<double>(loss.nll(xa, ya));
          if (g != nullptr) // (nll_grad's loss is dropped: inline and pure)
            out.v[k] = loss.nll_grad(xa, ya).d_x * scale;
        }
        if (g != nullptr)
          gv[i] = out;
      }
      tail_begin = n_vec * kVec<T>;
    }
    for (int64_t j = tail_begin + tid; j < n; j += kBlockThreads) {
      const A xa = to_acc(x[j]);
      const A ya = to_acc(y[j]);
      sum += static_cast<double>(loss.nll(xa, ya));
      if (g != nullptr)
        g[j] = loss.nll_grad(xa, ya).d_x * scale;
    }
    sum = BlockReduce(temp).Reduce(sum, DoubleSum{});
    if (tid == 0)
      partials[item] = sum;
    __syncthreads(); // temp is reused by the next item
  }
}

// ---- per example: recon sum and KL ----------------------------------------------
// One block per example.
//   partials:   [B * partials_per_example] float64 from the recon kernel
//   recon_ex:   [B] float64, the example's reconstruction loss
//   kl_ex:      [B] float64, sum_d KL_bd (true KL)
//   term_ex:    [B] float64, the example's KL term before the capacity
//               (sum_d kl_term_elem: sample free bits clamp each KL_bd)
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    example_kernel(const ElboParams p, const double *partials, int64_t partials_per_example,
                   double *recon_ex, double *kl_ex, double *term_ex) {
  using A = Acc<T>;
  using BlockReduce = cub::BlockReduce<ElboSums, kBlockThreads>;
  __shared__ typename BlockReduce::TempStorage temp;

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t dims = p.latent_dim;
  const bool sample = sample_free_bits(p);
  // Batch free bits: the mask needs the batch mean, kl_dims_kernel writes
  // those gradients. With a capacity, capacity_grad_kernel applies its sign
  // afterwards.
  const bool write_grads = any_latent_grad(p) && !batch_free_bits(p);
  const A lambda = static_cast<A>(p.free_bits);
  const A weight = write_grads ? kl_grad_weight<A>(p, resolve_beta(p)) : A(0);

  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    ElboSums acc{0.0, 0.0, 0.0};
    const double *part = partials + b * partials_per_example;
    for (int64_t i = tid; i < partials_per_example; i += kBlockThreads)
      acc.recon += part[i];
    for (int64_t d = tid; d < dims; d += kBlockThreads) {
      const int64_t k = b * dims + d;
      const KlElem<A> e = kl_at<T>(p, k);
      const KlTermElem<A> t = kl_term_elem(sample, e.kl, lambda);
      acc.kl += static_cast<double>(e.kl);
      acc.kl_term += static_cast<double>(t.term);
      if (write_grads)
        store_latent_grads<T>(p, e, t.pass ? weight : A(0), k);
    }
    acc = BlockReduce(temp).Reduce(acc, ElboSumsOp{});
    if (tid == 0) {
      recon_ex[b] = acc.recon;
      kl_ex[b] = acc.kl;
      term_ex[b] = acc.kl_term;
    }
    __syncthreads(); // temp is reused by the next example
  }
}

// ---- per latent dimension: kl_per_dim and batch free bits -----------------------------
// One block per latent dimension d: kl_per_dim[d] = mean_b KL_bd, summed in
// float64 in a fixed order. With batch free bits the gradient of
// max(lambda, mean_b KL_bd) passes to every example where the mean >= lambda
// (batch_free_bits_dim). Reads are strided by D; B * D is small next to the
// logits.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads) kl_dims_kernel(const ElboParams p) {
  using A = Acc<T>;
  using BlockReduce = cub::BlockReduce<double, kBlockThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  __shared__ bool dim_passes;

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t dims = p.latent_dim;
  const bool write_grads = any_latent_grad(p) && batch_free_bits(p);
  const A weight = write_grads ? kl_grad_weight<A>(p, resolve_beta(p)) : A(0);

  for (int64_t d = blockIdx.x; d < dims; d += gridDim.x) {
    double sum = 0.0;
    for (int64_t b = tid; b < p.batch; b += kBlockThreads) {
      sum += static_cast<double>(kl_at<T>(p, b * dims + d).kl);
    }
    sum = BlockReduce(temp).Reduce(sum, DoubleSum{});
    if (tid == 0) {
      const double mean = kl_dim_mean(p, sum);
      p.kl_per_dim[d] = mean;
      dim_passes = batch_free_bits_dim(p, d, mean).pass;
    }
    __syncthreads();
    if (write_grads) {
      const A f = dim_passes ? weight : A(0);
      for (int64_t b = tid; b < p.batch; b += kBlockThreads) {
        const int64_t k = b * dims + d;
        store_latent_grads<T>(p, kl_at<T>(p, k), f, k);
      }
    }
    __syncthreads(); // temp and dim_passes are reused by the next dimension
  }
}

// ---- finalize: a single block, fixed order --------------------------------------
// Reduces the per-example values and writes the float64 outputs.
//   loss, recon, kl, kl_weight: [B] for kNone, else [1]; beta_out: [1].
//   signs: [B] for kNone, else [1]: d |t - C| / d t of the capacity (1
//          without one), read by capacity_grad_kernel.
// Reads kl_per_dim (written by kl_dims_kernel) for batch free bits.
__global__ void __launch_bounds__(kBlockThreads)
    finalize_kernel(const ElboParams p, const double *recon_ex, const double *kl_ex,
                    const double *term_ex, double *signs) {
  using BlockReduce = cub::BlockReduce<ElboSums, kBlockThreads>;
  __shared__ typename BlockReduce::TempStorage temp;

  const int tid = static_cast<int>(threadIdx.x);
  const double beta = resolve_beta(p);
  const double capacity = p.has_capacity ? resolve_capacity(p) : 0.0;
  if (tid == 0)
    p.beta_out[0] = beta;

  if (p.reduction == Reduction::kNone) {
    // Per example; batch free bits is rejected for kNone by the launcher.
    for (int64_t b = tid; b < p.batch; b += kBlockThreads) {
      const KlTerm t = example_kl_term(p, term_ex[b], capacity);
      signs[b] = t.sign;
      store_example_outputs(p, b, beta, recon_ex[b], kl_ex[b], t.term);
    }
    return;
  }

  // acc.kl_term: sum_b term_ex, or with batch free bits sum_d of the clamped means.
  const bool batch_free = batch_free_bits(p);
  ElboSums acc{0.0, 0.0, 0.0};
  for (int64_t b = tid; b < p.batch; b += kBlockThreads) {
    acc.recon += recon_ex[b];
    acc.kl += kl_ex[b];
    if (!batch_free)
      acc.kl_term += term_ex[b];
  }
  if (batch_free) {
    for (int64_t d = tid; d < p.latent_dim; d += kBlockThreads)
      acc.kl_term += batch_free_bits_dim(p, d, p.kl_per_dim[d]).term;
  }
  acc = BlockReduce(temp).Reduce(acc, ElboSumsOp{});
  if (tid == 0) {
    const KlTerm t = batch_kl_term(p, acc.kl_term, capacity);
    signs[0] = t.sign;
    store_batch_outputs(p, beta, acc.recon, acc.kl, t.term);
  }
}

// ---- capacity: the sign of |t - C| on the latent gradients ------------------------
// Runs after finalize_kernel when a capacity is set: every latent gradient
// of example b is multiplied by signs[b] (kNone) or signs[0].
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    capacity_grad_kernel(const ElboParams p, const double *signs) {
  using A = Acc<T>;
  A *grads[4] = {static_cast<A *>(p.grad_mu), static_cast<A *>(p.grad_logvar),
                 static_cast<A *>(p.grad_prior_mu), static_cast<A *>(p.grad_prior_logvar)};
  const int64_t n = p.batch * p.latent_dim;
  const bool per_example = p.reduction == Reduction::kNone;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const A sign = static_cast<A>(signs[per_example ? k / p.latent_dim : 0]);
    for (A *g : grads) {
      if (g != nullptr)
        g[k] *= sign;
    }
  }
}

} // namespace cuda
} // namespace klanneal
