// Pieces of the klanneal._C module, one per op family. Only the binding
// files include pybind11; the core (klanneal_core) never does.
#pragma once

#include <pybind11/pybind11.h>

namespace klanneal {

void register_schedules(pybind11::module_ &m);
void register_elbo(pybind11::module_ &m);
// _C.common_elbo, elbo_loss's common call in one C call (bind_common_call.cpp).
void register_common_call(pybind11::module_ &m);
// Registers the CUDA entry points when built with CUDA; a no-op otherwise.
void register_elbo_cuda(pybind11::module_ &m);
// The CPU gradient-buffer pool (buffer_pool.h) and its DLPack export.
void register_pool(pybind11::module_ &m);
// Test hooks of the special functions and count likelihoods (bind_special.cpp).
void register_special(pybind11::module_ &m);
// The count reconstruction kernel (bind_count.cpp) and its CUDA entry points
// (bind_count_cuda.cpp; a no-op without CUDA).
void register_count(pybind11::module_ &m);
void register_count_cuda(pybind11::module_ &m);

} // namespace klanneal
