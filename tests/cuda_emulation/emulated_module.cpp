// A CPU build of the CUDA launcher and kernels (csrc/cuda/elbo_cuda.cu,
// with its <<<...>>> launches rewritten to emu::launch_with by
// tests/test_elbo_cuda_emulated.py) and of the real CUDA bindings
// (csrc/bind_elbo_cuda.cpp), on top of the emulated runtime in include/.
#include <pybind11/pybind11.h>

#include "bind.h"
#include "elbo_cuda_emulated.inc"

PYBIND11_MODULE(_elbo_cuda_emulated, m) {
  klanneal::register_elbo_cuda(m);
  m.def(
      "set_max_blocks", [](unsigned int n) { emu::max_blocks = n; },
      "Caps the emulated grid (grid-stride loops cover the rest).");
  m.def(
      "set_seed", [](unsigned int seed) { emu::scheduler.rng.seed(seed); },
      "Seeds the random order in which threads are resumed between barriers.");
}
