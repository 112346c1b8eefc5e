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
// X(enumerator, "python name", ...), codes 0, 1, ... in list order; _C exports
// the names and codes (csrc/bind_elbo.cpp, _C.elbo_layout()), so they are
// written once. An entry may carry more (the likelihoods name their traits
// struct); the macros below read the first two.
#define KLANNEAL_ENUM_ENTRY(enumerator, ...) enumerator,
// The number of entries of a list: its valid codes are 0 .. count - 1.
#define KLANNEAL_COUNT_ENTRY(enumerator, ...) +1

#define KLANNEAL_DTYPES(X)                                                                         \
  X(kFloat32, "float32") X(kFloat64, "float64") X(kFloat16, "float16") X(kBFloat16, "bfloat16")
enum class DType : int32_t { KLANNEAL_DTYPES(KLANNEAL_ENUM_ENTRY) };
constexpr int32_t kNumDTypes = 0 KLANNEAL_DTYPES(KLANNEAL_COUNT_ENTRY);

// Whether `code` is one of an enum's codes 0 .. count - 1.
KLANNEAL_HD bool valid_code(int32_t code, int32_t count) { return code >= 0 && code < count; }

} // namespace klanneal
