// Run-time CPU dispatch: kernels are compiled for several ISAs (no
// -march=native) and the widest one the running CPU supports is chosen.
#pragma once

namespace klanneal {

enum class SimdLevel : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Widest ISA supported by both this build and the running CPU. The
// environment variable KLANNEAL_SIMD=scalar|avx2|avx512 caps it (for tests).
SimdLevel cpu_simd_level();
const char *simd_level_name(SimdLevel level);

} // namespace klanneal
