// Eight-lane float vectors for the CPU kernels, with loads that widen
// float16 / bfloat16 to float32 in registers.
//
// One interface, three implementations picked by the compiler flags of the
// translation unit that includes this header:
//   - AVX2 + FMA + F16C (x86-64), used by gather_mm_avx2.cpp, which is built
//     with those flags and only called after a runtime CPU check;
//   - NEON (arm64, where it is baseline), two float32x4 halves;
//   - portable C++ (any other target, and x86-64 CPUs without AVX2), eight
//     floats in a struct that the compiler vectorises as it can.
// The kernels (gather_mm_kernels.h) are written once against this interface.
#pragma once

#include <cstdint>
#include <cstring>

#include "mlx/types/half_types.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MLX_MOE_SIMD_AVX2 1
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#define MLX_MOE_SIMD_NEON 1
#endif

namespace mlx_moe::cpu {
// Internal linkage: each instruction set's translation unit gets its own
// copy, so the AVX2 and portable definitions never merge at link time.
namespace {

// Storage types of the three supported element types. float16 and bfloat16
// are held as raw 16-bit patterns; conversions below.
struct Float16Bits {
  uint16_t bits;
};
struct BFloat16Bits {
  uint16_t bits;
};

inline float to_float(float x) {
  return x;
}
inline float to_float(Float16Bits x) {
  mlx::core::float16_t h;
  std::memcpy(&h, &x.bits, sizeof(uint16_t));
  return static_cast<float>(h);
}
inline float to_float(BFloat16Bits x) {
  uint32_t wide = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof(float));
  return f;
}

// Round a float32 result to the output type exactly as MLX's own casts do
// (round to nearest even, NaN preserved), so our outputs match MLX's.
template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) {
  return x;
}
template <>
inline Float16Bits from_float<Float16Bits>(float x) {
  mlx::core::float16_t h(x);
  Float16Bits out;
  std::memcpy(&out.bits, &h, sizeof(uint16_t));
  return out;
}
template <>
inline BFloat16Bits from_float<BFloat16Bits>(float x) {
  mlx::core::bfloat16_t h(x);
  BFloat16Bits out;
  std::memcpy(&out.bits, &h, sizeof(uint16_t));
  return out;
}

#if defined(MLX_MOE_SIMD_AVX2)

struct Vec8 {
  __m256 v;
};
inline Vec8 zero() {
  return {_mm256_setzero_ps()};
}
inline Vec8 broadcast(float x) {
  return {_mm256_set1_ps(x)};
}
inline Vec8 load(const float* p) {
  return {_mm256_loadu_ps(p)};
}
inline Vec8 load(const Float16Bits* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline Vec8 load(const BFloat16Bits* p) {
  __m256i wide = _mm256_cvtepu16_epi32(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))};
}
inline void store(float* p, Vec8 x) {
  _mm256_storeu_ps(p, x.v);
}
// Rounded to the 16-bit types as from_float does (nearest even; NaN stays
// NaN).
inline void store(Float16Bits* p, Vec8 x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store(BFloat16Bits* p, Vec8 x) {
  __m256i bits = _mm256_castps_si256(x.v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  __m256i packed = _mm256_packus_epi32(rounded, rounded); // per 128-bit lane
  packed = _mm256_permute4x64_epi64(packed, 0x08);        // lanes' low halves
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
// acc + a * b
inline Vec8 fma(Vec8 a, Vec8 b, Vec8 acc) {
  return {_mm256_fmadd_ps(a.v, b.v, acc.v)};
}
inline Vec8 add(Vec8 a, Vec8 b) {
  return {_mm256_add_ps(a.v, b.v)};
}
inline float horizontal_sum(Vec8 x) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(x.v), _mm256_extractf128_ps(x.v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  return _mm_cvtss_f32(half);
}
// Prefetch into L2 (see dot_kernels.h: the L2 keeps more misses in flight).
template <typename T>
inline void prefetch(const T* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
}

#elif defined(MLX_MOE_SIMD_NEON)

struct Vec8 {
  float32x4_t low, high;
};
inline Vec8 zero() {
  return {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
}
inline Vec8 broadcast(float x) {
  return {vdupq_n_f32(x), vdupq_n_f32(x)};
}
inline Vec8 load(const float* p) {
  return {vld1q_f32(p), vld1q_f32(p + 4)};
}
inline Vec8 load(const Float16Bits* p) {
  float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(reinterpret_cast<const uint16_t*>(p)));
  return {vcvt_f32_f16(vget_low_f16(h)), vcvt_f32_f16(vget_high_f16(h))};
}
inline Vec8 load(const BFloat16Bits* p) {
  uint16x8_t h = vld1q_u16(reinterpret_cast<const uint16_t*>(p));
  return {
      vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)),
      vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(h), 16))};
}
inline void store(float* p, Vec8 x) {
  vst1q_f32(p, x.low);
  vst1q_f32(p + 4, x.high);
}
inline Vec8 fma(Vec8 a, Vec8 b, Vec8 acc) {
  return {vfmaq_f32(acc.low, a.low, b.low), vfmaq_f32(acc.high, a.high, b.high)};
}
inline Vec8 add(Vec8 a, Vec8 b) {
  return {vaddq_f32(a.low, b.low), vaddq_f32(a.high, b.high)};
}
inline float horizontal_sum(Vec8 x) {
  return vaddvq_f32(vaddq_f32(x.low, x.high));
}
template <typename T>
inline void prefetch(const T* p) {
  __builtin_prefetch(p, 0, 2);
}

#else

struct Vec8 {
  float lane[8];
};
inline Vec8 zero() {
  return Vec8{};
}
inline Vec8 broadcast(float x) {
  Vec8 out;
  for (int i = 0; i < 8; ++i) out.lane[i] = x;
  return out;
}
template <typename T>
inline Vec8 load(const T* p) {
  Vec8 out;
  for (int i = 0; i < 8; ++i) out.lane[i] = to_float(p[i]);
  return out;
}
inline void store(float* p, Vec8 x) {
  for (int i = 0; i < 8; ++i) p[i] = x.lane[i];
}
inline Vec8 fma(Vec8 a, Vec8 b, Vec8 acc) {
  for (int i = 0; i < 8; ++i) acc.lane[i] += a.lane[i] * b.lane[i];
  return acc;
}
inline Vec8 add(Vec8 a, Vec8 b) {
  for (int i = 0; i < 8; ++i) a.lane[i] += b.lane[i];
  return a;
}
inline float horizontal_sum(Vec8 x) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += x.lane[i];
  return s;
}
template <typename T>
inline void prefetch(const T* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 2);
#endif
}

#endif

#if !defined(MLX_MOE_SIMD_AVX2)
// Rounded to the 16-bit types one lane at a time (from_float).
template <typename T>
inline void store(T* p, Vec8 x) {
  float lanes[8];
  store(lanes, x);
  for (int i = 0; i < 8; ++i) p[i] = from_float<T>(lanes[i]);
}
#endif

} // namespace
} // namespace mlx_moe::cpu
