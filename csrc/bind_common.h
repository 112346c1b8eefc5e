// Python -> ElboParams. The Python layer (klanneal/_ops.py) passes one dict
// whose keys are the ElboParams field names; pointers are Python ints
// (tensor.data_ptr(), 0 for "none"), enums are ints, `schedule` is the list
// of 8 floats from klanneal.schedules (ScheduleParams field order).
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "klanneal/elbo.h"

namespace klanneal {

inline ScheduleParams schedule_params_from_list(const std::vector<double>& v) {
  KLANNEAL_CHECK_ARG(v.size() == 8, "schedule: expected 8 floats (kind, shape, start, stop, "
                                    "total_steps, n_cycles, ratio, zero_ratio), got " +
                                        std::to_string(v.size()));
  // kind and shape become enums: range-check them before the cast (a
  // double outside int32's range would make the cast undefined).
  KLANNEAL_CHECK_ARG(v[0] >= 0.0 && v[0] <= 3.0 && v[1] >= 0.0 && v[1] <= 2.0 &&
                         v[0] == static_cast<double>(static_cast<int32_t>(v[0])) &&
                         v[1] == static_cast<double>(static_cast<int32_t>(v[1])),
                     "schedule: kind must be a whole number in 0..3 and shape in 0..2");
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

inline ElboParams elbo_params_from_dict(const pybind11::dict& d) {
  auto get = [&](const char* key) -> pybind11::handle {
    KLANNEAL_CHECK_ARG(d.contains(key), std::string("elbo params: missing key '") + key + "'");
    return d[key];
  };
  auto i64 = [&](const char* key) { return get(key).cast<int64_t>(); };
  auto f64 = [&](const char* key) { return get(key).cast<double>(); };
  auto ptr = [&](const char* key) {
    return reinterpret_cast<void*>(static_cast<uintptr_t>(get(key).cast<uint64_t>()));
  };
  ElboParams p;
  p.batch = i64("batch");
  p.n_rows = i64("n_rows");
  p.row_len = i64("row_len");
  p.latent_dim = i64("latent_dim");
  p.likelihood = static_cast<Likelihood>(i64("likelihood"));
  p.reduction = static_cast<Reduction>(i64("reduction"));
  p.free_bits_mode = static_cast<FreeBitsMode>(i64("free_bits_mode"));
  p.recon_dtype = static_cast<DType>(i64("recon_dtype"));
  p.latent_dtype = static_cast<DType>(i64("latent_dtype"));
  p.free_bits = f64("free_bits");
  p.gaussian_var = f64("gaussian_var");
  p.ignore_index = i64("ignore_index");
  p.beta_ptr = static_cast<const double*>(ptr("beta_ptr"));
  p.step_ptr = static_cast<const int64_t*>(ptr("step_ptr"));
  p.schedule = schedule_params_from_list(get("schedule").cast<std::vector<double>>());
  p.beta_value = f64("beta_value");
  p.recon_input = ptr("recon_input");
  p.target = ptr("target");
  p.mu = ptr("mu");
  p.logvar = ptr("logvar");
  p.loss = static_cast<double*>(ptr("loss"));
  p.recon = static_cast<double*>(ptr("recon"));
  p.kl = static_cast<double*>(ptr("kl"));
  p.kl_per_dim = static_cast<double*>(ptr("kl_per_dim"));
  p.beta_out = static_cast<double*>(ptr("beta_out"));
  p.grad_recon = ptr("grad_recon");
  p.grad_mu = ptr("grad_mu");
  p.grad_logvar = ptr("grad_logvar");
  p.n_threads = static_cast<int>(i64("n_threads"));
  // Optional key (added after the others): absent or 0 = do not check.
  if (d.contains("first_invalid_target"))
    p.first_invalid_target = static_cast<int64_t*>(ptr("first_invalid_target"));
  return p;
}

}  // namespace klanneal
