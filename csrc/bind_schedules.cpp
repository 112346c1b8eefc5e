// _C entry points of the schedules (klanneal/schedules.py wraps them). A
// schedule travels as the list of 8 floats of Schedule.to_params(); arrays
// come back as float64 numpy arrays filled with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "bind.h"
#include "bind_common.h"
#include "klanneal/schedules_cpu.h"

namespace py = pybind11;

namespace klanneal {
namespace {

ScheduleParams checked_params(const std::vector<double> &params) {
  // kind and shape become enums: range-check them before the cast.
  KLANNEAL_CHECK_ARG(params.size() != 8 || (params[0] >= 0.0 && params[0] < kNumScheduleKinds &&
                                            params[1] >= 0.0 && params[1] < kNumRampShapes),
                     "schedule: kind must be in 0.." + std::to_string(kNumScheduleKinds - 1) +
                         " and shape in 0.." + std::to_string(kNumRampShapes - 1));
  const ScheduleParams p = schedule_params_from_list(params);
  check_schedule_params(p);
  return p;
}

using FrangeFn = void (*)(double *, int64_t, double, double, int64_t, double);

py::array_t<double> frange(FrangeFn fn, int64_t n_iter, double start, double stop, int64_t n_cycle,
                           double ratio) {
  KLANNEAL_CHECK_ARG(n_iter >= 0, "n_iter must be >= 0, got " + std::to_string(n_iter));
  py::array_t<double> out(n_iter);
  double *data = out.mutable_data();
  {
    py::gil_scoped_release release;
    fn(data, n_iter, start, stop, n_cycle, ratio);
  }
  return out;
}

void def_frange(py::module_ &m, const char *name, FrangeFn fn, const char *doc) {
  m.def(
      name,
      [fn](int64_t n_iter, double start, double stop, int64_t n_cycle, double ratio) {
        return frange(fn, n_iter, start, stop, n_cycle, ratio);
      },
      py::arg("n_iter"), py::arg("start"), py::arg("stop"), py::arg("n_cycle"), py::arg("ratio"),
      doc);
}

} // namespace

void register_schedules(py::module_ &m) {
  def_frange(m, "frange_cycle_linear", &frange_cycle_linear,
             "Published frange_cycle_linear, bit for bit; float64 array [n_iter].");
  def_frange(m, "frange_cycle_sigmoid", &frange_cycle_sigmoid,
             "Notebook frange_cycle_sigmoid (bounds-checked, mapped onto [start, stop]).");
  def_frange(m, "frange_cycle_cosine", &frange_cycle_cosine,
             "Notebook frange_cycle_cosine (bounds-checked, mapped onto [start, stop]).");
  m.def(
      "frange_cycle_zero_linear",
      [](int64_t n_iter, double start, double stop, int64_t n_cycle, double ratio_increase,
         double ratio_zero) {
        KLANNEAL_CHECK_ARG(n_iter >= 0, "n_iter must be >= 0, got " + std::to_string(n_iter));
        py::array_t<double> out(n_iter);
        double *data = out.mutable_data();
        {
          py::gil_scoped_release release;
          frange_cycle_zero_linear(data, n_iter, start, stop, n_cycle, ratio_increase, ratio_zero);
        }
        return out;
      },
      py::arg("n_iter"), py::arg("start"), py::arg("stop"), py::arg("n_cycle"),
      py::arg("ratio_increase"), py::arg("ratio_zero"),
      "Optimus frange_cycle_zero_linear, bit for bit; float64 array [n_iter].");

  m.def(
      "check_schedule_params", [](const std::vector<double> &params) { checked_params(params); },
      py::arg("params"), "Raise ValueError unless the 8 floats describe a valid schedule.");
  m.def(
      "schedule_value",
      [](const std::vector<double> &params, int64_t step) {
        KLANNEAL_CHECK_ARG(step >= 0, "step must be >= 0, got " + std::to_string(step));
        return schedule_value(checked_params(params), step);
      },
      py::arg("params"), py::arg("step"), "Value of the schedule at one step (>= 0).");
  m.def(
      "schedule_values",
      [](const std::vector<double> &params, const py::array_t<int64_t, py::array::c_style> &steps,
         int n_threads) {
        const ScheduleParams p = checked_params(params);
        KLANNEAL_CHECK_ARG(steps.ndim() == 1, "steps must be 1-D");
        const int64_t n = steps.shape(0);
        py::array_t<double> out(n);
        double *data = out.mutable_data();
        const int64_t *in = steps.data();
        {
          py::gil_scoped_release release;
          schedule_values(p, in, data, n, n_threads);
        }
        return out;
      },
      py::arg("params"), py::arg("steps"), py::arg("n_threads") = 0,
      "Schedule values at an int64 array of steps (all >= 0); float64 array [n].");
  m.def(
      "schedule_values_range",
      [](const std::vector<double> &params, int64_t first_step, int64_t n, int n_threads) {
        const ScheduleParams p = checked_params(params);
        KLANNEAL_CHECK_ARG(n >= 0, "n must be >= 0, got " + std::to_string(n));
        py::array_t<double> out(n);
        double *data = out.mutable_data();
        {
          py::gil_scoped_release release;
          schedule_values_range(p, first_step, data, n, n_threads);
        }
        return out;
      },
      py::arg("params"), py::arg("first_step"), py::arg("n"), py::arg("n_threads") = 0,
      "Schedule values at steps first_step .. first_step + n - 1; float64 array [n].");
#if KLANNEAL_WITH_CUDA
  m.def(
      "schedule_values_cuda",
      [](const std::vector<double> &params, uintptr_t steps_ptr, uintptr_t out_ptr, int64_t n,
         uintptr_t stream) {
        const ScheduleParams p = checked_params(params);
        py::gil_scoped_release release;
        launch_schedule_values_cuda(p, reinterpret_cast<const int64_t *>(steps_ptr),
                                    reinterpret_cast<double *>(out_ptr), n,
                                    reinterpret_cast<void *>(stream));
      },
      py::arg("params"), py::arg("steps_ptr"), py::arg("out_ptr"), py::arg("n"), py::arg("stream"),
      "Enqueue out[k] = schedule(steps[k]) on a CUDA stream; pointers are device "
      "addresses of an int64 [n] and a float64 [n] tensor.");
#endif
}

} // namespace klanneal
