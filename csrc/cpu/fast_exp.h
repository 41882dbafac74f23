// exp(x) for the softmax of the attention kernels: range reduction to
// x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r and 2^n put
// into the exponent bits. Relative error ~2e-7 (float32 rounding level),
// exp(-inf) = 0, no branches, so loops over arrays of it vectorise with
// the translation unit's instruction set (std::exp is a scalar call).
#pragma once

#include <cstdint>
#include <cstring>

namespace mlx_moe::cpu {
namespace {

inline float exp_approx(float x) {
  // Below -87.3 the result is under float's smallest normal: clamp to give
  // (a tiny positive number rounded to) zero, and -inf the same.
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float log2e = 1.44269504088896341f;
  // Round to nearest by adding and removing 1.5 * 2^23 (plain arithmetic,
  // so it vectorises; exact for |x * log2e| < 2^22).
  const float shifter = 12582912.0f;
  const float n = (x * log2e + shifter) - shifter;
  // ln2 split in a high part exact in float and a low correction.
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return x <= -87.0f ? 0.0f : out;
}

} // namespace
} // namespace mlx_moe::cpu
