// The one parameter contract of the fused ELBO op, shared by the CPU and the
// CUDA launchers (and by the CUDA workspace query), so that the two backends
// accept exactly the same calls.
#include <cmath>
#include <string>

#include "klanneal/elbo.h"
#include "klanneal/schedules_cpu.h"

namespace klanneal {
namespace {

bool is_half(DType d) { return d == DType::kFloat16 || d == DType::kBFloat16; }

} // namespace

void check_elbo_sizes(const ElboParams &p) {
  KLANNEAL_CHECK_ARG(p.batch > 0, "elbo: batch must be > 0, got " + std::to_string(p.batch));
  KLANNEAL_CHECK_ARG(p.n_rows >= 0 && p.row_len >= 0 && p.latent_dim >= 0,
                     "elbo: n_rows, row_len and latent_dim must be >= 0");
  const auto lk = static_cast<int32_t>(p.likelihood);
  KLANNEAL_CHECK_ARG(valid_code(lk, kNumLikelihoods),
                     "elbo: unknown likelihood " + std::to_string(lk));
  if (p.likelihood == Likelihood::kCategorical) {
    // n_rows == 0: an empty middle dimension ([B, 0, V]); the loss is the KL term.
    KLANNEAL_CHECK_ARG(p.row_len > 0, "elbo: categorical rows need V = row_len > 0");
    KLANNEAL_CHECK_ARG(p.n_rows % p.batch == 0,
                       "elbo: categorical n_rows must be a multiple of batch");
  } else {
    // row_len == 0: examples without elements ([B, 0]); recon is 0.
    KLANNEAL_CHECK_ARG(p.n_rows == p.batch, "elbo: n_rows must equal batch for this likelihood");
  }
}

void check_elbo_params(const ElboParams &p) {
  check_elbo_sizes(p);
  const auto red = static_cast<int32_t>(p.reduction);
  const auto fbm = static_cast<int32_t>(p.free_bits_mode);
  KLANNEAL_CHECK_ARG(valid_code(red, kNumReductions),
                     "elbo: unknown reduction " + std::to_string(red));
  KLANNEAL_CHECK_ARG(valid_code(fbm, kNumFreeBitsModes),
                     "elbo: unknown free_bits_mode " + std::to_string(fbm));
  KLANNEAL_CHECK_ARG(valid_code(static_cast<int32_t>(p.recon_dtype), kNumDTypes) &&
                         valid_code(static_cast<int32_t>(p.latent_dtype), kNumDTypes),
                     "elbo: unknown dtype");
  KLANNEAL_CHECK_ARG(std::isfinite(p.free_bits) && p.free_bits >= 0.0,
                     "elbo: free_bits must be finite and >= 0");
  KLANNEAL_CHECK_ARG(std::isfinite(p.gaussian_var) && p.gaussian_var > 0.0,
                     "elbo: gaussian_var must be finite and > 0");
  KLANNEAL_CHECK_ARG(!(p.reduction == Reduction::kNone && p.free_bits > 0.0 &&
                       p.free_bits_mode == FreeBitsMode::kBatch),
                     "elbo: reduction 'none' is not allowed with free bits in 'batch' mode");
  const bool has_elems = p.n_rows > 0 && p.row_len > 0;
  KLANNEAL_CHECK_ARG(!has_elems || (p.recon_input != nullptr && p.target != nullptr),
                     "elbo: null input pointer");
  KLANNEAL_CHECK_ARG(p.latent_dim == 0 || (p.mu != nullptr && p.logvar != nullptr),
                     "elbo: null mu/logvar pointer");
  KLANNEAL_CHECK_ARG((p.prior_mu == nullptr) == (p.prior_logvar == nullptr),
                     "elbo: prior_mu and prior_logvar go together (both or neither)");
  KLANNEAL_CHECK_ARG(p.latent_dim == 0 || p.prior_mu != nullptr ||
                         (p.grad_prior_mu == nullptr && p.grad_prior_logvar == nullptr),
                     "elbo: prior gradients asked for without a prior");
  if (p.has_capacity)
    check_schedule_params(p.capacity.schedule);
  KLANNEAL_CHECK_ARG(p.loss != nullptr && p.recon != nullptr && p.kl != nullptr &&
                         p.beta_out != nullptr,
                     "elbo: null output pointer");
  // fp16/bf16 gradients are stored in fp32 (grad_dtype in elbo.h): they
  // cannot be written over a half-precision recon_input.
  KLANNEAL_CHECK_ARG(
      !(p.grad_recon != nullptr && p.grad_recon == p.recon_input && is_half(p.recon_dtype)),
      "elbo: an inplace gradient needs fp32/fp64 recon_input (fp16/bf16 "
      "gradients are kept in fp32)");
  if (p.beta.tensor == nullptr && p.step_ptr != nullptr)
    check_schedule_params(p.beta.schedule);
  if (p.beta.tensor == nullptr && p.step_ptr == nullptr)
    KLANNEAL_CHECK_ARG(std::isfinite(p.beta.value) && p.beta.value >= 0.0,
                       "elbo: beta must be finite and >= 0, got " + std::to_string(p.beta.value));
}

} // namespace klanneal
