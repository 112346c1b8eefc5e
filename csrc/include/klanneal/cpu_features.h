// Run-time CPU dispatch: kernels are compiled for several ISAs (no
// -march=native) and the widest one the running CPU supports is chosen.
#pragma once

#include <cctype>
#include <string>

namespace klanneal {

enum class SimdLevel : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Widest ISA supported by both this build and the running CPU. The
// environment variable KLANNEAL_SIMD=scalar|avx2|avx512 (case and surrounding
// spaces ignored; unset or empty: no cap) caps it, read at the first call;
// another value throws std::invalid_argument naming the accepted ones, at
// that call and every later one.
SimdLevel cpu_simd_level();
const char *simd_level_name(SimdLevel level);

// An environment variable's value as python/klanneal/_env.py reads it:
// surrounding spaces removed, in lower case.
inline std::string normalized_env_value(const char *value) {
  std::string v(value);
  const auto first = v.find_first_not_of(" \t\n\r");
  if (first == std::string::npos)
    return "";
  v = v.substr(first, v.find_last_not_of(" \t\n\r") - first + 1);
  for (char &c : v)
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return v;
}

} // namespace klanneal
