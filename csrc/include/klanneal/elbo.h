// The fused ELBO op: parameters shared by the CPU and CUDA launchers.
//
//   loss = recon + beta * KL_term
//   recon: sum over elements of the per-element negative log-likelihood
//   KL_term: sum_d KL(q(z_d|x) || p(z_d)), with free bits if asked, where
//            the prior p is N(0, 1) or a learned N(prior_mu, exp(prior_logvar));
//            with a capacity C (Burgess et al. 2018) it becomes |KL_term - C|
//            (per example for kNone, else B * |KL_term / B - C|).
//
// Reductions over the batch of B examples: kBatchMean divides the sums by B
// (the per-example ELBO of the paper's code), kSum does not, kNone writes
// one value per example.
#pragma once

#include <cstddef>
#include <cstdint>

#include "klanneal/common.h"
#include "klanneal/schedule.h"

namespace klanneal {

// The likelihoods, codes 0, 1, ... in list order. The categorical one (rows
// of logits and a class id, a log-sum-exp per row) comes first; every other
// one is elementwise, an entry X(enumerator, "python name", traits struct)
// of KLANNEAL_ELEMENTWISE_LIKELIHOODS: its traits struct
// (klanneal/elementwise_likelihoods_body.h) is the one definition of its
// loss, gradient and target check, which the CPU scalar loop, the SIMD body
// and the CUDA kernel instantiate through this list.
#define KLANNEAL_ELEMENTWISE_LIKELIHOODS(X)                                                        \
  X(kBernoulli, "bernoulli", BernoulliLoss)                                                        \
  X(kGaussian, "gaussian", GaussianLoss)                                                           \
  X(kMse, "mse", MseLoss)
#define KLANNEAL_LIKELIHOODS(X) X(kCategorical, "categorical") KLANNEAL_ELEMENTWISE_LIKELIHOODS(X)
enum class Likelihood : int32_t { KLANNEAL_LIKELIHOODS(KLANNEAL_ENUM_ENTRY) };
#define KLANNEAL_REDUCTIONS(X) X(kBatchMean, "batchmean") X(kSum, "sum") X(kNone, "none")
enum class Reduction : int32_t { KLANNEAL_REDUCTIONS(KLANNEAL_ENUM_ENTRY) };
// kBatch: sum_d max(lambda, mean_b KL_bd) (Kingma et al. 2016);
// kSample: sum_d max(lambda, KL_bd) for each example.
#define KLANNEAL_FREE_BITS_MODES(X) X(kBatch, "batch") X(kSample, "sample")
enum class FreeBitsMode : int32_t { KLANNEAL_FREE_BITS_MODES(KLANNEAL_ENUM_ENTRY) };
constexpr int32_t kNumLikelihoods = 0 KLANNEAL_LIKELIHOODS(KLANNEAL_COUNT_ENTRY);
constexpr int32_t kNumReductions = 0 KLANNEAL_REDUCTIONS(KLANNEAL_COUNT_ENTRY);
constexpr int32_t kNumFreeBitsModes = 0 KLANNEAL_FREE_BITS_MODES(KLANNEAL_COUNT_ENTRY);

// Storage dtype of the gradients of an input stored as `d` (see ElboParams).
KLANNEAL_HD DType grad_dtype(DType d) {
  return d == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
}

// beta or the capacity C as the op takes it: the C++ side of
// python/klanneal/_call.py's Weight, one type for both. `tensor` (a float64
// scalar in the op's device memory) if set, else `schedule` at the call's
// step when it has one, else `value` (resolve_weight).
struct KlWeight {
  const double *tensor = nullptr;
  ScheduleParams schedule;
  double value = 0.0;
};

// The weight's value at `step` (null: the call has no step tensor). On the
// device it reads the current tensor / step, so CUDA graph replays see them.
KLANNEAL_HD double resolve_weight(const KlWeight &w, const int64_t *step) {
  if (w.tensor != nullptr)
    return *w.tensor;
  if (step != nullptr)
    return schedule_value(w.schedule, *step);
  return w.value;
}

struct ElboParams {
  // recon_input is viewed as [n_rows, row_len]. Categorical: one row per
  // position, row_len = V, rows_per_example = n_rows / batch consecutive rows
  // belong to one example. Other likelihoods: one row per example.
  int64_t batch = 0;      // B
  int64_t n_rows = 0;     // categorical: B * prod(middle dims); others: B
  int64_t row_len = 0;    // categorical: V; others: elements per example
  int64_t latent_dim = 0; // D

  Likelihood likelihood = Likelihood::kCategorical;
  Reduction reduction = Reduction::kBatchMean;
  FreeBitsMode free_bits_mode = FreeBitsMode::kBatch;
  DType recon_dtype = DType::kFloat32;  // recon_input, float targets, grad_recon
  DType latent_dtype = DType::kFloat32; // mu, logvar, grad_mu, grad_logvar

  double free_bits = 0.0;    // lambda in nats per latent dimension; 0 disables
  double gaussian_var = 1.0; // fixed variance of the gaussian likelihood
  int64_t ignore_index = -100;

  // The call's step (an int64 scalar in the op's device memory) or null: the
  // schedules of beta and the capacity are evaluated at it (resolve_weight).
  const int64_t *step_ptr = nullptr;
  // beta, from exactly one source (KlWeight): its tensor, else its schedule
  // at *step_ptr, else its value.
  KlWeight beta{nullptr, ScheduleParams{}, 1.0};

  // Capacity objective: when has_capacity, C (a schedule at *step_ptr, or at
  // step 0 without one: a constant schedule carries a plain number) replaces
  // the KL term t by |t - C| (resolve_capacity; the arithmetic:
  // klanneal/elbo_reduction.h).
  bool has_capacity = false;
  KlWeight capacity;

  // Inputs (contiguous).
  const void *recon_input = nullptr; // [n_rows, row_len], recon_dtype
  const void *target = nullptr; // categorical: int64 [n_rows]; else recon_dtype [n_rows, row_len]
  const void *mu = nullptr;     // [B, D], latent_dtype
  const void *logvar = nullptr; // [B, D], latent_dtype
  // A learned diagonal-Gaussian prior, both or neither; nullptr: N(0, I).
  const void *prior_mu = nullptr;     // [B, D], latent_dtype
  const void *prior_logvar = nullptr; // [B, D], latent_dtype
  // Batch free bits across data-parallel processes: if not null, the
  // per-dimension batch mean of KL_bd over the global batch (all-reduced by
  // the caller), which replaces the local mean in the clamp and its mask.
  const double *global_kl_per_dim = nullptr; // [D], float64

  // Outputs, all float64. (With out_dtype float32 the CPU binding points
  // them at float64 scratch and copies the values into the caller's float32
  // buffers afterwards: Float32Outputs in csrc/bind_common.h.)
  double *loss = nullptr;       // [B] for kNone, else [1]
  double *recon = nullptr;      // same shape as loss
  double *kl = nullptr;         // same shape as loss; the true KL, before free bits
  double *kl_per_dim = nullptr; // [D], batch mean of KL_bd
  double *beta_out = nullptr;   // [1], the beta that was used
  // d loss / d beta: the KL term under the reduction (after free bits and
  // capacity), so that a learnable beta gets its gradient. Optional.
  double *kl_weight = nullptr; // same shape as loss

  // Gradients of `loss` (under its reduction), written in the forward pass;
  // nullptr skips that work. grad_recon may alias recon_input (inplace, fp32
  // and fp64 only). For kNone they are the gradients of each example's own
  // loss. Their storage type is the input's for fp32/fp64 and float32 for
  // fp16/bf16 inputs: a half-precision gradient stored before the upstream
  // gradient (a loss scale) is applied would underflow or overflow.
  void *grad_recon = nullptr;        // [n_rows, row_len], grad_dtype(recon_dtype)
  void *grad_mu = nullptr;           // [B, D], grad_dtype(latent_dtype)
  void *grad_logvar = nullptr;       // [B, D], grad_dtype(latent_dtype)
  void *grad_prior_mu = nullptr;     // [B, D], grad_dtype(latent_dtype)
  void *grad_prior_logvar = nullptr; // [B, D], grad_dtype(latent_dtype)

  int n_threads = 1; // CPU only: worker threads (the caller passes torch.get_num_threads())

  // CPU only (the CUDA launcher ignores it): if not null, the launcher checks
  // the targets (categorical: class ids in [0, V) or ignore_index; bernoulli:
  // values in [0, 1], NaN is invalid) and writes the flat index of the first
  // invalid one, or -1, to this int64 [1]. When it is >= 0 the other outputs
  // are unspecified (but every read and write stays in bounds), except that
  // recon_input is left untouched when grad_recon aliases it.
  int64_t *first_invalid_target = nullptr;
};

// beta at this call's step, shared by the CPU and CUDA launchers.
KLANNEAL_HD double resolve_beta(const ElboParams &p) { return resolve_weight(p.beta, p.step_ptr); }

// Whether any latent gradient (mu, logvar, prior_mu, prior_logvar) is asked for.
KLANNEAL_HD bool any_latent_grad(const ElboParams &p) {
  return p.grad_mu != nullptr || p.grad_logvar != nullptr || p.grad_prior_mu != nullptr ||
         p.grad_prior_logvar != nullptr;
}

// The capacity C at this call's step (meaningful only when has_capacity).
KLANNEAL_HD double resolve_capacity(const ElboParams &p) {
  const int64_t first = 0; // no step tensor: the constant schedule's value
  return resolve_weight(p.capacity, p.step_ptr != nullptr ? p.step_ptr : &first);
}

// The parameter contract of both launchers (csrc/elbo_params.cpp): throws
// std::invalid_argument naming the first inconsistent field. check_elbo_sizes
// is the part the CUDA workspace size depends on.
void check_elbo_sizes(const ElboParams &p);
void check_elbo_params(const ElboParams &p);

// Fills the outputs. Throws std::invalid_argument on inconsistent parameters.
void launch_elbo_cpu(const ElboParams &p);

#if KLANNEAL_WITH_CUDA
// Bytes of device scratch memory launch_elbo_cuda needs for these sizes.
size_t elbo_cuda_workspace_bytes(const ElboParams &p);
// Enqueues the op on `stream` (a cudaStream_t) without host synchronisation.
// Throws std::runtime_error naming the CUDA error if a launch fails.
void launch_elbo_cuda(const ElboParams &p, void *workspace, size_t workspace_bytes, void *stream);
#endif

} // namespace klanneal
