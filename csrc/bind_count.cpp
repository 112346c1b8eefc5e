// _C.count_recon_forward_cpu: the packed CountReconParams call (slot names
// from _C.count_recon_layout(), defined once in klanneal/count_recon.h) ->
// launch_count_recon_cpu, with the GIL released (the launcher runs on its own
// worker threads and never calls back into Python). Nothing here knows torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "bind.h"
#include "klanneal/count_recon.h"

namespace klanneal {
namespace {

namespace py = pybind11;

#define KLANNEAL_SLOT_NAME(name) #name,
#define KLANNEAL_CODE_NAME(enumerator, name) name,

py::dict count_recon_layout() {
  auto names = [](std::vector<const char *> v) {
    py::list out;
    for (const char *n : v)
      out.append(n);
    return out;
  };
  py::dict d;
  d["sizes"] = names({KLANNEAL_COUNT_RECON_SIZES(KLANNEAL_SLOT_NAME)});
  d["ptrs"] = names({KLANNEAL_COUNT_RECON_PTRS(KLANNEAL_SLOT_NAME)});
  d["floats"] = names({KLANNEAL_COUNT_RECON_FLOATS(KLANNEAL_SLOT_NAME)});
  d["family"] = names({KLANNEAL_COUNT_FAMILIES(KLANNEAL_CODE_NAME)});
  d["dtype"] = names({KLANNEAL_DTYPES(KLANNEAL_CODE_NAME)});
  d["input"] = names({KLANNEAL_COUNT_INPUTS(KLANNEAL_CODE_NAME)});
  return d;
}

#undef KLANNEAL_SLOT_NAME
#undef KLANNEAL_CODE_NAME

} // namespace

void register_count(py::module_ &m) {
  m.def("count_recon_layout", &count_recon_layout,
        "The packed call of the count reconstruction bindings: slot names of `sizes`, `ptrs` "
        "and `floats` in order, and the names of the codes 0, 1, ... of family, dtype and "
        "input (first_invalid[1]).");
  m.def(
      "count_recon_forward_cpu",
      [](const std::vector<int64_t> &sizes, const std::vector<uint64_t> &ptrs,
         const std::vector<double> &floats) {
        const CountReconParams p = count_recon_params_from_packed(
            sizes.data(), sizes.size(), ptrs.data(), ptrs.size(), floats.data(), floats.size());
        py::gil_scoped_release release;
        launch_count_recon_cpu(p);
      },
      py::arg("sizes"), py::arg("ptrs"), py::arg("floats"),
      "Runs the count reconstruction kernel on CPU memory given by pointer (the packed call "
      "of count_recon_layout()): row_nll [B] float64 and the wanted gradients, and with "
      "first_invalid the first invalid input. Raises ValueError on inconsistent parameters.");
}

} // namespace klanneal
