// Closed-form KL-weight (beta) schedules: a pure function of the step, O(1),
// shared by the CPU code, the CUDA kernels and the fused ELBO op (which
// evaluates beta from a step tensor on the device, so a training step can be
// captured in a CUDA graph).
#pragma once

#include <cmath>
#include <cstdint>

#include "klanneal/common.h"

namespace klanneal {

enum class ScheduleKind : int32_t { kConstant = 0, kMonotonic = 1, kCyclical = 2, kCapacity = 3 };
enum class RampShape : int32_t { kLinear = 0, kSigmoid = 1, kCosine = 2 };

// Plain-old-data so it can be passed by value to a kernel. Python packs it
// as a list of floats (schedule_to_floats in klanneal/schedules.py) in the
// order of the fields below.
struct ScheduleParams {
  ScheduleKind kind = ScheduleKind::kConstant;
  RampShape shape = RampShape::kLinear;
  double start = 0.0;        // value at the start of each ramp (Constant: beta)
  double stop = 1.0;         // value at the end of each ramp and after total_steps
  double total_steps = 1.0;  // Cyclical: schedule length; Monotonic/Capacity: warm-up steps
  double n_cycles = 1.0;     // Cyclical only
  double ratio = 1.0;        // Cyclical: fraction of each period spent ramping
  double zero_ratio = 0.0;   // Cyclical: fraction of each period held at start first
};

// Ramp shapes on u in [0, 1], each mapping 0 -> 0 and 1 -> 1. The sigmoid is
// the paper's 1/(1+exp(-(12u-6))) rescaled so that each cycle starts exactly
// at `start` and ends at `stop` (the notebook's version starts at 0.0025).
KLANNEAL_HD double ramp_shape(RampShape shape, double u) {
  switch (shape) {
    case RampShape::kSigmoid: {
      const double lo = 1.0 / (1.0 + exp(6.0));
      const double hi = 1.0 / (1.0 + exp(-6.0));
      const double s = 1.0 / (1.0 + exp(-(12.0 * u - 6.0)));
      return (s - lo) / (hi - lo);
    }
    case RampShape::kCosine:
      return 0.5 - 0.5 * cos(3.14159265358979323846 * u);
    default:
      return u;
  }
}

// Value of the schedule at `step` (>= 0; the Python layer rejects negative
// steps, here they are clamped to 0). After total_steps every schedule holds
// `stop`.
KLANNEAL_HD double schedule_value(const ScheduleParams& p, int64_t step) {
  const double t = step < 0 ? 0.0 : static_cast<double>(step);
  switch (p.kind) {
    case ScheduleKind::kConstant:
      return p.start;
    case ScheduleKind::kMonotonic:
    case ScheduleKind::kCapacity: {
      if (!(t < p.total_steps)) return p.stop;  // also warm-up of 0 steps
      return p.start + (p.stop - p.start) * (t / p.total_steps);
    }
    case ScheduleKind::kCyclical: {
      if (!(t < p.total_steps)) return p.stop;
      const double period = p.total_steps / p.n_cycles;
      const double cycle = floor(t / period);
      const double tau = (t - cycle * period) / period;  // position in [0, 1)
      if (tau < p.zero_ratio) return p.start;
      const double u = (tau - p.zero_ratio) / p.ratio;
      if (u >= 1.0) return p.stop;
      return p.start + (p.stop - p.start) * ramp_shape(p.shape, u);
    }
  }
  return p.stop;
}

}  // namespace klanneal
