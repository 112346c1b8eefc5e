// Launcher of the fused ELBO op on CUDA: checks the parameters, lays out the
// workspace, picks the kernels for the dtypes and enqueues them on the
// caller's stream (elbo_kernel.cuh describes the four stages). No host
// synchronisation and no allocation, so a training step that calls the op
// can be captured in a CUDA graph.
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "device_guard.cuh"
#include "elbo_kernel.cuh"
#include "klanneal/elbo.h"
#include "klanneal/elbo_reduction.h"
#include "klanneal/elementwise_likelihoods.h"

namespace klanneal {
namespace {

using cuda::kBlockThreads;

// Grid-stride loops cover whatever does not fit; this only bounds the grid.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

unsigned int grid_for(int64_t work_items) {
  return static_cast<unsigned int>(work_items < kMaxBlocks ? work_items : kMaxBlocks);
}

void check_launch(const char *kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("klanneal: CUDA error launching ") + kernel + ": " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

using cuda_util::check_call;

// Partial recon sums per example row: categorical rows are reduced by one
// warp/block each; long non-categorical rows are split into chunks.
int64_t chunks_per_row(const ElboParams &p) {
  if (p.likelihood == Likelihood::kCategorical)
    return 1;
  return (p.row_len + cuda::kElementwiseChunk - 1) / cuda::kElementwiseChunk;
}

// Workspace: float64 arrays, each starting on a 256-byte boundary.
//   partials [n_rows * chunks_per_row], recon_ex [B], kl_ex [B], term_ex [B],
//   signs [B] (the capacity's sign per example, or for the batch in [0])
struct WorkspaceLayout {
  size_t partials = 0, recon_ex = 0, kl_ex = 0, term_ex = 0, signs = 0; // byte offsets
  size_t bytes = 0;
};

size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

WorkspaceLayout workspace_layout(const ElboParams &p) {
  WorkspaceLayout w;
  const size_t n_partials = static_cast<size_t>(p.n_rows * chunks_per_row(p));
  const size_t per_example = static_cast<size_t>(p.batch) * sizeof(double);
  w.partials = 0;
  w.recon_ex = align_up(n_partials * sizeof(double));
  w.kl_ex = w.recon_ex + align_up(per_example);
  w.term_ex = w.kl_ex + align_up(per_example);
  w.signs = w.term_ex + align_up(per_example);
  w.bytes = w.signs + align_up(per_example);
  return w;
}

template <typename T>
void launch_recon(const ElboParams &p, double *partials, int64_t n_chunks, cudaStream_t stream) {
  using A = cuda::Acc<T>;
  if (p.n_rows == 0 || n_chunks == 0)
    return; // no elements: recon is 0
  const A scale = reduction_scale<A>(p);
  if (p.likelihood == Likelihood::kCategorical) {
    if (p.row_len <= cuda::kWarpRowMaxLen) {
      const int64_t blocks = (p.n_rows + cuda::kWarpsPerBlock - 1) / cuda::kWarpsPerBlock;
      cuda::categorical_warp_kernel<T>
          <<<grid_for(blocks), kBlockThreads, 0, stream>>>(p, partials, scale);
      check_launch("categorical_warp_kernel");
    } else {
      cuda::categorical_block_kernel<T>
          <<<grid_for(p.n_rows), kBlockThreads, 0, stream>>>(p, partials, scale);
      check_launch("categorical_block_kernel");
    }
    return;
  }
  with_elementwise_likelihood(p.likelihood, [&](auto l) {
    constexpr Likelihood L = decltype(l)::value;
    // The likelihood's constants (gaussian: 1/var, log(2 pi var)) once per launch.
    const ElementwiseLoss<L, A> loss(p);
    cuda::elementwise_kernel<T, L><<<grid_for(p.n_rows * n_chunks), kBlockThreads, 0, stream>>>(
        p, partials, n_chunks, loss, scale);
    check_launch("elementwise_kernel");
  });
}

template <typename T>
void launch_latent(const ElboParams &p, const double *partials, int64_t partials_per_example,
                   double *recon_ex, double *kl_ex, double *term_ex, cudaStream_t stream) {
  cuda::example_kernel<T><<<grid_for(p.batch), kBlockThreads, 0, stream>>>(
      p, partials, partials_per_example, recon_ex, kl_ex, term_ex);
  check_launch("example_kernel");
  if (p.latent_dim > 0) {
    cuda::kl_dims_kernel<T><<<grid_for(p.latent_dim), kBlockThreads, 0, stream>>>(p);
    check_launch("kl_dims_kernel");
  }
}

template <typename F> void dispatch_dtype(DType t, F &&f) {
  switch (t) {
  case DType::kFloat32:
    f(float{});
    return;
  case DType::kFloat64:
    f(double{});
    return;
  case DType::kFloat16:
    f(__half{});
    return;
  case DType::kBFloat16:
    f(__nv_bfloat16{});
    return;
  }
  throw std::invalid_argument("elbo_cuda: unknown dtype " + std::to_string(static_cast<int>(t)));
}

} // namespace

size_t elbo_cuda_workspace_bytes(const ElboParams &p) {
  check_elbo_sizes(p);
  return workspace_layout(p).bytes;
}

void launch_elbo_cuda(const ElboParams &p, void *workspace, size_t workspace_bytes, void *stream) {
  check_elbo_params(p);
  // The CPU launcher may skip kl_per_dim; the CUDA finalize kernel reads it
  // (batch free bits), so here it is required.
  KLANNEAL_CHECK_ARG(p.latent_dim == 0 || p.kl_per_dim != nullptr,
                     "elbo_cuda: null output pointer (kl_per_dim)");
  const WorkspaceLayout w = workspace_layout(p);
  KLANNEAL_CHECK_ARG(workspace != nullptr && workspace_bytes >= w.bytes,
                     "elbo_cuda: workspace of " + std::to_string(workspace_bytes) +
                         " bytes, need " + std::to_string(w.bytes));
  KLANNEAL_CHECK_ARG(reinterpret_cast<uintptr_t>(workspace) % alignof(double) == 0,
                     "elbo_cuda: workspace must be 8-byte aligned");
  // `stream` is torch's current stream of the inputs' device; 0 when that is
  // the legacy default stream, which is then what torch itself uses.
  const cuda_util::DeviceGuard guard(p.loss, "elbo_cuda: the inputs are not in CUDA device memory");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  char *base = static_cast<char *>(workspace);
  double *partials = reinterpret_cast<double *>(base + w.partials);
  double *recon_ex = reinterpret_cast<double *>(base + w.recon_ex);
  double *kl_ex = reinterpret_cast<double *>(base + w.kl_ex);
  double *term_ex = reinterpret_cast<double *>(base + w.term_ex);
  double *signs = reinterpret_cast<double *>(base + w.signs);
  const int64_t n_chunks = chunks_per_row(p);
  const int64_t partials_per_example = (p.n_rows / p.batch) * n_chunks;

  dispatch_dtype(p.recon_dtype,
                 [&](auto tag) { launch_recon<decltype(tag)>(p, partials, n_chunks, s); });
  dispatch_dtype(p.latent_dtype, [&](auto tag) {
    launch_latent<decltype(tag)>(p, partials, partials_per_example, recon_ex, kl_ex, term_ex, s);
  });
  cuda::finalize_kernel<<<1, kBlockThreads, 0, s>>>(p, recon_ex, kl_ex, term_ex, signs);
  check_launch("finalize_kernel");
  if (p.has_capacity && any_latent_grad(p) && p.latent_dim > 0) {
    const int64_t blocks = (p.batch * p.latent_dim + kBlockThreads - 1) / kBlockThreads;
    dispatch_dtype(p.latent_dtype, [&](auto tag) {
      cuda::capacity_grad_kernel<decltype(tag)>
          <<<grid_for(blocks), kBlockThreads, 0, s>>>(p, signs);
    });
    check_launch("capacity_grad_kernel");
  }
}

} // namespace klanneal
