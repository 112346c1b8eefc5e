// Storage types of the CPU kernels and their conversions: fp16 / bf16 as
// raw bits, widened to fp32 for arithmetic (Elem), and the storage type of
// the gradients of each input type (Grad). No compiler half types: the
// core builds with any C++17 compiler.
#pragma once

#include <cstdint>
#include <cstring>

namespace klanneal {
namespace cpu {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t bits_from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE fp16 -> fp32 with subnormals, Inf and NaN
// (the bit-exact method of Maratyszcza's FP16 library).
inline float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = float_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = float_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result =
      sign | (two_w < (1u << 27) ? bits_from_float(denormalized) : bits_from_float(normalized));
  return float_from_bits(result);
}

inline float bfloat16_to_float(uint16_t h) {
  return float_from_bits(static_cast<uint32_t>(h) << 16);
}

// Arithmetic type T of a storage type S (float for fp32/fp16/bf16, double
// for fp64) and the load conversion (gradients are stored as Grad<S>, below).
template <typename S> struct Elem;
template <> struct Elem<float> {
  using T = float;
  static T load(float v) { return v; }
};
template <> struct Elem<double> {
  using T = double;
  static T load(double v) { return v; }
};
template <> struct Elem<Half> {
  using T = float;
  static T load(Half v) { return half_to_float(v.bits); }
};
template <> struct Elem<BFloat16> {
  using T = float;
  static T load(BFloat16 v) { return bfloat16_to_float(v.bits); }
};

// Storage type of the gradients (grad_recon, grad_mu, grad_logvar) of inputs
// stored as S: S itself for fp32/fp64, fp32 for fp16/bf16. A half-precision
// gradient stored before backward applies the upstream gradient would lose
// what a loss scaler exists to keep: values below fp16's 6e-8 flush to 0
// before they are multiplied by 2^16, and values above 65504 overflow to
// inf although the scaled value fits (see docs/elbo.md, mixed precision).
template <typename S> struct GradOf {
  using type = S;
};
template <> struct GradOf<Half> {
  using type = float;
};
template <> struct GradOf<BFloat16> {
  using type = float;
};
template <typename S> using Grad = typename GradOf<S>::type;

} // namespace cpu
} // namespace klanneal
