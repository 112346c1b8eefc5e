// Closed-form KL-weight (beta) schedules: a pure function of the step, O(1),
// shared by the CPU code, the CUDA kernels and the fused ELBO op (which
// evaluates beta from a step tensor on the device, so a training step can be
// captured in a CUDA graph).
#pragma once

#include <cmath>
#include <cstdint>

#include "klanneal/common.h"

namespace klanneal {

#define KLANNEAL_SCHEDULE_KINDS(X)                                                                 \
  X(kConstant, "constant")                                                                         \
  X(kMonotonic, "monotonic") X(kCyclical, "cyclical") X(kCapacity, "capacity")
enum class ScheduleKind : int32_t { KLANNEAL_SCHEDULE_KINDS(KLANNEAL_ENUM_ENTRY) };
#define KLANNEAL_RAMP_SHAPES(X)                                                                    \
  X(kLinear, "linear") X(kSigmoid, "sigmoid") X(kCosine, "cosine") X(kLogistic, "logistic")
enum class RampShape : int32_t { KLANNEAL_RAMP_SHAPES(KLANNEAL_ENUM_ENTRY) };

// The number of entries of each list: the valid codes are 0 .. count - 1.
constexpr int32_t kNumScheduleKinds = 0 KLANNEAL_SCHEDULE_KINDS(KLANNEAL_COUNT_ENTRY);
constexpr int32_t kNumRampShapes = 0 KLANNEAL_RAMP_SHAPES(KLANNEAL_COUNT_ENTRY);

// Plain-old-data so it can be passed by value to a kernel. Python packs it
// as a list of 8 floats (Schedule.to_params() in klanneal/schedules.py) in
// the order of the fields below; check_schedule_params (schedules_cpu.h)
// states which values are valid.
struct ScheduleParams {
  ScheduleKind kind = ScheduleKind::kConstant;
  RampShape shape = RampShape::kLinear;
  double start = 0.0;       // value at the start of each ramp (Constant: beta)
  double stop = 1.0;        // value at the end of each ramp and after total_steps
  double total_steps = 1.0; // Cyclical: schedule length; Monotonic/Capacity: warm-up steps
  double n_cycles = 1.0;    // Cyclical only
  double ratio = 1.0;       // Cyclical: fraction of each period spent ramping
  double zero_ratio = 0.0;  // Cyclical: fraction of each period held at start first
};

// a * b, never fused with a neighbouring add into an FMA: the host build
// passes -ffp-contract=off and the device uses the round-to-nearest
// intrinsic (nvcc fuses by default), so the CPU, every ISA-specific
// translation unit and the GPU compute the same bits for the same step.
KLANNEAL_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// Ramp shapes on u in [0, 1], each mapping 0 -> 0 and 1 -> 1 except the
// logistic. The sigmoid is the paper's 1/(1+exp(-(12u-6))) rescaled so that
// each cycle starts exactly at `start` and ends at `stop`; the logistic is
// the same curve not rescaled (0.0025 at u = 0, 0.9975 at u = 1), as the
// notebook's frange_cycle_sigmoid and Sentence-VAE's logistic annealing are.
// exp and cos come from the platform's math library, so sigmoid and cosine
// values may differ between CPU and GPU in the last bit; linear never does.
KLANNEAL_HD double ramp_shape(RampShape shape, double u) {
  switch (shape) {
  case RampShape::kSigmoid: {
    const double lo = 1.0 / (1.0 + exp(6.0));
    const double hi = 1.0 / (1.0 + exp(-6.0));
    const double s = 1.0 / (1.0 + exp(-(mul_rn(12.0, u) - 6.0)));
    return (s - lo) / (hi - lo);
  }
  case RampShape::kLogistic:
    return 1.0 / (1.0 + exp(-(mul_rn(12.0, u) - 6.0)));
  case RampShape::kCosine:
    return 0.5 - mul_rn(0.5, cos(mul_rn(3.14159265358979323846, u)));
  default:
    return u;
  }
}

// start + (stop - start) * r for r in [0, 1], clamped to the closed interval
// between start and stop: rounding of the product and the sum must not push
// a value past the end of the ramp (start > stop, a decreasing ramp, is fine).
KLANNEAL_HD double ramp_between(double start, double stop, double r) {
  const double v = start + mul_rn(stop - start, r);
  const double lo = start < stop ? start : stop;
  const double hi = start < stop ? stop : start;
  return v < lo ? lo : (v > hi ? hi : v);
}

// Value of the schedule at `step` (>= 0; the Python layer rejects negative
// steps, here they are clamped to 0). After total_steps every schedule holds
// `stop`.
//
// Cyclical: period = total_steps / n_cycles, tau in [0, 1) is the position
// inside the current period; the first zero_ratio of it holds `start`, the
// next `ratio` ramps from start to stop, the rest holds `stop`. The cycle and
// tau are computed from step * n_cycles with integer-valued doubles, which
// is exact while total_steps * n_cycles <= 2**52 (checked by
// check_schedule_params): cycle boundaries fall on exactly the right step and
// a schedule whose period is a whole number of steps is exactly periodic.
KLANNEAL_HD double schedule_value(const ScheduleParams &p, int64_t step) {
  const double t = step < 0 ? 0.0 : static_cast<double>(step);
  switch (p.kind) {
  case ScheduleKind::kConstant:
    return p.start;
  case ScheduleKind::kMonotonic:
  case ScheduleKind::kCapacity: {
    if (!(t < p.total_steps))
      return p.stop; // also warm-up of 0 steps
    return ramp_between(p.start, p.stop, t / p.total_steps);
  }
  case ScheduleKind::kCyclical: {
    if (!(t < p.total_steps))
      return p.stop;
    const double scaled = mul_rn(t, p.n_cycles); // < 2**52: exact
    const double cycle = floor(scaled / p.total_steps);
    const double tau = (scaled - mul_rn(cycle, p.total_steps)) / p.total_steps;
    if (tau < p.zero_ratio)
      return p.start;
    const double u = (tau - p.zero_ratio) / p.ratio;
    if (u >= 1.0)
      return p.stop;
    return ramp_between(p.start, p.stop, ramp_shape(p.shape, u));
  }
  }
  return p.stop;
}

} // namespace klanneal
