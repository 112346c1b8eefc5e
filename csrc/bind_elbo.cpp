// _C.elbo_forward_cpu: the packed ElboParams call from klanneal/_kernels.py ->
// launch_elbo_cpu, with the GIL released (the launcher runs on its own
// worker threads and never calls back into Python); _C.elbo_layout: the
// slot names of the packed call and the enum codes, defined once in C++.
#include <string>
#include <vector>

#include "bind.h"
#include "bind_common.h"
#include "klanneal/cpu_features.h"
#include "klanneal/elbo_layout.h"
#include "klanneal/elbo_simd_cpu.h"

namespace klanneal {
namespace {

namespace py = pybind11;

py::list slot_names(const std::vector<const char *> &names) {
  py::list out;
  for (const char *n : names)
    out.append(n);
  return out;
}

#define KLANNEAL_SLOT_NAME(name) #name,
// The "python name" of an entry X(enumerator, "python name", ...).
#define KLANNEAL_FIRST_ARG(first, ...) first
#define KLANNEAL_CODE_NAME(enumerator, ...) KLANNEAL_FIRST_ARG(__VA_ARGS__, ~),

py::dict elbo_layout() {
  py::dict d;
  d["sizes"] = slot_names({KLANNEAL_ELBO_SIZES(KLANNEAL_SLOT_NAME)});
  d["ptrs"] = slot_names({KLANNEAL_ELBO_PTRS(KLANNEAL_SLOT_NAME)});
  d["floats"] = slot_names({KLANNEAL_ELBO_FLOATS(KLANNEAL_SLOT_NAME)});
  d["ints"] = slot_names({KLANNEAL_ELBO_INTS(KLANNEAL_SLOT_NAME)});
  d["likelihood"] = slot_names({KLANNEAL_LIKELIHOODS(KLANNEAL_CODE_NAME)});
  d["reduction"] = slot_names({KLANNEAL_REDUCTIONS(KLANNEAL_CODE_NAME)});
  d["free_bits_mode"] = slot_names({KLANNEAL_FREE_BITS_MODES(KLANNEAL_CODE_NAME)});
  d["dtype"] = slot_names({KLANNEAL_DTYPES(KLANNEAL_CODE_NAME)});
  d["schedule_kind"] = slot_names({KLANNEAL_SCHEDULE_KINDS(KLANNEAL_CODE_NAME)});
  d["ramp_shape"] = slot_names({KLANNEAL_RAMP_SHAPES(KLANNEAL_CODE_NAME)});
  return d;
}

#undef KLANNEAL_SLOT_NAME
#undef KLANNEAL_CODE_NAME
#undef KLANNEAL_FIRST_ARG

// The packed call (elbo_layout()) on the CPU; returns the first invalid
// target's flat index, or -1.
int64_t elbo_forward_cpu(const std::vector<int64_t> &sizes, const std::vector<uint64_t> &ptrs,
                         const std::vector<double> &floats, const std::vector<int64_t> &ints) {
  ElboParams p = elbo_params_from_packed(sizes, ptrs, floats, ints);
  return run_elbo_cpu(p, ints[static_cast<size_t>(IntSlot::k_validate)] != 0,
                      wants_float32_outputs(sizes), true);
}

} // namespace

void register_elbo(py::module_ &m) {
  m.def("elbo_layout", &elbo_layout,
        "The packed call of the ELBO bindings: slot names of `sizes`, `ptrs`, `floats` and "
        "`ints` in order, and the names of every enum's codes 0, 1, ... (likelihood, "
        "reduction, free_bits_mode, dtype, schedule_kind, ramp_shape).");
  m.def("elbo_forward_cpu", &elbo_forward_cpu, py::arg("sizes"), py::arg("ptrs"), py::arg("floats"),
        py::arg("ints"),
        "Runs the fused ELBO op on CPU tensors given by pointer (the packed call of "
        "elbo_layout()). Returns the flat index of the first invalid target (class id outside "
        "[0, V) or bernoulli target outside [0, 1]) when `validate` is set and one was found, "
        "else -1. The scalar outputs are float64, or float32 with out_dtype float32. Raises "
        "ValueError on inconsistent parameters.");
  m.def(
      "_exp_nonpos_mismatches",
      [](uint32_t stride) {
        py::gil_scoped_release release;
        return cpu::exp_nonpos_mismatches(cpu_simd_level(), stride);
      },
      py::arg("stride"),
      "Test hook: lanes where the CPU kernels' exp for x <= 0 differs in its bits from their "
      "general exp, over the floats with the sign bit set, one vector of consecutive bit "
      "patterns every `stride` patterns (all of them for stride <= the lane count), and +0 "
      "(-1 without a vector exp).");
}

} // namespace klanneal
