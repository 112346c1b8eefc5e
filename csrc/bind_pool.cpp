// _C.pooled_empty / pool_cached_bytes / pool_empty_cache: the buffer pool of
// klanneal/buffer_pool.h, its buffers handed to Python as DLPack capsules
// (torch.from_dlpack turns one into a tensor without a copy).
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include <pybind11/stl.h>

#include "bind.h"
#include "dlpack.h"
#include "klanneal/buffer_pool.h"
#include "klanneal/parallel_cpu.h"

namespace klanneal {
namespace {

constexpr const char *kCapsuleName = "dltensor";

// Owns the shape/stride arrays the DLTensor points to. The deleter may run on
// any thread, without the GIL: it touches no Python object.
struct PooledTensor {
  DLManagedTensor managed{};
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
};

void pooled_tensor_deleter(DLManagedTensor *self) {
  auto *owner = static_cast<PooledTensor *>(self->manager_ctx);
  pool_release(self->dl_tensor.data);
  delete owner;
}

// A capsule nobody consumed still owns its tensor; a consumer renames it
// to "used_dltensor" and takes over the deleter.
void capsule_destructor(PyObject *capsule) {
  if (!PyCapsule_IsValid(capsule, kCapsuleName))
    return;
  auto *managed = static_cast<DLManagedTensor *>(PyCapsule_GetPointer(capsule, kCapsuleName));
  if (managed != nullptr && managed->deleter != nullptr)
    managed->deleter(managed);
}

DLDataType dl_dtype(int dtype_code) {
  // klanneal's DType codes (elbo.h): 0 float32, 1 float64, 2 float16, 3 bfloat16.
  switch (dtype_code) {
  case 0:
    return {kDLFloat, 32, 1};
  case 1:
    return {kDLFloat, 64, 1};
  case 2:
    return {kDLFloat, 16, 1};
  case 3:
    return {kDLBfloat, 16, 1};
  default:
    throw pybind11::value_error("pooled_empty: dtype_code must be 0 (float32), 1 (float64), "
                                "2 (float16) or 3 (bfloat16), got " +
                                std::to_string(dtype_code));
  }
}

pybind11::object pooled_empty(const std::vector<int64_t> &shape, int dtype_code) {
  const DLDataType dtype = dl_dtype(dtype_code);
  size_t bytes = dtype.bits / 8;
  for (const int64_t dim : shape) {
    if (dim < 0)
      throw pybind11::value_error("pooled_empty: shape must not have negative sizes");
    if (dim != 0 && bytes > std::numeric_limits<size_t>::max() / static_cast<size_t>(dim))
      throw pybind11::value_error("pooled_empty: shape is too large");
    bytes *= static_cast<size_t>(dim);
  }
  if (bytes == 0)
    throw pybind11::value_error("pooled_empty: the tensor must have at least one element");

  auto *owner = new PooledTensor();
  try {
    owner->shape = shape;
    // Contiguous strides exactly as torch.empty gives them (a size-1 or
    // size-0 dimension counts as size 1).
    owner->strides.assign(shape.size(), 1);
    for (size_t i = shape.size(); i-- > 1;)
      owner->strides[i - 1] = owner->strides[i] * std::max<int64_t>(shape[i], 1);
    void *data = pool_acquire(bytes);
    DLTensor &t = owner->managed.dl_tensor;
    t.data = data;
    t.device = {kDLCPU, 0};
    t.ndim = static_cast<int32_t>(shape.size());
    t.dtype = dtype;
    t.shape = owner->shape.data();
    t.strides = owner->strides.data();
    t.byte_offset = 0;
    owner->managed.manager_ctx = owner;
    owner->managed.deleter = pooled_tensor_deleter;
  } catch (...) {
    if (owner->managed.dl_tensor.data != nullptr)
      pool_release(owner->managed.dl_tensor.data);
    delete owner;
    throw;
  }
  PyObject *capsule = PyCapsule_New(&owner->managed, kCapsuleName, capsule_destructor);
  if (capsule == nullptr) {
    pooled_tensor_deleter(&owner->managed);
    throw pybind11::error_already_set();
  }
  return pybind11::reinterpret_steal<pybind11::object>(capsule);
}

} // namespace

void register_pool(pybind11::module_ &m) {
  m.def("pooled_empty", &pooled_empty, pybind11::arg("shape"), pybind11::arg("dtype_code"),
        "An uninitialised contiguous CPU buffer of the given shape and klanneal dtype code, "
        "from the gradient-buffer pool, as a DLPack capsule ('dltensor') for "
        "torch.from_dlpack. Freeing the tensor gives the buffer back to the pool.");
  m.def("pool_cached_bytes", &pool_cached_bytes,
        "Bytes the gradient-buffer pool holds in cached (free) buffers.");
  m.def(
      "pool_empty_cache",
      [] {
        pybind11::gil_scoped_release release;
        pool_empty_cache();
      },
      "Frees every cached buffer of the gradient-buffer pool.");
  m.def(
      "_pool_hold_lock_for_testing",
      [](int milliseconds) {
        pybind11::gil_scoped_release release;
        pool_hold_lock_for_testing(milliseconds);
      },
      pybind11::arg("milliseconds"),
      "Tests only: holds the pool's mutex this long without the GIL (tests/test_fork.py).");
  m.def(
      "cpu_threads_backend",
      [] { return std::string(cpu::uses_openmp_team() ? "openmp" : "pool"); },
      "What the CPU kernels' parallel_for runs on: 'openmp' (the process's GNU OpenMP "
      "team, torch's intra-op threads) or 'pool' (klanneal's own worker pool: no libgomp "
      "loaded, KLANNEAL_OPENMP=0, or a forked child).");
  m.attr("pool_max_buffers") = kPoolMaxBuffers;
  m.attr("pool_max_bytes") = kPoolMaxBytes;
}

} // namespace klanneal
