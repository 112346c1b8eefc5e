// Python -> ElboParams. The Python layer (klanneal/_kernels.py) passes the packed
// call of klanneal/elbo_layout.h: pointers are Python ints (tensor.data_ptr(),
// 0 for "none"), enums are ints, the schedule is 8 floats of the `floats`
// array (ScheduleParams field order).
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "klanneal/elbo.h"
#include "klanneal/elbo_layout.h"

namespace klanneal {

inline ScheduleParams schedule_params_from_list(const std::vector<double> &v) {
  KLANNEAL_CHECK_ARG(v.size() == 8, "schedule: expected 8 floats (kind, shape, start, stop, "
                                    "total_steps, n_cycles, ratio, zero_ratio), got " +
                                        std::to_string(v.size()));
  // kind and shape become enums: range-check them before the cast (a
  // double outside int32's range would make the cast undefined).
  KLANNEAL_CHECK_ARG(
      v[0] >= 0.0 && v[0] < kNumScheduleKinds && v[1] >= 0.0 && v[1] < kNumRampShapes &&
          v[0] == static_cast<double>(static_cast<int32_t>(v[0])) &&
          v[1] == static_cast<double>(static_cast<int32_t>(v[1])),
      "schedule: kind must be a whole number in 0.." + std::to_string(kNumScheduleKinds - 1) +
          " and shape in 0.." + std::to_string(kNumRampShapes - 1));
  ScheduleParams s;
  s.kind = static_cast<ScheduleKind>(static_cast<int32_t>(v[0]));
  s.shape = static_cast<RampShape>(static_cast<int32_t>(v[1]));
  s.start = v[2];
  s.stop = v[3];
  s.total_steps = v[4];
  s.n_cycles = v[5];
  s.ratio = v[6];
  s.zero_ratio = v[7];
  return s;
}

// ElboParams from the packed call (klanneal/elbo_layout.h): sizes, pointers,
// floats and ints, each in its slot order. The one place that knows which
// field each slot fills.
inline ElboParams elbo_params_from_packed(const std::vector<int64_t> &sizes,
                                          const std::vector<uint64_t> &ptrs,
                                          const std::vector<double> &floats,
                                          const std::vector<int64_t> &ints) {
  KLANNEAL_CHECK_ARG(sizes.size() == static_cast<size_t>(SizeSlot::kCount) &&
                         ptrs.size() == static_cast<size_t>(PtrSlot::kCount) &&
                         floats.size() == static_cast<size_t>(FloatSlot::kCount) &&
                         ints.size() == static_cast<size_t>(IntSlot::kCount),
                     "elbo: packed arguments of the wrong length (see _C.elbo_layout())");
  auto size = [&](SizeSlot k) { return sizes[static_cast<size_t>(k)]; };
  auto ptr = [&](PtrSlot k) {
    return reinterpret_cast<void *>(static_cast<uintptr_t>(ptrs[static_cast<size_t>(k)]));
  };
  auto f64 = [&](FloatSlot k) { return floats[static_cast<size_t>(k)]; };
  auto i64 = [&](IntSlot k) { return ints[static_cast<size_t>(k)]; };
  ElboParams p;
  p.batch = size(SizeSlot::k_batch);
  p.n_rows = size(SizeSlot::k_n_rows);
  p.row_len = size(SizeSlot::k_row_len);
  p.latent_dim = size(SizeSlot::k_latent_dim);
  // Enum codes are range-checked by check_elbo_params before any use; a
  // value outside int32 is rejected here, before the cast.
  auto code = [](int64_t v) {
    KLANNEAL_CHECK_ARG(v >= 0 && v <= 255, "elbo: an enum code is out of range");
    return static_cast<int32_t>(v);
  };
  p.recon_dtype = static_cast<DType>(code(size(SizeSlot::k_recon_dtype)));
  p.latent_dtype = static_cast<DType>(code(size(SizeSlot::k_latent_dtype)));
  const int64_t threads = size(SizeSlot::k_n_threads);
  p.n_threads = static_cast<int>(threads < 1 ? 1 : threads > 4096 ? 4096 : threads);
  KLANNEAL_CHECK_ARG(size(SizeSlot::k_out_dtype) == static_cast<int64_t>(DType::kFloat64) ||
                         size(SizeSlot::k_out_dtype) == static_cast<int64_t>(DType::kFloat32),
                     "elbo: out_dtype must be float64 or float32");
  p.likelihood = static_cast<Likelihood>(code(i64(IntSlot::k_likelihood)));
  p.reduction = static_cast<Reduction>(code(i64(IntSlot::k_reduction)));
  p.free_bits_mode = static_cast<FreeBitsMode>(code(i64(IntSlot::k_free_bits_mode)));
  p.ignore_index = i64(IntSlot::k_ignore_index);
  p.free_bits = f64(FloatSlot::k_free_bits);
  p.gaussian_var = f64(FloatSlot::k_gaussian_var);
  p.beta.value = f64(FloatSlot::k_beta_value);
  auto schedule_at = [&](FloatSlot first) {
    const auto begin = floats.begin() + static_cast<int>(first);
    return schedule_params_from_list(std::vector<double>(begin, begin + 8));
  };
  p.beta.schedule = schedule_at(FloatSlot::k_schedule_kind);
  p.has_capacity = i64(IntSlot::k_has_capacity) != 0;
  p.capacity.schedule = schedule_at(FloatSlot::k_capacity_kind);
  p.recon_input = ptr(PtrSlot::k_recon_input);
  p.target = ptr(PtrSlot::k_target);
  p.mu = ptr(PtrSlot::k_mu);
  p.logvar = ptr(PtrSlot::k_logvar);
  p.prior_mu = ptr(PtrSlot::k_prior_mu);
  p.prior_logvar = ptr(PtrSlot::k_prior_logvar);
  p.global_kl_per_dim = static_cast<const double *>(ptr(PtrSlot::k_global_kl_per_dim));
  p.beta.tensor = static_cast<const double *>(ptr(PtrSlot::k_beta_ptr));
  p.step_ptr = static_cast<const int64_t *>(ptr(PtrSlot::k_step_ptr));
  p.loss = static_cast<double *>(ptr(PtrSlot::k_loss));
  p.recon = static_cast<double *>(ptr(PtrSlot::k_recon));
  p.kl = static_cast<double *>(ptr(PtrSlot::k_kl));
  p.kl_per_dim = static_cast<double *>(ptr(PtrSlot::k_kl_per_dim));
  p.beta_out = static_cast<double *>(ptr(PtrSlot::k_beta_out));
  p.kl_weight = static_cast<double *>(ptr(PtrSlot::k_kl_weight));
  p.grad_recon = ptr(PtrSlot::k_grad_recon);
  p.grad_mu = ptr(PtrSlot::k_grad_mu);
  p.grad_logvar = ptr(PtrSlot::k_grad_logvar);
  p.grad_prior_mu = ptr(PtrSlot::k_grad_prior_mu);
  p.grad_prior_logvar = ptr(PtrSlot::k_grad_prior_logvar);
  return p;
}

// The launchers write float64 outputs (ElboParams). With out_dtype float32
// (the CPU binding's eager path: the results in their final dtype, no cast
// afterwards), the launcher writes into float64 scratch and this copies the
// values into the caller's float32 buffers once it returns.
class Float32Outputs {
public:
  // Points p's six scalar outputs at float64 scratch, remembering the caller's buffers.
  explicit Float32Outputs(ElboParams &p) {
    const int64_t n = p.reduction == Reduction::kNone ? p.batch : 1;
    const int64_t lens[kOutputs] = {n, n, n, p.latent_dim, 1, n};
    double **fields[kOutputs] = {&p.loss,       &p.recon,    &p.kl,
                                 &p.kl_per_dim, &p.beta_out, &p.kl_weight};
    int64_t total = 0;
    for (int64_t len : lens)
      total += len;
    scratch_.assign(static_cast<size_t>(total), 0.0);
    double *next = scratch_.data();
    for (int i = 0; i < kOutputs; ++i) {
      dst_[i] = reinterpret_cast<float *>(*fields[i]);
      len_[i] = dst_[i] != nullptr ? lens[i] : 0;
      src_[i] = next;
      if (dst_[i] != nullptr)
        *fields[i] = next;
      next += lens[i];
    }
  }
  // After the launch: the values, rounded to float32, into the caller's buffers.
  void copy_out() const {
    for (int i = 0; i < kOutputs; ++i)
      for (int64_t j = 0; j < len_[i]; ++j)
        dst_[i][j] = static_cast<float>(src_[i][j]);
  }

private:
  static constexpr int kOutputs = 6; // loss, recon, kl, kl_per_dim, beta_out, kl_weight
  std::vector<double> scratch_;
  float *dst_[kOutputs] = {};
  const double *src_[kOutputs] = {};
  int64_t len_[kOutputs] = {};
};

inline bool wants_float32_outputs(const std::vector<int64_t> &sizes) {
  return sizes[static_cast<size_t>(SizeSlot::k_out_dtype)] == static_cast<int64_t>(DType::kFloat32);
}

// Runs the CPU launcher on p: the first invalid target's flat index when
// `validate`, else -1; float32 outputs through Float32Outputs when asked.
// The GIL is released around the launch when `release_gil` (the launcher
// never calls back into Python); a call too small to be worth the hand-over
// keeps it.
inline int64_t run_elbo_cpu(ElboParams &p, bool validate, bool float32_outputs, bool release_gil) {
  int64_t first_invalid = -1;
  if (validate)
    p.first_invalid_target = &first_invalid;
  auto launch = [&] {
    if (release_gil) {
      pybind11::gil_scoped_release release;
      launch_elbo_cpu(p);
    } else {
      launch_elbo_cpu(p);
    }
  };
  if (float32_outputs) {
    Float32Outputs outputs(p);
    launch();
    outputs.copy_out();
  } else {
    launch();
  }
  return first_invalid;
}

} // namespace klanneal
