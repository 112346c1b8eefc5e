// A CPU build of the count reconstruction CUDA launcher and kernels
// (csrc/cuda/count_cuda.cu, with its <<<...>>> launches rewritten to
// emu::launch_with by tests/test_count_cuda_emulated.py) and of its real
// bindings (csrc/bind_count_cuda.cpp), on top of the emulated runtime in include/.
#include <pybind11/pybind11.h>

#include "bind.h"
#include "count_cuda_emulated.inc"

PYBIND11_MODULE(_count_cuda_emulated, m) {
  klanneal::register_count_cuda(m);
  m.def(
      "set_max_blocks", [](unsigned int n) { emu::max_blocks = n; },
      "Caps the emulated grid (grid-stride loops cover the rest).");
  m.def(
      "set_seed", [](unsigned int seed) { emu::scheduler.rng.seed(seed); },
      "Seeds the random order in which threads are resumed between barriers.");
}
