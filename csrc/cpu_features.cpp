#include "klanneal/cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace klanneal {

namespace {

SimdLevel detect() {
  SimdLevel level = SimdLevel::kScalar;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    level = SimdLevel::kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    level = SimdLevel::kAvx512;
#endif
  if (const char *cap = std::getenv("KLANNEAL_SIMD")) {
    SimdLevel wanted = level;
    if (std::strcmp(cap, "scalar") == 0)
      wanted = SimdLevel::kScalar;
    if (std::strcmp(cap, "avx2") == 0)
      wanted = SimdLevel::kAvx2;
    if (std::strcmp(cap, "avx512") == 0)
      wanted = SimdLevel::kAvx512;
    if (static_cast<int>(wanted) < static_cast<int>(level))
      level = wanted;
  }
  return level;
}

} // namespace

SimdLevel cpu_simd_level() {
  static const SimdLevel level = detect();
  return level;
}

const char *simd_level_name(SimdLevel level) {
  switch (level) {
  case SimdLevel::kAvx512:
    return "avx512";
  case SimdLevel::kAvx2:
    return "avx2";
  default:
    return "scalar";
  }
}

} // namespace klanneal
