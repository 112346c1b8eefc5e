// launch_count_recon_cuda (count_recon.h): the count reconstruction kernel on
// CUDA, with the CPU launcher's tiles and partial sums.
//
//   1. recon_tile_kernel: one block of kCountGeneBlock threads per tile of
//      kCountGeneBlock genes x kCountRowChunkCuda examples (grid-stride over
//      tiles), one gene per thread, examples in order. Per example a CUB block
//      reduction of the losses (and of the per-example parameters' gradients)
//      into the tile's float64 partial; per gene a float64 running sum over
//      the tile's examples (per-gene and scalar parameters); grad_mu and the
//      per-element gradients written directly.
//   2. finalize_kernel: the partials added up in their fixed order
//      (count_total, shared with the CPU), the scalar
//      parameters' totals and the first invalid element reduced by block 0.
//
// No floating-point atomics: every sum has a fixed assignment of elements to
// threads and a fixed order, so the results are bitwise the same from run to
// run. No host synchronisation and no allocation (the caller's workspace).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <stdexcept>
#include <string>

#include "device_guard.cuh"
#include "klanneal/count_likelihoods.h"
#include "klanneal/count_recon.h"

namespace klanneal {
namespace count_cuda {

constexpr int kThreads = static_cast<int>(kCountGeneBlock);
// Grid-stride loops cover whatever does not fit; this only bounds the grid.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

// Arithmetic in float for fp32/fp16/bf16 inputs (gradients stored in float),
// in double for fp64.
template <typename S> struct AccOf {
  using type = float;
};
template <> struct AccOf<double> {
  using type = double;
};
template <typename S> using Acc = typename AccOf<S>::type;

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// A tile's per-example sums, reduced together (one barrier instead of three).
struct RowSums {
  double loss, theta, zi;
};
struct RowSumsOp {
  __device__ __forceinline__ RowSums operator()(const RowSums &a, const RowSums &b) const {
    return {a.loss + b.loss, a.theta + b.theta, a.zi + b.zi};
  }
};
struct DoubleSum {
  __device__ __forceinline__ double operator()(double a, double b) const { return a + b; }
};
struct KeyMin {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const {
    return min_i64(a, b);
  }
};

template <typename S, CountFamily F>
__global__ void __launch_bounds__(kThreads)
    recon_tile_kernel(const CountReconParams p, const CountReconPlan w, double *scratch,
                      int64_t *invalid_keys) {
  using A = Acc<S>;
  using Fam = count_nll::FamilyNll<F, ScalarOps<A>>;
  using RowReduce = cub::BlockReduce<RowSums, kThreads>;
  using KeyReduce = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename RowReduce::TempStorage row_storage;
  __shared__ typename KeyReduce::TempStorage key_storage;
  const S *mu = static_cast<const S *>(p.mu);
  const S *counts = static_cast<const S *>(p.counts);
  const S *theta = static_cast<const S *>(p.theta);
  const S *zi = static_cast<const S *>(p.zi_logits);
  A *grad_mu = static_cast<A *>(p.grad_mu);
  A *grad_theta = static_cast<A *>(p.grad_theta);
  A *grad_zi = static_cast<A *>(p.grad_zi);
  const bool theta_elem = grad_theta != nullptr && w.theta == Broadcast::kPerElement;
  const bool zi_elem = grad_zi != nullptr && w.zi == Broadcast::kPerElement;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t batch = p.batch, genes = p.genes;

  for (int64_t tile = blockIdx.x; tile < w.tiles; tile += gridDim.x) {
    const int64_t block = tile % w.gene_blocks, chunk = tile / w.gene_blocks;
    const int64_t g = block * kCountGeneBlock + tid;
    const bool active = g < genes;
    const int64_t b0 = chunk * w.row_chunk, b_end = min_i64(b0 + w.row_chunk, batch);
    double col_theta = 0.0, col_zi = 0.0;
    int64_t first_bad = kNoInvalid;
    for (int64_t b = b0; b < b_end; ++b) {
      RowSums sums{0.0, 0.0, 0.0};
      if (active) {
        const int64_t at = b * genes + g;
        const A x = widen(counts[at]), m = widen(mu[at]);
        A t = A(1), z = A(0);
        if constexpr (Fam::kHasTheta)
          t = widen(theta[b * p.theta_row_stride + g * p.theta_col_stride]);
        if constexpr (Fam::kHasZi)
          z = widen(zi[b * p.zi_row_stride + g * p.zi_col_stride]);
        if (invalid_keys != nullptr && first_bad == kNoInvalid) {
          const CountInput which = first_invalid_input(x, m, t, z, Fam::kHasTheta, Fam::kHasZi);
          if (which != CountInput::kCount)
            first_bad = invalid_key(at, which);
        }
        const count_nll::CountGrads<ScalarOps<A>> r = Fam::nll_grad(x, m, t, z);
        const double example_scale = p.row_scale != nullptr ? p.row_scale[b] : 1.0;
        const double elem_scale = p.grad_scale * example_scale;
        sums.loss = static_cast<double>(r.nll);
        if (grad_mu != nullptr)
          grad_mu[at] = static_cast<A>(static_cast<double>(r.d_mu) * elem_scale);
        if (theta_elem)
          grad_theta[at] = static_cast<A>(static_cast<double>(r.d_theta) * elem_scale);
        if (zi_elem)
          grad_zi[at] = static_cast<A>(static_cast<double>(r.d_zi_logits) * elem_scale);
        sums.theta = static_cast<double>(r.d_theta);
        sums.zi = static_cast<double>(r.d_zi_logits);
        col_theta += static_cast<double>(r.d_theta) * example_scale;
        col_zi += static_cast<double>(r.d_zi_logits) * example_scale;
      }
      const RowSums total = RowReduce(row_storage).Reduce(sums, RowSumsOp());
      if (tid == 0) {
        const int64_t row_at = block * batch + b;
        scratch[w.loss + row_at] = total.loss;
        if (w.theta_rows >= 0)
          scratch[w.theta_rows + row_at] = total.theta;
        if (w.zi_rows >= 0)
          scratch[w.zi_rows + row_at] = total.zi;
      }
      __syncthreads(); // row_storage is reused by the next example
    }
    if (active && w.theta_cols >= 0)
      scratch[w.theta_cols + chunk * genes + g] = col_theta;
    if (active && w.zi_cols >= 0)
      scratch[w.zi_cols + chunk * genes + g] = col_zi;
    if (invalid_keys != nullptr) {
      const int64_t key = KeyReduce(key_storage).Reduce(first_bad, KeyMin());
      if (tid == 0)
        invalid_keys[tile] = key;
      __syncthreads(); // key_storage is reused by the next tile
    }
  }
}

// Block 0 only: sum over g of count_total of gene g (a scalar parameter's
// gradient) into out[0], times grad_scale.
template <typename G>
__device__ void finalize_scalar(const CountReconParams &p, const CountReconPlan &w,
                                const double *cols, G *out) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  double s = 0.0;
  for (int64_t g = threadIdx.x; g < p.genes; g += kThreads)
    s += count_total(cols, w.row_chunks, p.genes, g);
  const double total = Reduce(storage).Reduce(s, DoubleSum());
  if (threadIdx.x == 0)
    out[0] = static_cast<G>(total * p.grad_scale);
  __syncthreads(); // storage may be reduced into again
}

template <typename G>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const CountReconParams p, const CountReconPlan w, const double *scratch,
                    const int64_t *invalid_keys) {
  const int64_t batch = p.batch, genes = p.genes;
  G *grad_theta = static_cast<G *>(p.grad_theta);
  G *grad_zi = static_cast<G *>(p.grad_zi);
  const int64_t n = batch > genes ? batch : genes;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    if (i < batch) {
      const double scale = p.grad_scale * (p.row_scale != nullptr ? p.row_scale[i] : 1.0);
      p.row_nll[i] = count_total(scratch + w.loss, w.gene_blocks, batch, i);
      if (w.theta_rows >= 0)
        grad_theta[i] =
            static_cast<G>(count_total(scratch + w.theta_rows, w.gene_blocks, batch, i) * scale);
      if (w.zi_rows >= 0)
        grad_zi[i] =
            static_cast<G>(count_total(scratch + w.zi_rows, w.gene_blocks, batch, i) * scale);
    }
    if (i < genes) {
      if (w.theta_cols >= 0 && w.theta == Broadcast::kPerGene)
        grad_theta[i] = static_cast<G>(count_total(scratch + w.theta_cols, w.row_chunks, genes, i) *
                                       p.grad_scale);
      if (w.zi_cols >= 0 && w.zi == Broadcast::kPerGene)
        grad_zi[i] =
            static_cast<G>(count_total(scratch + w.zi_cols, w.row_chunks, genes, i) * p.grad_scale);
    }
  }
  if (blockIdx.x != 0)
    return;
  if (w.theta_cols >= 0 && w.theta == Broadcast::kScalar)
    finalize_scalar<G>(p, w, scratch + w.theta_cols, grad_theta);
  if (w.zi_cols >= 0 && w.zi == Broadcast::kScalar)
    finalize_scalar<G>(p, w, scratch + w.zi_cols, grad_zi);
  if (invalid_keys != nullptr) {
    using Reduce = cub::BlockReduce<int64_t, kThreads>;
    __shared__ typename Reduce::TempStorage storage;
    int64_t first = kNoInvalid;
    for (int64_t t = threadIdx.x; t < w.tiles; t += kThreads)
      first = min_i64(first, invalid_keys[t]);
    const int64_t key = Reduce(storage).Reduce(first, KeyMin());
    if (threadIdx.x == 0)
      write_first_invalid(p.first_invalid, key);
  }
}

void check_launch(const char *kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("klanneal: CUDA error launching ") + kernel + ": " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

using cuda_util::check_call;

unsigned int grid_for(int64_t work_items) {
  const int64_t n = work_items < 1 ? 1 : work_items;
  return static_cast<unsigned int>(n < kMaxBlocks ? n : kMaxBlocks);
}

template <typename S, CountFamily F>
void launch_tiles(const CountReconParams &p, const CountReconPlan &w, double *scratch,
                  int64_t *invalid_keys, cudaStream_t stream) {
  recon_tile_kernel<S, F><<<grid_for(w.tiles), kThreads, 0, stream>>>(p, w, scratch, invalid_keys);
  check_launch("recon_tile_kernel");
}

template <typename S>
void launch_typed(const CountReconParams &p, const CountReconPlan &w, double *scratch,
                  int64_t *invalid_keys, cudaStream_t stream) {
  if (w.tiles > 0) {
    switch (p.family) {
#define KLANNEAL_COUNT_TILE_LAUNCH(enumerator, name)                                               \
  case CountFamily::enumerator:                                                                    \
    launch_tiles<S, CountFamily::enumerator>(p, w, scratch, invalid_keys, stream);                 \
    break;
      KLANNEAL_COUNT_FAMILIES(KLANNEAL_COUNT_TILE_LAUNCH)
#undef KLANNEAL_COUNT_TILE_LAUNCH
    }
  }
  using G = Acc<S>;
  const int64_t n = p.batch > p.genes ? p.batch : p.genes;
  finalize_kernel<G><<<grid_for((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      p, w, scratch, invalid_keys);
  check_launch("finalize_kernel");
}

} // namespace count_cuda

void launch_count_recon_cuda(const CountReconParams &p, void *stream) {
  check_count_recon_params(p);
  const CountReconPlan w = count_recon_plan(p, kCountRowChunkCuda);
  const int64_t need = w.n_elements * static_cast<int64_t>(sizeof(double));
  KLANNEAL_CHECK_ARG(need == 0 || (p.workspace != nullptr && p.workspace_bytes >= need),
                     "count_recon_cuda: workspace of " + std::to_string(p.workspace_bytes) +
                         " bytes, need " + std::to_string(need));
  KLANNEAL_CHECK_ARG(reinterpret_cast<uintptr_t>(p.workspace) % alignof(double) == 0,
                     "count_recon_cuda: workspace must be 8-byte aligned");
  // The device is the outputs' (row_nll is null only for an empty batch).
  const void *output = p.row_nll != nullptr      ? static_cast<const void *>(p.row_nll)
                       : p.grad_theta != nullptr ? p.grad_theta
                       : p.grad_zi != nullptr    ? p.grad_zi
                                                 : p.first_invalid;
  if (output == nullptr)
    return; // nothing to write
  const cuda_util::DeviceGuard guard(output,
                                     "count_recon_cuda: the outputs are not in CUDA device memory");
  // `stream` is the caller's current stream of the inputs' device; 0 when
  // that is the legacy default stream.
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  double *scratch = static_cast<double *>(p.workspace);
  // The keys' region is only ever accessed as int64.
  int64_t *invalid_keys =
      w.invalid >= 0 ? reinterpret_cast<int64_t *>(scratch + w.invalid) : nullptr;
  switch (p.dtype) {
  case DType::kFloat32:
    return count_cuda::launch_typed<float>(p, w, scratch, invalid_keys, s);
  case DType::kFloat64:
    return count_cuda::launch_typed<double>(p, w, scratch, invalid_keys, s);
  case DType::kFloat16:
    return count_cuda::launch_typed<__half>(p, w, scratch, invalid_keys, s);
  case DType::kBFloat16:
    return count_cuda::launch_typed<__nv_bfloat16>(p, w, scratch, invalid_keys, s);
  }
}

} // namespace klanneal
