// Beta schedules as arrays: the reference-exact frange_cycle_* functions of
// the cyclical-annealing paper's code (Fu et al., NAACL 2019) and the
// vectorised evaluation of the closed-form schedules of schedule.h.
//
// Everything here writes into caller-provided float64 buffers and throws
// std::invalid_argument on bad arguments (ValueError in Python; the Python
// layer validates first with friendlier messages).
#pragma once

#include <cstdint>

#include "klanneal/common.h"
#include "klanneal/schedule.h"

namespace klanneal {

// The published frange_cycle_linear, bit for bit:
//
//   L = np.ones(n_iter) * stop
//   period = n_iter/n_cycle
//   step = (stop-start)/(period*ratio)
//   for c in range(n_cycle):
//       v, i = start, 0
//       while v <= stop and (int(i+c*period) < n_iter):
//           L[int(i+c*period)] = v
//           v += step
//           i += 1
//
// out: [n_iter]. Requires n_iter >= 0, 1 <= n_cycle <= 2**53, ratio in
// (0, 1], finite start/stop and period*ratio > 0 (the published code divides
// by it). n_iter == 0 writes nothing (the published code raises
// ZeroDivisionError there). The cycles are replayed last to first and stop
// as soon as everything they would still write is overwritten later, so the
// cost is O(n_iter + n_cycle) even where the published loop is
// O(n_cycle * n_iter) (start == stop, or a step below half an ulp of v).
void frange_cycle_linear(double *out, int64_t n_iter, double start, double stop, int64_t n_cycle,
                         double ratio);

// The notebook's frange_cycle_sigmoid / frange_cycle_cosine: the loop above,
// writing start + (stop - start) * f((v - start) / (stop - start)) with
// f(u) = 1/(1+exp(-(12u-6))) resp. 0.5 - 0.5*cos(pi*u), clamped to
// [start, stop] (start == stop writes start). For start=0, stop=1 that is
// the notebook's f(v).
void frange_cycle_sigmoid(double *out, int64_t n_iter, double start, double stop, int64_t n_cycle,
                          double ratio);
void frange_cycle_cosine(double *out, int64_t n_iter, double start, double stop, int64_t n_cycle,
                         double ratio);

// Optimus' frange_cycle_zero_linear, bit for bit: each period holds `start`
// for i < period*ratio_zero, then ramps like frange_cycle_linear with
// step = (stop-start)/(period*ratio_increase). Requires ratio_increase in
// (0, 1], ratio_zero in [0, 1), ratio_increase + ratio_zero <= 1.
void frange_cycle_zero_linear(double *out, int64_t n_iter, double start, double stop,
                              int64_t n_cycle, double ratio_increase, double ratio_zero);

// Throws std::invalid_argument unless `p` is a schedule the Python classes
// can produce: kind and shape in range, finite values; Monotonic/Capacity:
// total_steps >= 0; Cyclical: whole-number 1 <= n_cycles <= total_steps,
// total_steps * n_cycles <= 2**52, ratio in (0, 1], zero_ratio in [0, 1),
// ratio + zero_ratio <= 1.
void check_schedule_params(const ScheduleParams &p);

// out[k] = schedule_value(p, steps[k]) for k < n; steps: [n], out: [n].
// Throws std::invalid_argument naming the first negative step (after
// filling out, with negative steps clamped to 0). n_threads <= 0: one
// thread per hardware thread for large n.
void schedule_values(const ScheduleParams &p, const int64_t *steps, double *out, int64_t n,
                     int n_threads = 0);

// out[k] = schedule_value(p, first_step + k) for k < n; first_step >= 0.
void schedule_values_range(const ScheduleParams &p, int64_t first_step, double *out, int64_t n,
                           int n_threads = 0);

#if KLANNEAL_WITH_CUDA
// schedule_values on the GPU: steps and out are device pointers, `stream` a
// cudaStream_t (nullptr: the legacy default stream). Asynchronous; negative
// steps are clamped to 0 (the caller checks them). Throws
// std::runtime_error naming the CUDA error if the launch fails.
void launch_schedule_values_cuda(const ScheduleParams &p, const int64_t *steps, double *out,
                                 int64_t n, void *stream);
#endif

} // namespace klanneal
