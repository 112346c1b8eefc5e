// The reconstruction term of the count likelihoods (issue 24) as one
// torch-free launcher per device: for a [B, G] matrix of means mu and counts
// x, per example b the loss row_nll[b] = sum_g nll(x_bg; mu_bg, theta_bg,
// zi_bg) in float64 and, in the same pass, the gradients w.r.t. mu, theta and
// zi_logits. The per-element formulas are count_likelihoods_body.h's
// (count_nll::FamilyNll), the same on every CPU SIMD level and on CUDA.
//
// Work is split into tiles of kCountGeneBlock genes x row_chunk examples
// (row_chunk: kCountRowChunkCpu or kCountRowChunkCuda); a tile writes only
// its own float64 partial sums (CountReconScratch), and a finalize step adds
// them up in a fixed order. So every output, including a gradient summed over
// the batch (a per-gene theta), is bitwise the same for any number of CPU
// threads or any CUDA grid. The SIMD level changes the last bits of the
// per-element values (its own log and exp), never the order of a sum.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "klanneal/common.h"
#include "klanneal/count_family.h"
#include "klanneal/count_likelihoods.h"

namespace klanneal {

// ---- the packed call (Python packs by these names: _C.count_recon_layout()) ----
// X(slot_name); codes in list order.
#define KLANNEAL_COUNT_RECON_SIZES(X)                                                              \
  X(batch)                                                                                         \
  X(genes)                                                                                         \
  X(family)                                                                                        \
  X(dtype)                                                                                         \
  X(n_threads)                                                                                     \
  X(simd_level)                                                                                    \
  X(theta_row_stride)                                                                              \
  X(theta_col_stride)                                                                              \
  X(zi_row_stride)                                                                                 \
  X(zi_col_stride)                                                                                 \
  X(workspace_bytes)

// Pointers are Python ints (tensor.data_ptr(), 0 for none).
#define KLANNEAL_COUNT_RECON_PTRS(X)                                                               \
  X(mu)                                                                                            \
  X(counts)                                                                                        \
  X(theta)                                                                                         \
  X(zi_logits)                                                                                     \
  X(row_scale)                                                                                     \
  X(row_nll)                                                                                       \
  X(grad_mu)                                                                                       \
  X(grad_theta)                                                                                    \
  X(grad_zi)                                                                                       \
  X(first_invalid)                                                                                 \
  X(workspace)

#define KLANNEAL_COUNT_RECON_FLOATS(X) X(grad_scale)

#define KLANNEAL_SLOT_ENUM(name) k_##name,
enum class CountSizeSlot : int { KLANNEAL_COUNT_RECON_SIZES(KLANNEAL_SLOT_ENUM) kCount };
enum class CountPtrSlot : int { KLANNEAL_COUNT_RECON_PTRS(KLANNEAL_SLOT_ENUM) kCount };
enum class CountFloatSlot : int { KLANNEAL_COUNT_RECON_FLOATS(KLANNEAL_SLOT_ENUM) kCount };
#undef KLANNEAL_SLOT_ENUM

// Which inputs first_invalid[1] names, X(enumerator, "python name").
#define KLANNEAL_COUNT_INPUTS(X)                                                                   \
  X(kMu, "mu") X(kCounts, "counts") X(kTheta, "theta") X(kZi, "zi_logits")
enum class CountInput : int32_t { KLANNEAL_COUNT_INPUTS(KLANNEAL_ENUM_ENTRY) kCount };

// How theta / zi_logits broadcast to [B, G], from the strides (in elements)
// of their view expanded to [B, G] (t.expand(B, G).stride() of a contiguous
// t): (0, 0) one value, (0, 1) one per gene [G], (1, 0) one per example
// [B, 1], (G, 1) one per element [B, G]. kAbsent: the family has none. A
// gradient has the parameter's own numel: 1, G, B or B * G.
enum class Broadcast : int32_t { kAbsent, kScalar, kPerGene, kPerExample, kPerElement };

// ---- the call --------------------------------------------------------------------
struct CountReconParams {
  // Sizes. B = batch examples of G = genes each; mu and counts are [B, G]
  // row-major, every array of `dtype` (fp16/bf16 are computed in float32).
  int64_t batch = 0, genes = 0;
  CountFamily family = CountFamily::kPoisson;
  DType dtype = DType::kFloat32;
  int n_threads = 1; // CPU worker threads (the calling one included)
  // CPU: -1 runs cpu_simd_level() (the widest the CPU has, capped by
  // KLANNEAL_SIMD); 0, 1, 2 a SimdLevel, which must not be above it (tests).
  int simd_level = -1;
  // Strides of theta / zi_logits expanded to [B, G] (see Broadcast).
  int64_t theta_row_stride = 0, theta_col_stride = 0;
  int64_t zi_row_stride = 0, zi_col_stride = 0;

  // Inputs.
  const void *mu = nullptr;          // [B, G], > 0 and finite
  const void *counts = nullptr;      // [B, G], whole numbers >= 0 in `dtype`
  const void *theta = nullptr;       // nb, zinb: > 0 and finite; broadcast as above
  const void *zi_logits = nullptr;   // zinb: any real; broadcast as above
  const double *row_scale = nullptr; // [B] or null: example b's gradients times row_scale[b]

  // Outputs. Gradients are stored in dtype for fp32/fp64 inputs and in float32
  // for fp16/bf16 (as ElboParams'); null: not wanted, not computed.
  double *row_nll = nullptr;  // [B], float64, unscaled
  void *grad_mu = nullptr;    // [B, G]
  void *grad_theta = nullptr; // theta's own numel, summed over its broadcast dimensions
  void *grad_zi = nullptr;    // zi_logits' own numel, likewise
  // int64[2] or null: when given, the inputs are checked (mu > 0 and finite,
  // counts finite, >= 0 and whole, theta > 0 and finite, zi_logits not NaN)
  // and {flat index b * G + g, CountInput} of the first invalid element of
  // the [B, G] grid in row-major order (at that element the first input in
  // CountInput order) is written, or {-1, -1}. The other outputs are then
  // unspecified, but every access stays in bounds.
  int64_t *first_invalid = nullptr;
  // Every gradient is multiplied by grad_scale (1/B for "batchmean").
  double grad_scale = 1.0;

  // CUDA only: device scratch of count_recon_cuda_workspace_bytes(*this)
  // bytes, 8-byte aligned (the CPU launcher allocates its own and ignores these).
  void *workspace = nullptr;
  int64_t workspace_bytes = 0;
};

// Checks sizes, codes, strides and pointers (std::invalid_argument, ValueError
// in Python); values are checked only through first_invalid.
void check_count_recon_params(const CountReconParams &p);

// The broadcast of theta (zi_logits) from its strides; kAbsent when the family has none.
Broadcast theta_broadcast(const CountReconParams &p);
Broadcast zi_broadcast(const CountReconParams &p);

// CountReconParams from the packed call (slot orders above); throws
// std::invalid_argument for lists of the wrong length or codes out of range.
CountReconParams count_recon_params_from_packed(const int64_t *sizes, size_t n_sizes,
                                                const uint64_t *ptrs, size_t n_ptrs,
                                                const double *floats, size_t n_floats);

// ---- tiles and their partial sums ----------------------------------------------------
constexpr int64_t kCountGeneBlock = 256; // genes per tile (= CUDA threads per block)
constexpr int64_t kCountRowChunkCpu = 64;
constexpr int64_t kCountRowChunkCuda = 16;

// Offsets (in float64 elements, -1 for none) of the partial sums in one scratch
// array, for tiles of kCountGeneBlock genes x row_chunk examples:
//   loss [gene_blocks][B]           each tile's sum of its examples' losses
//   theta_rows, zi_rows [gene_blocks][B]   per-example parameters' gradient sums
//   theta_cols, zi_cols [row_chunks][G]    per-gene (and scalar) parameters' sums
//                                          over the tile's examples
//   invalid [tiles] (int64)         a tile's first invalid key, 4 * flat + input
struct CountReconPlan {
  int64_t gene_blocks = 0, row_chunk = 1, row_chunks = 0, tiles = 0;
  Broadcast theta = Broadcast::kAbsent, zi = Broadcast::kAbsent;
  int64_t loss = -1, theta_rows = -1, zi_rows = -1, theta_cols = -1, zi_cols = -1, invalid = -1;
  int64_t n_elements = 0; // 8-byte elements in all
};

CountReconPlan count_recon_plan(const CountReconParams &p, int64_t row_chunk);

// Bytes of device scratch launch_count_recon_cuda needs (checks p first).
size_t count_recon_cuda_workspace_bytes(const CountReconParams &p);

// ---- the finalize arithmetic both backends share ------------------------------------
// One total from its partials, added in part order: partials[k * stride + index]
// for k < parts. A per-example total: the gene blocks' partials (parts =
// gene_blocks, stride = batch, index = b); a per-gene total: the row chunks'
// (parts = row_chunks, stride = genes, index = g).
KLANNEAL_HD double count_total(const double *partials, int64_t parts, int64_t stride,
                               int64_t index) {
  double s = 0.0;
  for (int64_t k = 0; k < parts; ++k)
    s += partials[k * stride + index];
  return s;
}

// The key of an invalid element (smaller = earlier in the [B, G] grid's
// row-major order, then in CountInput order) and its decoding.
KLANNEAL_HD int64_t invalid_key(int64_t flat, CountInput which) {
  return 4 * flat + static_cast<int64_t>(which);
}
constexpr int64_t kNoInvalid = INT64_MAX;

// The first invalid input of one element, or CountInput::kCount (see
// CountReconParams::first_invalid). T = float or double.
template <typename T>
KLANNEAL_HD CountInput first_invalid_input(T x, T mu, T theta, T zi, bool with_theta,
                                           bool with_zi) {
  using Rule = count_nll::CountInputRule<ScalarOps<T>>;
  if (!Rule::positive(mu))
    return CountInput::kMu;
  if (!Rule::count(x))
    return CountInput::kCounts;
  if (with_theta && !Rule::positive(theta))
    return CountInput::kTheta;
  if (with_zi && !Rule::logit(zi))
    return CountInput::kZi;
  return CountInput::kCount;
}
KLANNEAL_HD void write_first_invalid(int64_t *out, int64_t key) {
  out[0] = key == kNoInvalid ? -1 : key / 4;
  out[1] = key == kNoInvalid ? -1 : key % 4;
}

// ---- launchers ---------------------------------------------------------------------
// Runs the call on the CPU (threads of parallel_cpu.h, SIMD level as above).
void launch_count_recon_cpu(const CountReconParams &p);

#if KLANNEAL_WITH_CUDA
// Enqueues the call on `stream` (a cudaStream_t) without host synchronisation
// or allocation; every pointer is device memory, p.workspace as above.
void launch_count_recon_cuda(const CountReconParams &p, void *stream);
#endif

} // namespace klanneal
