// _C.elbo_cuda_workspace_bytes / _C.elbo_forward_cuda: the CUDA entry points
// of the fused ELBO op. klanneal/_kernels.py allocates the outputs and the
// workspace as torch tensors on the inputs' device and passes raw pointers
// and torch's current stream; nothing here knows about torch.
#include "bind.h"

#if KLANNEAL_WITH_CUDA
#include <cstddef>
#include <cstdint>

#include "bind_common.h"
#include "klanneal/elbo.h"
#include <vector>
#endif

namespace klanneal {

#if KLANNEAL_WITH_CUDA
void register_elbo_cuda(pybind11::module_ &m) {
  namespace py = pybind11;
  m.def(
      "elbo_cuda_workspace_bytes",
      [](const std::vector<int64_t> &sizes, const std::vector<uint64_t> &ptrs,
         const std::vector<double> &floats, const std::vector<int64_t> &ints) -> size_t {
        const ElboParams p = elbo_params_from_packed(sizes, ptrs, floats, ints);
        py::gil_scoped_release release;
        return elbo_cuda_workspace_bytes(p);
      },
      py::arg("sizes"), py::arg("ptrs"), py::arg("floats"), py::arg("ints"),
      "Bytes of device scratch memory elbo_forward_cuda needs for this packed call "
      "(elbo_layout()).");
  m.def(
      "elbo_forward_cuda",
      [](const std::vector<int64_t> &sizes, const std::vector<uint64_t> &ptrs,
         const std::vector<double> &floats, const std::vector<int64_t> &ints,
         uint64_t workspace_ptr, uint64_t workspace_bytes, uint64_t stream) {
        const ElboParams p = elbo_params_from_packed(sizes, ptrs, floats, ints);
        KLANNEAL_CHECK_ARG(!wants_float32_outputs(sizes),
                           "elbo_cuda: the outputs are float64 (out_dtype float32 is CPU only)");
        py::gil_scoped_release release;
        launch_elbo_cuda(p, reinterpret_cast<void *>(static_cast<uintptr_t>(workspace_ptr)),
                         static_cast<size_t>(workspace_bytes),
                         reinterpret_cast<void *>(static_cast<uintptr_t>(stream)));
      },
      py::arg("sizes"), py::arg("ptrs"), py::arg("floats"), py::arg("ints"),
      py::arg("workspace_ptr"), py::arg("workspace_bytes"), py::arg("stream"),
      "Enqueues the fused ELBO op on `stream` (torch.cuda.current_stream().cuda_stream) without "
      "host synchronisation: fills the float64 outputs and, where the pointers are non-zero, "
      "the gradients. Raises ValueError on inconsistent params and RuntimeError naming the "
      "CUDA error if a launch fails.");
}
#else
// Built without CUDA: _C has no CUDA entry points (build_info()["cuda"] is False).
void register_elbo_cuda(pybind11::module_ &m) { (void)m; }
#endif

} // namespace klanneal
