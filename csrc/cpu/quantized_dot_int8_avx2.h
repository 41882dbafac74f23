// The AVX2 decode kernel for 4-bit affine codes (group 64 or 128) times
// bfloat16 activations rounded to 8-bit integers.
//
// At one token the 4-bit int16 kernel (quantized_dot_avx2.h) spends ~16
// instructions per 64 codes and stays below the memory's speed on AVX2
// cores. VPMADDUBSW multiplies 32 unsigned bytes with 32 signed bytes per
// instruction, so with 8-bit activations 64 codes cost ~9 instructions:
//   - 32 code bytes hold 64 codes (byte j: element 2j in the low nibble,
//     2j + 1 in the high one); `v & 15` and `(v >> 4) & 15` are the even
//     and odd elements, so the activations are stored per 64-element block
//     as [32 even | 32 odd];
//   - each activation row is rounded once per call to int8 per weight group,
//     x_k ~= d_g i_k with d_g = max_g |x| / 127;
//   - VPMADDUBSW sums code x activation pairs into int16 (at most
//     2 * 15 * 127 per lane, four such sums per 128-element group: 15240,
//     no saturation), VPMADDWD by ones widens to int32, and per group
//     sum_k (s q_k + b) x_k ~= s d_g sum_k q_k i_k + b X_g, X_g = d_g sum_k i_k.
// The result is the exact product of the weights with the rounded
// activations: error <= sum_k |w_k| max_g|x| / 254, the precision of the
// bfloat16 activations themselves (8 significant bits) but relative to the
// group's largest value (as llama.cpp's 8-bit activation blocks). Only
// bfloat16 activations take this path (float16 keeps its 11 bits through
// the int16 kernel); MLX_MOE_CPU_ACTIVATION_BITS=16 turns it off.
#pragma once

#if defined(MLX_MOE_SIMD_AVX2)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/quantized.h"
#include "cpu/quantized_dot_avx2.h"

namespace mlx_moe::cpu {
namespace {

inline bool int8_activations_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("MLX_MOE_CPU_ACTIVATION_BITS");
    return !(value && std::strcmp(value, "16") == 0);
  }();
  return enabled;
}

template <typename T>
inline bool int8_direct_supports(const QuantizedMatrices& q) {
  return std::is_same_v<T, BFloat16Bits> && q.mode == QuantizationMode::affine && q.bits == 4 &&
      (q.group_size == 64 || q.group_size == 128) && int8_activations_enabled();
}

struct Int8Activations {
  std::vector<int8_t> values; // [rows, K], per 64: [32 even | 32 odd]
  std::vector<float> scales;  // [rows, groups]: d_g
  std::vector<float> sums;    // [rows, groups]: X_g = d_g * sum_k i_k
  std::vector<char> source;   // the rows rounded (see Int16Activations)
  int64_t rows = -1;
  int64_t K = -1;
  int group_size = -1;
};

inline RecentRoundings<Int8Activations>& int8_roundings() {
  thread_local RecentRoundings<Int8Activations> recent;
  return recent;
}

// 32 int32 lanes (four registers, elements in order) -> 32 int8 in order.
inline __m256i pack_int8(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i low = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);  // 0-15 as int16
  const __m256i high = _mm256_permute4x64_epi64(_mm256_packs_epi32(c, d), 0xD8); // 16-31
  return _mm256_permute4x64_epi64(_mm256_packs_epi16(low, high), 0xD8);
}

// Elements 0-31 and 32-63 of a block (int8, in order) -> [32 even | 32 odd].
inline void split_even_odd_bytes(__m256i& first, __m256i& second) {
  const __m256i gather = _mm256_setr_epi8(
      0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
      0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  // Per 128-bit lane: 8 evens then 8 odds; then the lanes' halves regrouped.
  const __m256i a = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(first, gather), 0xD8);
  const __m256i b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(second, gather), 0xD8);
  first = _mm256_permute2x128_si256(a, b, 0x20);  // evens of 0-31, evens of 32-63
  second = _mm256_permute2x128_si256(a, b, 0x31); // odds
}

inline void round_row_int8(const BFloat16Bits* x, int64_t K, int group_size, int8_t* values, float* scales,
                           float* sums) {
  alignas(32) float group[128];
  for (int64_t g = 0; g < K / group_size; ++g) {
    const GroupPeak range = load_group(x + g * group_size, group_size, group);
    const float scale = range.finite ? range.peak / 127.0f : std::numeric_limits<float>::quiet_NaN();
    const __m256 factor = _mm256_set1_ps((range.finite && range.peak > 0.0f) ? 127.0f / range.peak : 0.0f);
    __m256i rounded_total = _mm256_setzero_si256();
    for (int j = 0; j < group_size; j += 64) {
      __m256i ints[8];
      for (int i = 0; i < 8; ++i) {
        ints[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(group + j + 8 * i), factor));
        rounded_total = _mm256_add_epi32(rounded_total, ints[i]);
      }
      __m256i first = pack_int8(ints[0], ints[1], ints[2], ints[3]);
      __m256i second = pack_int8(ints[4], ints[5], ints[6], ints[7]);
      split_even_odd_bytes(first, second);
      int8_t* dst = values + g * group_size + j;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), first);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32), second);
    }
    scales[g] = scale;
    sums[g] = scale * static_cast<float>(lane_sum(rounded_total));
  }
}

// The rows rounded, reusing one of this thread's recent roundings when the
// rows are byte-for-byte the same (x_col_stride must be 1).
inline const Int8Activations& prepared_int8_activations(
    const BFloat16Bits* const* x_rows, int64_t rows, int64_t K, int group_size) {
  RecentRoundings<Int8Activations>& recent = int8_roundings();
  const Int8Activations* found = recent.find([&](const Int8Activations& x) {
    return x.rows == rows && x.K == K && x.group_size == group_size && same_rows(x.source, x_rows, rows, K);
  });
  if (found) {
    return *found;
  }
  Int8Activations& x = recent.take();
  const size_t row_bytes = static_cast<size_t>(K) * sizeof(BFloat16Bits);
  const int64_t groups = K / group_size;
  x.values.resize(rows * K);
  x.scales.resize(rows * groups);
  x.sums.resize(rows * groups);
  x.source.resize(rows * row_bytes);
  for (int64_t r = 0; r < rows; ++r) {
    round_row_int8(x_rows[r], K, group_size, x.values.data() + r * K, x.scales.data() + r * groups,
                   x.sums.data() + r * groups);
    std::memcpy(x.source.data() + r * row_bytes, x_rows[r], row_bytes);
  }
  x.rows = rows;
  x.K = K;
  x.group_size = group_size;
  return x;
}

// The exact int32 dot of one group's codes with the activations (8 lanes).
template <int GROUP>
inline __m256i int8_group_dot(const uint8_t* codes, const int8_t* x, int64_t begin) {
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  __m256i pairs = _mm256_setzero_si256();
#pragma GCC unroll 2
  for (int64_t k = begin; k < begin + GROUP; k += 64) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + k / 2));
    const __m256i even = _mm256_and_si256(bytes, low_nibbles);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibbles);
    pairs = _mm256_add_epi16(
        pairs, _mm256_maddubs_epi16(even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k))));
    pairs = _mm256_add_epi16(
        pairs, _mm256_maddubs_epi16(odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k + 32))));
  }
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

// One weight row times one activation row (integer_direct_single's
// reduction and scaling).
template <int GROUP>
inline float int8_direct_single(
    const QuantizedRowRef& w, const Int8Activations& x, int64_t row, int64_t K, const uint8_t* prefetch_codes) {
  const int64_t groups = K / GROUP;
  const int8_t* xv = x.values.data() + row * K;
  return integer_direct_single<GROUP, GROUP / 2, BFloat16Bits>(
      w, x.scales.data() + row * groups, x.sums.data() + row * groups, K, prefetch_codes,
      [&](int64_t begin) { return int8_group_dot<GROUP>(w.codes, xv, begin); });
}

// acc[r * ldacc + c] += x_r . W_c for few rows, one weight row streaming at a
// time (the row 4 ahead prefetched) per activation row.
inline void int8_direct_dot(
    const QuantizedMatrices& q,
    const QuantizedRowRef* w,
    int64_t columns,
    const BFloat16Bits* const* x_rows,
    int64_t num_rows,
    int64_t K,
    float* acc,
    int64_t ldacc) {
  const Int8Activations& x = prepared_int8_activations(x_rows, num_rows, K, q.group_size);
  for (int64_t r = 0; r < num_rows; ++r) {
    for (int64_t c = 0; c < columns; ++c) {
      const uint8_t* ahead = c + 4 < columns ? w[c + 4].codes : nullptr;
      acc[r * ldacc + c] += q.group_size == 64 ? int8_direct_single<64>(w[c], x, r, K, ahead)
                                               : int8_direct_single<128>(w[c], x, r, K, ahead);
    }
  }
}

} // namespace
} // namespace mlx_moe::cpu

#endif // MLX_MOE_SIMD_AVX2
