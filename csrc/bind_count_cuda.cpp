// _C.count_recon_cuda_workspace_bytes / _C.count_recon_forward_cuda: the CUDA
// entry points of the count reconstruction kernel (count_recon.h). The caller
// allocates the outputs and the workspace on the inputs' device and passes
// raw pointers and its current stream; nothing here knows about torch.
#include "bind.h"

#if KLANNEAL_WITH_CUDA
#include <pybind11/stl.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "klanneal/count_recon.h"
#endif

namespace klanneal {

#if KLANNEAL_WITH_CUDA
void register_count_cuda(pybind11::module_ &m) {
  namespace py = pybind11;
  auto unpack = [](const std::vector<int64_t> &sizes, const std::vector<uint64_t> &ptrs,
                   const std::vector<double> &floats) {
    return count_recon_params_from_packed(sizes.data(), sizes.size(), ptrs.data(), ptrs.size(),
                                          floats.data(), floats.size());
  };
  m.def(
      "count_recon_cuda_workspace_bytes",
      [unpack](const std::vector<int64_t> &sizes, const std::vector<uint64_t> &ptrs,
               const std::vector<double> &floats) -> size_t {
        return count_recon_cuda_workspace_bytes(unpack(sizes, ptrs, floats));
      },
      py::arg("sizes"), py::arg("ptrs"), py::arg("floats"),
      "Bytes of device scratch count_recon_forward_cuda needs for this packed call (its "
      "`workspace` / `workspace_bytes` slots).");
  m.def(
      "count_recon_forward_cuda",
      [unpack](const std::vector<int64_t> &sizes, const std::vector<uint64_t> &ptrs,
               const std::vector<double> &floats, uint64_t stream) {
        const CountReconParams p = unpack(sizes, ptrs, floats);
        py::gil_scoped_release release;
        launch_count_recon_cuda(p, reinterpret_cast<void *>(static_cast<uintptr_t>(stream)));
      },
      py::arg("sizes"), py::arg("ptrs"), py::arg("floats"), py::arg("stream"),
      "Enqueues the count reconstruction kernel on `stream` "
      "(torch.cuda.current_stream().cuda_stream) without host synchronisation. Raises "
      "ValueError on inconsistent parameters (a workspace too small included) and "
      "RuntimeError naming the CUDA error if a launch fails.");
}
#else
// Built without CUDA: _C has no CUDA entry points (build_info()["cuda"] is False).
void register_count_cuda(pybind11::module_ &m) { (void)m; }
#endif

} // namespace klanneal
