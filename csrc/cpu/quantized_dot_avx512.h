// The AVX-512 build's direct quantized dot products, for few activation
// rows (decode): bfloat16 activations times 4-bit (group 64 or 128) or
// 8-bit (any group) affine codes, with no dequantized copy of the weights.
//
// The codes become bfloat16 values exactly, with a few bitwise instructions
// per 32 of them: a code nibble n placed in the low mantissa bits of a
// bfloat16 whose exponent says 128 is the value 128 + n (0x4300 | n), and a
// nibble shifted into mantissa bits 3..6 under exponent 16 is 16 + n. An
// 8-bit code q is its low 7 bits under 128 (128 + (q & 127)) plus its top
// bit as the exponent's lowest bit (0x4300 | (q & 0x80) is 128 or 256, i.e.
// 128 + 128 b). VDPBF16PS then multiplies them with the activations exactly and
// accumulates in float32, and the constant offsets come back out through
// the per-group activation sums:
//
//   sum_k q_k x_k = sum_k (c_k + q_k) x_k - sum_k c_k x_k.
//
// 4-bit: a byte holds elements 2j (low nibble) and 2j + 1 (high nibble), so
// the activations are rearranged once per row into even and odd halves of
// each 64-element block (c = 128 for even, 16 for odd elements). 8-bit:
// both parts against the activations in place (c = 128 + 128 = 256).
//
// Per group g of a weight row: acc += scale_g * sum_{k in g} (c_k + q_k) x_k
// in the main loop; at the end, sum_g bias_g * X_g - scale_g * C_g with X_g
// = sum x_k and C_g = sum c_k x_k over the group.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/quantized.h"

namespace mlx_moe::cpu {
namespace {

constexpr int kDirectMaxColumns = 4;
constexpr int kDirectMaxRows = 4;
// Prefetch distance in tiles: 2 measured best at decode on Zen 4 (1: 12%
// slower; 4, 6, 8: 3-9% slower); a down-projection tile is only ~1.5 KB.
constexpr int64_t kPrefetchTiles = 2;

// A row's activations as the direct kernel reads them.
struct DirectRow {
  const uint16_t* x;           // bfloat16, rearranged (4-bit) or in place (8-bit)
  const float* group_sums;     // X_g
  const float* offset_sums;    // C_g
};

struct DirectScratch {
  std::vector<uint16_t> arranged;
  std::vector<float> sums;
  std::vector<float> scales; // one tile's scales in float32, [COLUMNS, groups]
};

inline DirectScratch& direct_scratch() {
  thread_local DirectScratch s;
  return s;
}

// 16 bfloat16 values (or fewer, masked) as float32.
inline __m512 load_bf16_as_float(const uint16_t* p, __mmask16 mask) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
}

// 32 codes -> (c + low nibble) and (c' + high part) as bfloat16 vectors.
template <int BITS>
inline void unpack_codes(const uint8_t* p, __m512i& low, __m512i& high) {
  const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  // (a & b) | c is truth table 0xEA.
  if constexpr (BITS == 4) {
    low = _mm512_ternarylogic_epi32(bytes, _mm512_set1_epi16(0x000F), _mm512_set1_epi16(0x4300), 0xEA);
    high = _mm512_ternarylogic_epi32(
        _mm512_srli_epi16(bytes, 1), _mm512_set1_epi16(0x0078), _mm512_set1_epi16(0x4180), 0xEA);
  } else {
    low = _mm512_ternarylogic_epi32(bytes, _mm512_set1_epi16(0x007F), _mm512_set1_epi16(0x4300), 0xEA);
    high = _mm512_ternarylogic_epi32(bytes, _mm512_set1_epi16(0x0080), _mm512_set1_epi16(0x4300), 0xEA);
  }
}

// COLUMNS weight rows x ROWS activation rows over all K; adds the results to
// out[r * ldo + c]. `scales`: room for COLUMNS x groups floats.
template <int BITS, int COLUMNS, int ROWS>
inline void direct_tile(
    const QuantizedRowRef* w,
    const DirectRow* rows,
    int64_t K,
    int group_size,
    float* out,
    int64_t ldo,
    const QuantizedRowRef* next,
    float* scales) {
  // Bytes of codes per 32-byte step and activations per step.
  constexpr int kElementsPerStep = BITS == 4 ? 64 : 32;
  const int steps_per_group = group_size / kElementsPerStep;
  const int64_t groups = K / group_size;
  // The next tile's scales and biases: short rows of their own streams,
  // which the code prefetch below does not cover.
  if (next) {
    const int64_t scale_bytes = groups * 2;
#pragma GCC unroll 4
    for (int c = 0; c < COLUMNS; ++c) {
      for (int64_t b = 0; b < scale_bytes; b += 64) {
        _mm_prefetch(static_cast<const char*>(next[c].scales) + b, _MM_HINT_T1);
        _mm_prefetch(static_cast<const char*>(next[c].biases) + b, _MM_HINT_T1);
      }
    }
  }
  // The tile's scales in float32, broadcast from memory in the group loop.
#pragma GCC unroll 4
  for (int c = 0; c < COLUMNS; ++c) {
    const uint16_t* src = static_cast<const uint16_t*>(w[c].scales);
    for (int64_t g = 0; g < groups; g += 16) {
      _mm512_mask_storeu_ps(scales + c * groups + g, first_lanes(groups - g),
                            load_bf16_as_float(src + g, first_lanes(groups - g)));
    }
  }
  __m512 acc[COLUMNS][ROWS];
#pragma GCC unroll 4
  for (int c = 0; c < COLUMNS; ++c) {
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      acc[c][r] = _mm512_setzero_ps();
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m512 group_acc[COLUMNS][ROWS];
#pragma GCC unroll 4
    for (int c = 0; c < COLUMNS; ++c) {
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) {
        group_acc[c][r] = _mm512_setzero_ps();
      }
    }
    for (int step = 0; step < steps_per_group; ++step) {
      const int64_t element = g * group_size + step * kElementsPerStep;
      const int64_t byte = element * BITS / 8;
      __m512i low[COLUMNS], high[COLUMNS];
#pragma GCC unroll 4
      for (int c = 0; c < COLUMNS; ++c) {
        unpack_codes<BITS>(w[c].codes + byte, low[c], high[c]);
      }
      if (next) {
#pragma GCC unroll 4
        for (int c = 0; c < COLUMNS; ++c) {
          _mm_prefetch(reinterpret_cast<const char*>(next[c].codes + byte), _MM_HINT_T1);
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) {
        __m512bh x_low, x_high;
        if constexpr (BITS == 4) {
          x_low = (__m512bh)_mm512_loadu_si512(rows[r].x + element);
          x_high = (__m512bh)_mm512_loadu_si512(rows[r].x + element + 32);
        } else {
          x_low = x_high = (__m512bh)_mm512_loadu_si512(rows[r].x + element);
        }
#pragma GCC unroll 4
        for (int c = 0; c < COLUMNS; ++c) {
          group_acc[c][r] = _mm512_dpbf16_ps(group_acc[c][r], (__m512bh)low[c], x_low);
          group_acc[c][r] = _mm512_dpbf16_ps(group_acc[c][r], (__m512bh)high[c], x_high);
        }
      }
    }
#pragma GCC unroll 4
    for (int c = 0; c < COLUMNS; ++c) {
      const __m512 scale = _mm512_set1_ps(scales[c * groups + g]);
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) {
        acc[c][r] = _mm512_fmadd_ps(group_acc[c][r], scale, acc[c][r]);
      }
    }
  }
  // The group terms, 16 groups at a time, added into the accumulators'
  // lanes before the one horizontal sum.
#pragma GCC unroll 4
  for (int c = 0; c < COLUMNS; ++c) {
    const uint16_t* biases = static_cast<const uint16_t*>(w[c].biases);
    for (int64_t g = 0; g < groups; g += 16) {
      const __mmask16 mask = first_lanes(groups - g);
      const __m512 scale = _mm512_maskz_loadu_ps(mask, scales + c * groups + g);
      const __m512 bias = load_bf16_as_float(biases + g, mask);
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) {
        const __m512 sums = _mm512_maskz_loadu_ps(mask, rows[r].group_sums + g);
        const __m512 offsets = _mm512_maskz_loadu_ps(mask, rows[r].offset_sums + g);
        acc[c][r] = _mm512_fmadd_ps(bias, sums, _mm512_fnmadd_ps(scale, offsets, acc[c][r]));
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      out[r * ldo + c] += _mm512_reduce_add_ps(acc[c][r]);
    }
  }
}

template <int BITS, int COLUMNS, int MAX_ROWS>
inline void direct_tile_rows(
    int rows,
    const QuantizedRowRef* w,
    const DirectRow* x,
    int64_t K,
    int group_size,
    float* out,
    int64_t ldo,
    const QuantizedRowRef* next,
    float* scales) {
  if constexpr (MAX_ROWS >= 1) {
    if (rows == MAX_ROWS) {
      direct_tile<BITS, COLUMNS, MAX_ROWS>(w, x, K, group_size, out, ldo, next, scales);
    } else {
      direct_tile_rows<BITS, COLUMNS, MAX_ROWS - 1>(rows, w, x, K, group_size, out, ldo, next, scales);
    }
  }
}

// Prepares each activation row: the rearranged copy (4-bit: even then odd
// elements of each 64-block) and the per-group sums X_g and C_g.
template <int BITS>
void prepare_direct_rows(
    const uint16_t* const* x_rows,
    int64_t num_rows,
    int64_t K,
    int group_size,
    std::vector<DirectRow>& rows) {
  DirectScratch& s = direct_scratch();
  const int64_t groups = K / group_size;
  if (BITS == 4) {
    s.arranged.resize(num_rows * K);
  }
  s.sums.resize(2 * num_rows * groups);
  rows.resize(num_rows);
  for (int64_t r = 0; r < num_rows; ++r) {
    const uint16_t* x = x_rows[r];
    float* group_sums = s.sums.data() + 2 * r * groups;
    float* offset_sums = group_sums + groups;
    uint16_t* arranged = BITS == 4 ? s.arranged.data() + r * K : nullptr;
    for (int64_t g = 0; g < groups; ++g) {
      __m512 sum = _mm512_setzero_ps();
      __m512 offsets = _mm512_setzero_ps();
      for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 32) {
        const __m512i words = _mm512_loadu_si512(x + k);
        if constexpr (BITS == 4) {
          // Even and odd elements of these 32: the low and high 16-bit
          // halves of each 32-bit lane.
          const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
          const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32(int(0xFFFF0000u))));
          sum = _mm512_add_ps(sum, _mm512_add_ps(even, odd));
          offsets = _mm512_fmadd_ps(_mm512_set1_ps(128.0f), even, _mm512_fmadd_ps(_mm512_set1_ps(16.0f), odd, offsets));
        } else {
          const __m512 low = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
          const __m512 high = _mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32(int(0xFFFF0000u))));
          sum = _mm512_add_ps(sum, _mm512_add_ps(low, high));
        }
      }
      group_sums[g] = _mm512_reduce_add_ps(sum);
      offset_sums[g] = BITS == 8 ? 256.0f * group_sums[g] : _mm512_reduce_add_ps(offsets);
    }
    if constexpr (BITS == 4) {
      // Block of 64 = two registers of 32 words: evens of both, then odds.
      const __m512i index = _mm512_set_epi16(
          63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
          31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
      const __m512i index_even = _mm512_set_epi16(
          62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32,
          30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
      for (int64_t block = 0; block < K; block += 64) {
        const __m512i first = _mm512_loadu_si512(x + block);
        const __m512i second = _mm512_loadu_si512(x + block + 32);
        _mm512_storeu_si512(arranged + block, _mm512_permutex2var_epi16(first, index_even, second));
        _mm512_storeu_si512(arranged + block + 32, _mm512_permutex2var_epi16(first, index, second));
      }
      rows[r].x = arranged;
    } else {
      rows[r].x = x;
    }
    rows[r].group_sums = group_sums;
    rows[r].offset_sums = offset_sums;
  }
}

template <int BITS>
void direct_dot(
    const QuantizedRowRef* w,
    int64_t columns,
    const uint16_t* const* x_rows,
    int64_t num_rows,
    int64_t K,
    int group_size,
    float* acc,
    int64_t ldacc,
    const QuantizedRowRef* following,
    int64_t following_count) {
  thread_local std::vector<DirectRow> rows;
  prepare_direct_rows<BITS>(x_rows, num_rows, K, group_size, rows);
  // One tile's scales in float32 (looked up once here, not per tile).
  DirectScratch& scratch = direct_scratch();
  scratch.scales.resize(kDirectMaxColumns * (K / group_size));
  float* scales = scratch.scales.data();
  // The first tiles, requested all at once (the in-loop prefetch covers
  // tile kPrefetchTiles onwards).
  const int64_t row_bytes = K * BITS / 8;
  const int64_t scale_bytes = K / group_size * 2;
  for (int64_t c = 0; c < std::min<int64_t>(columns, kPrefetchTiles * kDirectMaxColumns); ++c) {
    for (int64_t b = 0; b < row_bytes; b += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(w[c].codes) + b, _MM_HINT_T1);
    }
    for (int64_t b = 0; b < scale_bytes; b += 64) {
      _mm_prefetch(static_cast<const char*>(w[c].scales) + b, _MM_HINT_T1);
      _mm_prefetch(static_cast<const char*>(w[c].biases) + b, _MM_HINT_T1);
    }
  }
  int64_t c = 0;
  for (; c + kDirectMaxColumns <= columns; c += kDirectMaxColumns) {
    // Prefetch kPrefetchTiles tiles ahead (short tiles: the down
    // projection's rows are a few hundred bytes).
    // Past the last tile: the rows the caller passes next (`following`).
    const int64_t ahead = c + kPrefetchTiles * kDirectMaxColumns;
    const QuantizedRowRef* next = ahead + kDirectMaxColumns <= columns ? w + ahead
        : (following && ahead >= columns && ahead - columns + kDirectMaxColumns <= following_count)
        ? following + (ahead - columns)
        : nullptr;
    for (int64_t r = 0; r < num_rows; r += kDirectMaxRows) {
      const int n = static_cast<int>(std::min<int64_t>(kDirectMaxRows, num_rows - r));
      direct_tile_rows<BITS, kDirectMaxColumns, kDirectMaxRows>(
          n, w + c, rows.data() + r, K, group_size, acc + r * ldacc + c, ldacc, r == 0 ? next : nullptr, scales);
    }
  }
  for (; c < columns; ++c) {
    for (int64_t r = 0; r < num_rows; r += kDirectMaxRows) {
      const int n = static_cast<int>(std::min<int64_t>(kDirectMaxRows, num_rows - r));
      direct_tile_rows<BITS, 1, kDirectMaxRows>(
          n, w + c, rows.data() + r, K, group_size, acc + r * ldacc + c, ldacc, nullptr, scales);
    }
  }
}

// Whether the direct kernel handles this format with bfloat16 activations.
inline bool direct_dot_supports(const QuantizedMatrices& q) {
  return q.mode == QuantizationMode::affine &&
      ((q.bits == 4 && q.group_size % 64 == 0) || q.bits == 8);
}

inline void direct_dot_bf16(
    const QuantizedMatrices& q,
    const QuantizedRowRef* w,
    int64_t columns,
    const uint16_t* const* x_rows,
    int64_t num_rows,
    int64_t K,
    float* acc,
    int64_t ldacc,
    const QuantizedRowRef* following,
    int64_t following_count) {
  if (q.bits == 4) {
    direct_dot<4>(w, columns, x_rows, num_rows, K, q.group_size, acc, ldacc, following, following_count);
  } else {
    direct_dot<8>(w, columns, x_rows, num_rows, K, q.group_size, acc, ldacc, following, following_count);
  }
}

} // namespace
} // namespace mlx_moe::cpu
