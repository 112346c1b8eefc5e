// The parameter contract of the count reconstruction launchers
// (count_recon.h), shared by the CPU and CUDA ones: the packed call, the
// checks, and the tile plan with its scratch layout.
#include <cstdint>
#include <limits>
#include <string>

#include "klanneal/count_recon.h"

namespace klanneal {
namespace {

constexpr int64_t kMaxDim = int64_t(1) << 40;

// Broadcast of a [B, G]-expanded view from its strides; throws on any other view.
Broadcast broadcast_of(const char *name, int64_t row_stride, int64_t col_stride, int64_t genes) {
  if (row_stride == genes && col_stride == 1)
    return Broadcast::kPerElement; // also [1, G] and [B, 1] with G = 1
  if (row_stride == 0 && col_stride == 0)
    return Broadcast::kScalar;
  if (row_stride == 0 && col_stride == 1)
    return Broadcast::kPerGene;
  if (row_stride == 1 && col_stride == 0)
    return Broadcast::kPerExample;
  throw std::invalid_argument(
      std::string("count_recon: ") + name + " strides (" + std::to_string(row_stride) + ", " +
      std::to_string(col_stride) +
      ") are not those of a contiguous scalar, [G], [B, 1] or [B, G] expanded to [B, G]");
}

bool has_theta(CountFamily f) { return f != CountFamily::kPoisson; }
bool has_zi(CountFamily f) { return f == CountFamily::kZinb; }

} // namespace

Broadcast theta_broadcast(const CountReconParams &p) {
  if (!has_theta(p.family))
    return Broadcast::kAbsent;
  return broadcast_of("theta", p.theta_row_stride, p.theta_col_stride, p.genes);
}

Broadcast zi_broadcast(const CountReconParams &p) {
  if (!has_zi(p.family))
    return Broadcast::kAbsent;
  return broadcast_of("zi_logits", p.zi_row_stride, p.zi_col_stride, p.genes);
}

void check_count_recon_params(const CountReconParams &p) {
  KLANNEAL_CHECK_ARG(p.batch >= 0 && p.genes >= 0 && p.batch <= kMaxDim && p.genes <= kMaxDim &&
                         (p.genes == 0 || p.batch <= (int64_t(1) << 60) / p.genes),
                     "count_recon: batch and genes must be >= 0 and their product below 2^60, "
                     "got " +
                         std::to_string(p.batch) + " x " + std::to_string(p.genes));
  const auto family = static_cast<int32_t>(p.family);
  KLANNEAL_CHECK_ARG(family >= 0 && family < kNumCountFamilies,
                     "count_recon: family code " + std::to_string(family) + " is not in 0.." +
                         std::to_string(kNumCountFamilies - 1));
  const auto dtype = static_cast<int32_t>(p.dtype);
  KLANNEAL_CHECK_ARG(dtype >= 0 && dtype <= static_cast<int32_t>(DType::kBFloat16),
                     "count_recon: unknown dtype code " + std::to_string(dtype));
  KLANNEAL_CHECK_ARG(p.simd_level >= -1 && p.simd_level <= 2,
                     "count_recon: simd_level must be -1 (the CPU's) or 0..2");
  // An empty tensor's data pointer may be null: inputs are required only
  // where there are elements to read, row_nll where there are rows.
  const bool elements = p.batch > 0 && p.genes > 0;
  KLANNEAL_CHECK_ARG((!elements || (p.mu != nullptr && p.counts != nullptr)) &&
                         (p.batch == 0 || p.row_nll != nullptr),
                     "count_recon: mu, counts and row_nll are required");
  KLANNEAL_CHECK_ARG(has_theta(p.family) ? !elements || p.theta != nullptr : p.theta == nullptr,
                     has_theta(p.family) ? "count_recon: this family needs theta"
                                         : "count_recon: poisson has no theta");
  KLANNEAL_CHECK_ARG(has_zi(p.family) ? !elements || p.zi_logits != nullptr
                                      : p.zi_logits == nullptr,
                     has_zi(p.family) ? "count_recon: zinb needs zi_logits"
                                      : "count_recon: only zinb has zi_logits");
  KLANNEAL_CHECK_ARG(p.grad_theta == nullptr || has_theta(p.family),
                     "count_recon: grad_theta given for a family without theta");
  KLANNEAL_CHECK_ARG(p.grad_zi == nullptr || has_zi(p.family),
                     "count_recon: grad_zi given for a family without zi_logits");
  theta_broadcast(p); // throws on strides of another view
  zi_broadcast(p);
  KLANNEAL_CHECK_ARG(p.workspace_bytes >= 0, "count_recon: workspace_bytes must be >= 0");
}

CountReconParams count_recon_params_from_packed(const int64_t *sizes, size_t n_sizes,
                                                const uint64_t *ptrs, size_t n_ptrs,
                                                const double *floats, size_t n_floats) {
  KLANNEAL_CHECK_ARG(n_sizes == static_cast<size_t>(CountSizeSlot::kCount) &&
                         n_ptrs == static_cast<size_t>(CountPtrSlot::kCount) &&
                         n_floats == static_cast<size_t>(CountFloatSlot::kCount),
                     "count_recon: packed arguments of the wrong length (see "
                     "_C.count_recon_layout())");
  auto size = [&](CountSizeSlot k) { return sizes[static_cast<size_t>(k)]; };
  auto ptr = [&](CountPtrSlot k) {
    return reinterpret_cast<void *>(static_cast<uintptr_t>(ptrs[static_cast<size_t>(k)]));
  };
  // Enum codes are range-checked by check_count_recon_params; a value outside
  // int32 is rejected here, before the cast.
  auto code = [](int64_t v) {
    KLANNEAL_CHECK_ARG(v >= -1 && v <= 255, "count_recon: an enum code is out of range");
    return static_cast<int32_t>(v);
  };
  CountReconParams p;
  p.batch = size(CountSizeSlot::k_batch);
  p.genes = size(CountSizeSlot::k_genes);
  p.family = static_cast<CountFamily>(code(size(CountSizeSlot::k_family)));
  p.dtype = static_cast<DType>(code(size(CountSizeSlot::k_dtype)));
  const int64_t threads = size(CountSizeSlot::k_n_threads);
  p.n_threads = static_cast<int>(threads < 1 ? 1 : threads > 4096 ? 4096 : threads);
  p.simd_level = code(size(CountSizeSlot::k_simd_level));
  p.theta_row_stride = size(CountSizeSlot::k_theta_row_stride);
  p.theta_col_stride = size(CountSizeSlot::k_theta_col_stride);
  p.zi_row_stride = size(CountSizeSlot::k_zi_row_stride);
  p.zi_col_stride = size(CountSizeSlot::k_zi_col_stride);
  p.workspace_bytes = size(CountSizeSlot::k_workspace_bytes);
  p.mu = ptr(CountPtrSlot::k_mu);
  p.counts = ptr(CountPtrSlot::k_counts);
  p.theta = ptr(CountPtrSlot::k_theta);
  p.zi_logits = ptr(CountPtrSlot::k_zi_logits);
  p.row_scale = static_cast<const double *>(ptr(CountPtrSlot::k_row_scale));
  p.row_nll = static_cast<double *>(ptr(CountPtrSlot::k_row_nll));
  p.grad_mu = ptr(CountPtrSlot::k_grad_mu);
  p.grad_theta = ptr(CountPtrSlot::k_grad_theta);
  p.grad_zi = ptr(CountPtrSlot::k_grad_zi);
  p.first_invalid = static_cast<int64_t *>(ptr(CountPtrSlot::k_first_invalid));
  p.workspace = ptr(CountPtrSlot::k_workspace);
  p.grad_scale = floats[static_cast<size_t>(CountFloatSlot::k_grad_scale)];
  return p;
}

CountReconPlan count_recon_plan(const CountReconParams &p, int64_t row_chunk) {
  CountReconPlan w;
  w.row_chunk = row_chunk;
  w.gene_blocks = (p.genes + kCountGeneBlock - 1) / kCountGeneBlock;
  w.row_chunks = (p.batch + row_chunk - 1) / row_chunk;
  w.tiles = w.gene_blocks * w.row_chunks;
  w.theta = theta_broadcast(p);
  w.zi = zi_broadcast(p);
  int64_t next = 0;
  auto take = [&](int64_t n) {
    const int64_t at = next;
    next += n;
    return at;
  };
  const int64_t rows = w.gene_blocks * p.batch, cols = w.row_chunks * p.genes;
  auto summed_over_genes = [](Broadcast b) { return b == Broadcast::kPerExample; };
  auto summed_over_rows = [](Broadcast b) {
    return b == Broadcast::kPerGene || b == Broadcast::kScalar;
  };
  w.loss = take(rows);
  if (p.grad_theta != nullptr && summed_over_genes(w.theta))
    w.theta_rows = take(rows);
  if (p.grad_zi != nullptr && summed_over_genes(w.zi))
    w.zi_rows = take(rows);
  if (p.grad_theta != nullptr && summed_over_rows(w.theta))
    w.theta_cols = take(cols);
  if (p.grad_zi != nullptr && summed_over_rows(w.zi))
    w.zi_cols = take(cols);
  if (p.first_invalid != nullptr)
    w.invalid = take(w.tiles);
  w.n_elements = next;
  return w;
}

size_t count_recon_cuda_workspace_bytes(const CountReconParams &p) {
  check_count_recon_params(p);
  return static_cast<size_t>(count_recon_plan(p, kCountRowChunkCuda).n_elements) * sizeof(double);
}

} // namespace klanneal
