// klanneal._C: converts Python ints to pointers, fills the Params structs,
// releases the GIL and calls the core. Tensors are checked and allocated in
// Python (klanneal/_kernels.py); nothing here knows about torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bind.h"
#include "klanneal/build_info.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "klanneal's torch-free C++/CUDA core";
  m.def(
      "build_info",
      [] {
        const klanneal::BuildInfo info = klanneal::build_info();
        py::dict d;
        d["version"] = info.version;
        d["cuda"] = info.cuda;
        d["cuda_version"] = info.cuda_version;
        d["cuda_archs"] = info.cuda_archs;
        d["compiler"] = info.compiler;
        d["simd"] = info.simd;
        d["simd_compiled"] = info.simd_compiled;
        return d;
      },
      "How this extension was built: version, cuda (bool), cuda_version, cuda_archs, "
      "compiler, simd (ISA dispatched to on this CPU), simd_compiled.");
  klanneal::register_schedules(m);
  klanneal::register_elbo(m);
  klanneal::register_common_call(m);
  klanneal::register_elbo_cuda(m);
  klanneal::register_pool(m);
  klanneal::register_special(m);
  klanneal::register_count(m);
  klanneal::register_count_cuda(m);
}
