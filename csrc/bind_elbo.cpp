// _C.elbo_forward_cpu: the dict of ElboParams fields from klanneal/_ops.py
// -> launch_elbo_cpu, with the GIL released (the launcher runs on its own
// worker threads and never calls back into Python).
#include "bind.h"
#include "bind_common.h"

namespace klanneal {

void register_elbo(pybind11::module_ &m) {
  m.def(
      "elbo_forward_cpu",
      [](const pybind11::dict &d) {
        const ElboParams p = elbo_params_from_dict(d);
        pybind11::gil_scoped_release release;
        launch_elbo_cpu(p);
      },
      pybind11::arg("params"),
      "Runs the fused ELBO op on CPU tensors given by pointer (a dict keyed by the "
      "ElboParams field names). Raises ValueError on inconsistent parameters.");
}

} // namespace klanneal
