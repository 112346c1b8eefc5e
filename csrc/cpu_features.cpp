#include "klanneal/cpu_features.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace klanneal {

namespace {

// The level KLANNEAL_SIMD asks for: unset or empty, no cap; an unknown value
// (a typo, "AVX-2", "sse") throws rather than silently running the widest level.
SimdLevel requested_level(SimdLevel widest) {
  const char *raw = std::getenv("KLANNEAL_SIMD");
  if (raw == nullptr)
    return widest;
  const std::string cap = normalized_env_value(raw);
  if (cap.empty())
    return widest;
  for (SimdLevel level : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512})
    if (cap == simd_level_name(level))
      return level;
  throw std::invalid_argument("KLANNEAL_SIMD='" + std::string(raw) +
                              "' is not a SIMD level: set it to scalar, avx2 or avx512 (any "
                              "case), or unset it for the widest level the CPU supports");
}

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
  const SimdLevel wanted = requested_level(level); // a cap: never above what the CPU has
  return static_cast<int>(wanted) < static_cast<int>(level) ? wanted : level;
}

} // namespace

SimdLevel cpu_simd_level() {
  // An exception leaves the static uninitialised: every call throws it again.
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
