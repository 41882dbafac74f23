// Quantized weight matrices as mx.quantize packs them, and their
// dequantization into the compute dtype, a block of one row at a time.
//
// Layout (MLX's): every row of a matrix is quantized along its own length in
// groups of `group_size` consecutive elements. The packed row is a
// little-endian bit stream of `bits`-bit codes (element i occupies bits
// [i * bits, (i + 1) * bits) of the row's bytes), so 8 consecutive codes
// always fill exactly `bits` bytes. Each group has a scale (and, in affine
// mode, a bias):
//   affine: w = scale * q + bias, q in [0, 2^bits), scale/bias in the
//           compute dtype;
//   mxfp4:  w = e2m1(q) * 2^(scale - 127), q a 4-bit float (sign, 2-bit
//           exponent, 1-bit mantissa), scale an 8-bit power of two (E8M0).
//
// The kernels never materialise a dequantized expert: they dequantize the
// block of rows a task is about to multiply (a few hundred KB at most, kept
// in cache) and hand it to the dot engine.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/gather_mm_problem.h"
#include "cpu/simd.h"

namespace mlx_moe::cpu {

enum class QuantizationMode { affine, mxfp4 };

struct QuantizedMatrices {
  QuantizationMode mode = QuantizationMode::affine;
  int bits = 4;
  int group_size = 64;
  // Packed codes: row r of matrix m starts at packed + m * matrix_bytes +
  // r * row_bytes.
  const uint8_t* packed = nullptr;
  int64_t matrix_bytes = 0;
  int64_t row_bytes = 0;
  // Scales and biases [matrices, rows, groups]: the compute dtype (affine)
  // or E8M0 bytes (mxfp4, no biases). Strides in elements.
  const void* scales = nullptr;
  const void* biases = nullptr;
  int64_t scale_matrix_stride = 0;
  int64_t scale_row_stride = 0;
};

namespace {

// One weight row of a quantized matrix: its codes and its groups' scales
// and biases (affine: compute dtype; mxfp4: E8M0 bytes, no biases).
struct QuantizedRowRef {
  const uint8_t* codes;
  const void* scales;
  const void* biases;
};

template <typename T>
inline QuantizedRowRef quantized_row(const QuantizedMatrices& q, int64_t matrix, int64_t row) {
  const int64_t scale_offset = matrix * q.scale_matrix_stride + row * q.scale_row_stride;
  const size_t scale_bytes = q.mode == QuantizationMode::mxfp4 ? 1 : sizeof(T);
  return {
      q.packed + matrix * q.matrix_bytes + row * q.row_bytes,
      static_cast<const uint8_t*>(q.scales) + scale_offset * scale_bytes,
      q.biases ? static_cast<const uint8_t*>(q.biases) + scale_offset * scale_bytes : nullptr};
}

// The 16 values of a 4-bit e2m1 float.
constexpr float kE2M1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                             -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// 2^(e - 127) for an E8M0 scale byte (255 is NaN).
inline float e8m0_to_float(uint8_t e) {
  if (e == 255) {
    return __builtin_nanf("");
  }
  uint32_t bits = e == 0 ? 0x00400000u : static_cast<uint32_t>(e) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof(float));
  return f;
}

// The 8 codes of `BITS` bits that fill the BITS bytes at p, as float lanes.
template <int BITS>
inline Vec8 codes8(const uint8_t* p) {
#if defined(MLX_MOE_SIMD_AVX2)
  if constexpr (BITS == 8) {
    __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes))};
  } else if constexpr (BITS == 4) {
    uint32_t word;
    std::memcpy(&word, p, 4);
    __m256i v = _mm256_srlv_epi32(
        _mm256_set1_epi32(static_cast<int>(word)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
    return {_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF)))};
  } else {
    uint64_t word = 0;
    std::memcpy(&word, p, BITS);
    const __m256i all = _mm256_set1_epi64x(static_cast<long long>(word));
    const __m256i low = _mm256_srlv_epi64(all, _mm256_setr_epi64x(0, BITS, 2 * BITS, 3 * BITS));
    const __m256i high =
        _mm256_srlv_epi64(all, _mm256_setr_epi64x(4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS));
    // Low dwords of the 8 qwords: [0 1 4 5 | 2 3 6 7] per 128-bit lane, then
    // the 64-bit pairs back in order.
    __m256i codes = _mm256_castps_si256(_mm256_shuffle_ps(
        _mm256_castsi256_ps(low), _mm256_castsi256_ps(high), _MM_SHUFFLE(2, 0, 2, 0)));
    codes = _mm256_permute4x64_epi64(codes, _MM_SHUFFLE(3, 1, 2, 0));
    codes = _mm256_and_si256(codes, _mm256_set1_epi32((1 << BITS) - 1));
    return {_mm256_cvtepi32_ps(codes)};
  }
#else
  uint64_t word = 0;
  std::memcpy(&word, p, BITS);
  float lanes[8];
  for (int i = 0; i < 8; ++i) {
    lanes[i] = static_cast<float>((word >> (i * BITS)) & ((1u << BITS) - 1));
  }
  return load(lanes);
#endif
}

// The 8 e2m1 values in the 4 bytes at p.
inline Vec8 e2m1_values8(const uint8_t* p) {
#if defined(MLX_MOE_SIMD_AVX2)
  uint32_t word;
  std::memcpy(&word, p, 4);
  __m256i codes = _mm256_and_si256(
      _mm256_srlv_epi32(
          _mm256_set1_epi32(static_cast<int>(word)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
      _mm256_set1_epi32(0xF));
  __m256 magnitude = _mm256_permutevar8x32_ps(_mm256_loadu_ps(kE2M1), codes);
  __m256i sign = _mm256_slli_epi32(_mm256_and_si256(codes, _mm256_set1_epi32(8)), 28);
  return {_mm256_xor_ps(magnitude, _mm256_castsi256_ps(sign))};
#else
  uint32_t word;
  std::memcpy(&word, p, 4);
  float lanes[8];
  for (int i = 0; i < 8; ++i) {
    lanes[i] = kE2M1[(word >> (4 * i)) & 0xF];
  }
  return load(lanes);
#endif
}

template <int BITS, typename T>
void dequantize_affine(const uint8_t* row, const T* scales, const T* biases, int64_t begin,
                       int64_t count, int group_size, T* dst) {
  for (int64_t i = 0; i < count; i += group_size) {
    const int64_t group = (begin + i) / group_size;
    const Vec8 scale = broadcast(to_float(scales[group]));
    const Vec8 bias = broadcast(to_float(biases[group]));
    const uint8_t* codes = row + (begin + i) / 8 * BITS;
    for (int j = 0; j < group_size; j += 8) {
      store(dst + i + j, fma(codes8<BITS>(codes + j / 8 * BITS), scale, bias));
    }
  }
}

template <typename T>
void dequantize_mxfp4(const uint8_t* row, const uint8_t* scales, int64_t begin, int64_t count,
                      int group_size, T* dst) {
  for (int64_t i = 0; i < count; i += group_size) {
    const Vec8 scale = broadcast(e8m0_to_float(scales[(begin + i) / group_size]));
    const uint8_t* codes = row + (begin + i) / 2;
    for (int j = 0; j < group_size; j += 8) {
      const Vec8 zero_acc = zero();
      store(dst + i + j, fma(e2m1_values8(codes + j / 2), scale, zero_acc));
    }
  }
}

// Elements [begin, begin + count) of row `row` of matrix `matrix`, into dst
// in the compute dtype T. begin and count are multiples of the group size.
template <typename T>
void dequantize_row(const QuantizedMatrices& q, int64_t matrix, int64_t row, int64_t begin,
                    int64_t count, T* dst) {
  const uint8_t* packed = q.packed + matrix * q.matrix_bytes + row * q.row_bytes;
  const int64_t scale_offset = matrix * q.scale_matrix_stride + row * q.scale_row_stride;
  if (q.mode == QuantizationMode::mxfp4) {
    dequantize_mxfp4<T>(
        packed, static_cast<const uint8_t*>(q.scales) + scale_offset, begin, count, q.group_size, dst);
    return;
  }
  const T* scales = static_cast<const T*>(q.scales) + scale_offset;
  const T* biases = static_cast<const T*>(q.biases) + scale_offset;
  switch (q.bits) {
    case 1: return dequantize_affine<1, T>(packed, scales, biases, begin, count, q.group_size, dst);
    case 2: return dequantize_affine<2, T>(packed, scales, biases, begin, count, q.group_size, dst);
    case 3: return dequantize_affine<3, T>(packed, scales, biases, begin, count, q.group_size, dst);
    case 4: return dequantize_affine<4, T>(packed, scales, biases, begin, count, q.group_size, dst);
    case 5: return dequantize_affine<5, T>(packed, scales, biases, begin, count, q.group_size, dst);
    case 6: return dequantize_affine<6, T>(packed, scales, biases, begin, count, q.group_size, dst);
    case 8: return dequantize_affine<8, T>(packed, scales, biases, begin, count, q.group_size, dst);
    default: return; // rejected by the op
  }
}

} // namespace
} // namespace mlx_moe::cpu
