#include "klanneal/build_info.h"

#include "klanneal/cpu_features.h"

#ifndef KLANNEAL_CUDA_VERSION
#define KLANNEAL_CUDA_VERSION ""
#endif
#ifndef KLANNEAL_CUDA_ARCHS
#define KLANNEAL_CUDA_ARCHS ""
#endif

namespace klanneal {

BuildInfo build_info() {
  BuildInfo info;
  info.version = KLANNEAL_VERSION;
  info.cuda = KLANNEAL_WITH_CUDA != 0;
  info.cuda_version = KLANNEAL_CUDA_VERSION;
  info.cuda_archs = KLANNEAL_CUDA_ARCHS;
  info.compiler = KLANNEAL_CXX_COMPILER;
  info.simd = simd_level_name(cpu_simd_level());
#if defined(__x86_64__)
  info.simd_compiled = "avx512,avx2,scalar";
#else
  info.simd_compiled = "scalar";
#endif
  return info;
}

} // namespace klanneal
