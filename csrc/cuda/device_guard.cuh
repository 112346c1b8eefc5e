// What both CUDA launchers (elbo_cuda.cu, count_cuda.cu) need around a
// launch: CUDA errors as exceptions, and the device of the caller's memory
// made current for this library's CUDA runtime.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "klanneal/common.h"

namespace klanneal {
namespace cuda_util {

// Throws std::runtime_error naming `what` and the CUDA error.
inline void check_call(cudaError_t err, const char *what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("klanneal: CUDA error in ") + what + ": " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

// Makes the device holding `device_ptr` current for this library's CUDA
// runtime (statically linked: it does not share torch's current device) and
// restores the previous one. `not_device` is the error when the memory is
// not CUDA device memory.
class DeviceGuard {
public:
  DeviceGuard(const void *device_ptr, const char *not_device) {
    check_call(cudaGetDevice(&previous_), "cudaGetDevice");
    cudaPointerAttributes attrs{};
    check_call(cudaPointerGetAttributes(&attrs, device_ptr), "cudaPointerGetAttributes");
    KLANNEAL_CHECK_ARG(attrs.type == cudaMemoryTypeDevice || attrs.type == cudaMemoryTypeManaged,
                       not_device);
    if (attrs.device != previous_) {
      check_call(cudaSetDevice(attrs.device), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_)
      cudaSetDevice(previous_); // best effort: destructors must not throw
  }
  DeviceGuard(const DeviceGuard &) = delete;
  DeviceGuard &operator=(const DeviceGuard &) = delete;

private:
  int previous_ = 0;
  bool switched_ = false;
};

} // namespace cuda_util
} // namespace klanneal
