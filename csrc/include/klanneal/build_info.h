#pragma once

#include <string>

namespace klanneal {

struct BuildInfo {
  std::string version;
  bool cuda;                 // CUDA kernels compiled in
  std::string cuda_version;  // toolkit version, "" without CUDA
  std::string cuda_archs;    // CMAKE_CUDA_ARCHITECTURES, "" without CUDA
  std::string compiler;      // host C++ compiler
  std::string simd;          // ISA the CPU kernels dispatch to on this machine
  std::string simd_compiled; // ISAs compiled in, e.g. "avx512,avx2,scalar"
};

BuildInfo build_info();

} // namespace klanneal
