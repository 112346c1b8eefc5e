#include "klanneal/schedules_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "klanneal/parallel_cpu.h"
#include "klanneal/schedule.h"

namespace klanneal {
namespace {

constexpr double kPi = 3.14159265358979323846; // == math.pi
constexpr double kTwoPow52 = 4503599627370496.0;
constexpr int64_t kTwoPow53 = int64_t{1} << 53;
// Below this many steps one thread is faster than starting more.
constexpr int64_t kMinStepsPerThread = int64_t{1} << 16;

void check_frange_common(const char *fn, int64_t n_iter, double start, double stop,
                         int64_t n_cycle) {
  const std::string f = std::string(fn) + ": ";
  KLANNEAL_CHECK_ARG(n_iter >= 0, f + "n_iter must be >= 0, got " + std::to_string(n_iter));
  KLANNEAL_CHECK_ARG(n_cycle >= 1, f + "n_cycle must be >= 1, got " + std::to_string(n_cycle));
  KLANNEAL_CHECK_ARG(n_cycle <= kTwoPow53, f + "n_cycle must be <= 2**53");
  KLANNEAL_CHECK_ARG(std::isfinite(start), f + "start must be finite");
  KLANNEAL_CHECK_ARG(std::isfinite(stop), f + "stop must be finite");
}

void check_ratio(const char *fn, const char *name, double ratio) {
  KLANNEAL_CHECK_ARG(ratio > 0.0 && ratio <= 1.0, std::string(fn) + ": " + name +
                                                      " must be in (0, 1], got " +
                                                      std::to_string(ratio));
}

// The published code computes (stop-start)/(period*ratio): a ratio so small
// that the product underflows raises ZeroDivisionError there.
void check_ramp_length(const char *fn, const char *name, double period, double ratio) {
  KLANNEAL_CHECK_ARG(period * ratio > 0.0, std::string(fn) + ": (n_iter / n_cycle) * " + name +
                                               " underflows to 0 (" + name + " too small)");
}

// One cycle of the published loop writes value(i) to int(i + c*period) for
// i = 0, 1, ... while the ramp is active and the index is in range. The
// written values depend on i only, never on c, so each cycle restarts the
// ramp from a copy of the prototype.
//
// Later cycles overwrite earlier ones. Replaying the cycles last to first,
// an index is final once written (`written`), and `covered_from` is the
// smallest index with everything in [covered_from, n_iter) final. Because
// int(i + c*period) never decreases with i, a cycle stops at the first
// index >= covered_from, and a cycle starting at or beyond it is skipped.
// That bounds the work by O(n_iter + n_cycle) where the forward loop runs
// every cycle to n_iter (a ramp that never exceeds stop). `written` is
// needed because i + c*period is rounded: a cycle can skip an index (e.g.
// 1 + 7.999999999999999 == 9.0), which an earlier cycle then supplies.
template <class Ramp>
void replay_cycles(double *out, int64_t n_iter, int64_t n_cycle, double period,
                   const Ramp &prototype) {
  std::vector<uint8_t> written(static_cast<size_t>(n_iter), 0);
  int64_t covered_from = n_iter;
  int64_t c = n_cycle - 1;
  while (c >= 0 && covered_from > 0) {
    const double offset = static_cast<double>(c) * period; // Python: c*period
    if (static_cast<int64_t>(offset) >= covered_from) {
      // c * period never decreases with c: jump to the last cycle that
      // starts before covered_from (the estimate is at most a few off).
      const double estimate = std::floor(static_cast<double>(covered_from) / period) + 1.0;
      int64_t next = estimate < static_cast<double>(c - 1) ? static_cast<int64_t>(estimate) : c - 1;
      while (next >= 0 &&
             static_cast<int64_t>(static_cast<double>(next) * period) >= covered_from) {
        --next;
      }
      c = next;
      continue;
    }
    Ramp ramp = prototype;
    for (int64_t i = 0; ramp.active(); ++i) {
      const int64_t index = static_cast<int64_t>(static_cast<double>(i) + offset);
      if (index >= covered_from)
        break;
      if (!written[static_cast<size_t>(index)]) {
        out[index] = ramp.value(i);
        written[static_cast<size_t>(index)] = 1;
      }
      ramp.advance(i);
    }
    while (covered_from > 0 && written[static_cast<size_t>(covered_from - 1)])
      --covered_from;
    --c;
  }
}

// v = start; v += step while v <= stop: the published linear ramp.
struct LinearRamp {
  double v, stop, step;
  bool active() const { return v <= stop; }
  double value(int64_t) const { return v; }
  void advance(int64_t) { v += step; }
};

// The notebook's sigmoid / cosine of the linear ramp's v, mapped onto
// [start, stop].
template <RampShape kShape> struct MappedRamp {
  double v, start, stop, step;
  bool active() const { return v <= stop; }
  double value(int64_t) const {
    const double span = stop - start;
    if (span == 0.0)
      return start;
    const double u = (v - start) / span; // == v for start=0, stop=1
    // Same operations, in the same order, as the notebook.
    const double f = kShape == RampShape::kSigmoid ? 1.0 / (1.0 + std::exp(-(u * 12.0 - 6.0)))
                                                   : 0.5 - 0.5 * std::cos(u * kPi);
    const double mapped = start + span * f;
    return std::min(std::max(mapped, start), stop);
  }
  void advance(int64_t) { v += step; }
};

// Optimus: `start` while i < period*ratio_zero, then the linear ramp.
struct ZeroLinearRamp {
  double v, start, stop, step, zero_len;
  bool active() const { return v <= stop; }
  double value(int64_t i) const { return static_cast<double>(i) < zero_len ? start : v; }
  void advance(int64_t i) {
    if (!(static_cast<double>(i) < zero_len))
      v += step;
  }
};

template <RampShape kShape>
void frange_cycle_mapped(const char *fn, double *out, int64_t n_iter, double start, double stop,
                         int64_t n_cycle, double ratio) {
  check_frange_common(fn, n_iter, start, stop, n_cycle);
  check_ratio(fn, "ratio", ratio);
  if (n_iter == 0)
    return;
  const double period = static_cast<double>(n_iter) / static_cast<double>(n_cycle);
  check_ramp_length(fn, "ratio", period, ratio);
  std::fill(out, out + n_iter, stop);
  if (!(start <= stop))
    return; // the loop condition fails at once
  const double step = (stop - start) / (period * ratio);
  replay_cycles(out, n_iter, n_cycle, period, MappedRamp<kShape>{start, start, stop, step});
}

// Threads for n steps: n_threads (torch.get_num_threads() from Python; <= 0:
// every hardware thread), fewer for short fills. They come from the worker
// pool the ELBO launcher uses (parallel_cpu.h), not from threads started per call.
int worker_count(int64_t n, int n_threads) {
  if (n_threads <= 0)
    n_threads = cpu::max_threads();
  const int64_t by_size = std::max<int64_t>(1, n / kMinStepsPerThread);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, by_size)));
}

// The kind switch is hoisted out of the per-step loop by instantiating the
// loop once per kind; schedule_value itself stays the single definition.
template <ScheduleKind kKind, class StepAt>
void fill_values(const ScheduleParams &p, double *out, int64_t begin, int64_t end,
                 const StepAt &step_at) {
  ScheduleParams q = p;
  q.kind = kKind;
  for (int64_t k = begin; k < end; ++k)
    out[k] = schedule_value(q, step_at(k));
}

template <class StepAt>
void fill_values_any(const ScheduleParams &p, double *out, int64_t begin, int64_t end,
                     const StepAt &step_at) {
  switch (p.kind) {
  case ScheduleKind::kConstant:
    fill_values<ScheduleKind::kConstant>(p, out, begin, end, step_at);
    break;
  case ScheduleKind::kMonotonic:
    fill_values<ScheduleKind::kMonotonic>(p, out, begin, end, step_at);
    break;
  case ScheduleKind::kCyclical:
    fill_values<ScheduleKind::kCyclical>(p, out, begin, end, step_at);
    break;
  case ScheduleKind::kCapacity:
    fill_values<ScheduleKind::kCapacity>(p, out, begin, end, step_at);
    break;
  }
}

bool is_whole(double x) { return std::isfinite(x) && std::floor(x) == x; }

} // namespace

void frange_cycle_linear(double *out, int64_t n_iter, double start, double stop, int64_t n_cycle,
                         double ratio) {
  const char *fn = "frange_cycle_linear";
  check_frange_common(fn, n_iter, start, stop, n_cycle);
  check_ratio(fn, "ratio", ratio);
  if (n_iter == 0)
    return;
  // Python's n_iter/n_cycle: both are exact doubles (<= 2**53), so the
  // correctly rounded int/int division equals the double division.
  const double period = static_cast<double>(n_iter) / static_cast<double>(n_cycle);
  check_ramp_length(fn, "ratio", period, ratio);
  std::fill(out, out + n_iter, stop); // np.ones(n_iter) * stop
  if (!(start <= stop))
    return;
  const double step = (stop - start) / (period * ratio);
  replay_cycles(out, n_iter, n_cycle, period, LinearRamp{start, stop, step});
}

void frange_cycle_sigmoid(double *out, int64_t n_iter, double start, double stop, int64_t n_cycle,
                          double ratio) {
  frange_cycle_mapped<RampShape::kSigmoid>("frange_cycle_sigmoid", out, n_iter, start, stop,
                                           n_cycle, ratio);
}

void frange_cycle_cosine(double *out, int64_t n_iter, double start, double stop, int64_t n_cycle,
                         double ratio) {
  frange_cycle_mapped<RampShape::kCosine>("frange_cycle_cosine", out, n_iter, start, stop, n_cycle,
                                          ratio);
}

void frange_cycle_zero_linear(double *out, int64_t n_iter, double start, double stop,
                              int64_t n_cycle, double ratio_increase, double ratio_zero) {
  const char *fn = "frange_cycle_zero_linear";
  check_frange_common(fn, n_iter, start, stop, n_cycle);
  check_ratio(fn, "ratio_increase", ratio_increase);
  KLANNEAL_CHECK_ARG(ratio_zero >= 0.0 && ratio_zero < 1.0,
                     std::string(fn) + ": ratio_zero must be in [0, 1), got " +
                         std::to_string(ratio_zero));
  KLANNEAL_CHECK_ARG(ratio_increase + ratio_zero <= 1.0,
                     std::string(fn) + ": ratio_increase + ratio_zero must be <= 1");
  if (n_iter == 0)
    return;
  const double period = static_cast<double>(n_iter) / static_cast<double>(n_cycle);
  check_ramp_length(fn, "ratio_increase", period, ratio_increase);
  std::fill(out, out + n_iter, stop);
  if (!(start <= stop))
    return;
  const double step = (stop - start) / (period * ratio_increase);
  const double zero_len = period * ratio_zero;
  replay_cycles(out, n_iter, n_cycle, period, ZeroLinearRamp{start, start, stop, step, zero_len});
}

void check_schedule_params(const ScheduleParams &p) {
  const int32_t kind = static_cast<int32_t>(p.kind);
  const int32_t shape = static_cast<int32_t>(p.shape);
  KLANNEAL_CHECK_ARG(kind >= 0 && kind < kNumScheduleKinds,
                     "schedule: kind must be 0 (constant), 1 (monotonic), 2 (cyclical) or "
                     "3 (capacity), got " +
                         std::to_string(kind));
  KLANNEAL_CHECK_ARG(shape >= 0 && shape < kNumRampShapes,
                     "schedule: shape must be 0 (linear), 1 (sigmoid), 2 (cosine) or 3 "
                     "(logistic), got " +
                         std::to_string(shape));
  KLANNEAL_CHECK_ARG(std::isfinite(p.start) && std::isfinite(p.stop) &&
                         std::isfinite(p.total_steps) && std::isfinite(p.n_cycles) &&
                         std::isfinite(p.ratio) && std::isfinite(p.zero_ratio),
                     "schedule: all parameters must be finite");
  KLANNEAL_CHECK_ARG(p.total_steps >= 0.0, "schedule: total_steps must be >= 0");
  if (p.kind != ScheduleKind::kCyclical)
    return;
  KLANNEAL_CHECK_ARG(is_whole(p.total_steps) && p.total_steps >= 1.0,
                     "schedule: cyclical total_steps must be a whole number >= 1");
  KLANNEAL_CHECK_ARG(is_whole(p.n_cycles) && p.n_cycles >= 1.0 && p.n_cycles <= p.total_steps,
                     "schedule: cyclical n_cycles must be a whole number in [1, total_steps]");
  KLANNEAL_CHECK_ARG(p.total_steps * p.n_cycles <= kTwoPow52,
                     "schedule: cyclical total_steps * n_cycles must be <= 2**52");
  KLANNEAL_CHECK_ARG(p.ratio > 0.0 && p.ratio <= 1.0, "schedule: ratio must be in (0, 1]");
  KLANNEAL_CHECK_ARG(p.zero_ratio >= 0.0 && p.zero_ratio < 1.0,
                     "schedule: zero_ratio must be in [0, 1)");
  KLANNEAL_CHECK_ARG(p.ratio + p.zero_ratio <= 1.0, "schedule: ratio + zero_ratio must be <= 1");
}

void schedule_values(const ScheduleParams &p, const int64_t *steps, double *out, int64_t n,
                     int n_threads) {
  KLANNEAL_CHECK_ARG(n >= 0, "schedule_values: n must be >= 0");
  if (n == 0)
    return;
  // The first negative step (the smallest index over all ranges); reported after the fill.
  std::atomic<int64_t> first_negative{n};
  cpu::parallel_for(n, worker_count(n, n_threads), [&](int64_t begin, int64_t end) {
    fill_values_any(p, out, begin, end, [steps](int64_t k) { return steps[k]; });
    for (int64_t k = begin; k < end; ++k) {
      if (steps[k] < 0) {
        int64_t seen = first_negative.load();
        while (k < seen && !first_negative.compare_exchange_weak(seen, k)) {
        }
        break;
      }
    }
  });
  const int64_t k = first_negative.load();
  if (k < n) {
    throw std::invalid_argument("steps must be >= 0, got " + std::to_string(steps[k]) +
                                " at index " + std::to_string(k));
  }
}

void schedule_values_range(const ScheduleParams &p, int64_t first_step, double *out, int64_t n,
                           int n_threads) {
  KLANNEAL_CHECK_ARG(n >= 0, "schedule_values_range: n must be >= 0");
  KLANNEAL_CHECK_ARG(first_step >= 0, "schedule_values_range: first_step must be >= 0");
  KLANNEAL_CHECK_ARG(first_step <= std::numeric_limits<int64_t>::max() - n,
                     "schedule_values_range: first_step + n overflows int64");
  if (n == 0)
    return;
  cpu::parallel_for(n, worker_count(n, n_threads), [&](int64_t begin, int64_t end) {
    fill_values_any(p, out, begin, end, [first_step](int64_t k) { return first_step + k; });
  });
}

} // namespace klanneal
