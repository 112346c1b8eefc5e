// The packed form of an ElboParams call, defined once: the bindings take
// four arrays (sizes, pointers, floats, ints) laid out in these slot orders,
// and _C exports the slot names and every enum code (_C.elbo_layout()), so
// Python packs by name and never by a literal index. Each list below is an
// X-macro X(slot_name); elbo_params_from_packed (csrc/bind_common.h) is the
// one place that knows which ElboParams field a slot fills (most share its
// name; the schedules' floats fill ScheduleParams fields; validate and
// out_dtype are read by the bindings, need_grad_* by the Python layer, which
// allocates the gradients asked for).
#pragma once

#include <cstdint>

#include "klanneal/elbo.h"

namespace klanneal {

#define KLANNEAL_ELBO_SIZES(X)                                                                     \
  X(batch)                                                                                         \
  X(n_rows)                                                                                        \
  X(row_len)                                                                                       \
  X(latent_dim)                                                                                    \
  X(recon_dtype)                                                                                   \
  X(latent_dtype)                                                                                  \
  X(n_threads)                                                                                     \
  X(out_dtype)

// Pointers are Python ints (tensor.data_ptr(), 0 for none).
#define KLANNEAL_ELBO_PTRS(X)                                                                      \
  X(recon_input)                                                                                   \
  X(target)                                                                                        \
  X(mu)                                                                                            \
  X(logvar)                                                                                        \
  X(prior_mu)                                                                                      \
  X(prior_logvar)                                                                                  \
  X(global_kl_per_dim)                                                                             \
  X(beta_ptr)                                                                                      \
  X(step_ptr)                                                                                      \
  X(loss)                                                                                          \
  X(recon)                                                                                         \
  X(kl)                                                                                            \
  X(kl_per_dim)                                                                                    \
  X(beta_out)                                                                                      \
  X(kl_weight)                                                                                     \
  X(grad_recon)                                                                                    \
  X(grad_mu)                                                                                       \
  X(grad_logvar)                                                                                   \
  X(grad_prior_mu)                                                                                 \
  X(grad_prior_logvar)

// The scalar options of the torch op's schema, `floats` and `ints` (torch's
// per-call cost grows with the square of the schema's argument count: two
// lists instead of eleven arguments). Each schedule's 8 floats (beta's and
// the capacity's) follow ScheduleParams' field order.
#define KLANNEAL_ELBO_FLOATS(X)                                                                    \
  X(beta_value)                                                                                    \
  X(free_bits)                                                                                     \
  X(gaussian_var)                                                                                  \
  X(schedule_kind)                                                                                 \
  X(schedule_shape)                                                                                \
  X(schedule_start)                                                                                \
  X(schedule_stop)                                                                                 \
  X(schedule_total_steps)                                                                          \
  X(schedule_n_cycles)                                                                             \
  X(schedule_ratio)                                                                                \
  X(schedule_zero_ratio)                                                                           \
  X(capacity_kind)                                                                                 \
  X(capacity_shape)                                                                                \
  X(capacity_start)                                                                                \
  X(capacity_stop)                                                                                 \
  X(capacity_total_steps)                                                                          \
  X(capacity_n_cycles)                                                                             \
  X(capacity_ratio)                                                                                \
  X(capacity_zero_ratio)

#define KLANNEAL_ELBO_INTS(X)                                                                      \
  X(likelihood)                                                                                    \
  X(reduction)                                                                                     \
  X(free_bits_mode)                                                                                \
  X(ignore_index)                                                                                  \
  X(validate)                                                                                      \
  X(need_grad_recon)                                                                               \
  X(need_grad_mu)                                                                                  \
  X(need_grad_logvar)                                                                              \
  X(need_grad_prior_mu)                                                                            \
  X(need_grad_prior_logvar)                                                                        \
  X(has_capacity)

#define KLANNEAL_SLOT_ENUM(name) k_##name,
enum class SizeSlot : int { KLANNEAL_ELBO_SIZES(KLANNEAL_SLOT_ENUM) kCount };
enum class PtrSlot : int { KLANNEAL_ELBO_PTRS(KLANNEAL_SLOT_ENUM) kCount };
enum class FloatSlot : int { KLANNEAL_ELBO_FLOATS(KLANNEAL_SLOT_ENUM) kCount };
enum class IntSlot : int { KLANNEAL_ELBO_INTS(KLANNEAL_SLOT_ENUM) kCount };
#undef KLANNEAL_SLOT_ENUM

} // namespace klanneal
