// Shared macros of the torch-free core. Nothing here includes torch,
// pybind11 or (unless compiled by nvcc) CUDA headers.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define KLANNEAL_HD __host__ __device__ __forceinline__
#else
#define KLANNEAL_HD inline
#endif

// Argument errors raised by the core surface in Python as ValueError (see
// bindings.cpp); the Python layer checks first, this is the last line.
#define KLANNEAL_CHECK_ARG(cond, msg)                                                          \
  do {                                                                                         \
    if (!(cond)) throw std::invalid_argument(std::string(msg));                               \
  } while (0)

namespace klanneal {

// Element types the kernels accept; the Python layer maps torch dtypes here.
enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

}  // namespace klanneal
