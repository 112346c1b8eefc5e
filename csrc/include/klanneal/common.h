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
#define KLANNEAL_CHECK_ARG(cond, msg)                                                              \
  do {                                                                                             \
    if (!(cond))                                                                                   \
      throw std::invalid_argument(std::string(msg));                                               \
  } while (0)

namespace klanneal {

// Element types the kernels accept; the Python layer maps torch dtypes here.
// Enums whose codes Python also uses are written as X-macro lists
// X(enumerator, "python name"), codes 0, 1, ... in list order; _C exports
// the names and codes (klanneal/elbo_layout.h), so they are written once.
#define KLANNEAL_ENUM_ENTRY(enumerator, name) enumerator,

#define KLANNEAL_DTYPES(X)                                                                         \
  X(kFloat32, "float32") X(kFloat64, "float64") X(kFloat16, "float16") X(kBFloat16, "bfloat16")
enum class DType : int32_t { KLANNEAL_DTYPES(KLANNEAL_ENUM_ENTRY) };

} // namespace klanneal
