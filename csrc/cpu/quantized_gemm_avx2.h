// The AVX2 integer GEMM for many activation rows (prefill): 4-bit and 8-bit
// affine codes times half-precision activations, without a dequantized
// copy of the weights.
//
// The few-rows kernel (quantized_dot_avx2.h) keeps its lanes along K and
// reduces them per tile; with many rows its unpacking and per-group scaling
// cost as much as the float path after dequantizing (~100 GFLOP/s on two
// Zen 3 cores, half the FMA peak). Here the lanes run along the output
// columns instead, so every VPMADDWD does 16 useful multiply-adds with no
// reduction:
//   - a panel of 8 weight rows is unpacked once into int16 code pairs,
//     panel[j][c] = (q[c][2j], q[c][2j + 1]) as one int32 lane per column;
//   - an activation row contributes (i[2j], i[2j + 1]) broadcast to all
//     lanes; VPMADDWD then adds q[c][2j] i[2j] + q[c][2j + 1] i[2j + 1] into
//     lane c, exactly, in int32;
//   - at each group's end the exact int32 dots are scaled in float:
//     acc[c] += s_c d_g * dot[c] + b_c * X_g (X_g: the group's rounded sum).
// The activations are the ones the few-rows kernel rounds (int16 per weight
// group, error <= 2^-16 of the group's largest magnitude), in natural order.
// VPMADDWD multiplies twice the pairs per instruction that FMA does floats.
#pragma once

#if defined(MLX_MOE_SIMD_AVX2)

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/quantized.h"
#include "cpu/quantized_dot_avx2.h"

namespace mlx_moe::cpu {
namespace {

constexpr int kPanelColumns = 8; // one int32 lane per weight row
constexpr int kGemmRowTile = 4;
// Rows per pass over the packed panels: their int16 activations (4 KB per
// row at K = 2048) stay in the L2 cache while every panel meets them.
constexpr int64_t kGemmRowBlock = 64;

struct Int16GemmScratch {
  std::vector<int32_t> panels;   // [panels][K / 2][8] code pairs
  std::vector<float> scales;     // [panels][groups][8]
  std::vector<float> biases;     // [panels][groups][8]
  std::vector<uint8_t> zero_row; // the codes of a padding column
};

inline Int16GemmScratch& int16_gemm_scratch() {
  thread_local Int16GemmScratch s;
  return s;
}

// Eight int32 vectors, v[c] lane j -> v[j] lane c.
inline void transpose8x8(__m256i v[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
    v[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
  }
}

// Code pairs (2j, 2j + 1) for j in [pair, pair + 8) of one row, as int32
// lanes (low half: the even element).
template <int BITS>
inline __m256i code_pairs8(const uint8_t* codes, int64_t pair) {
  if constexpr (BITS == 4) {
    // Byte j holds elements 2j (low nibble) and 2j + 1 (high nibble).
    const __m256i bytes =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + pair)));
    const __m256i even = _mm256_and_si256(bytes, _mm256_set1_epi32(0x0F));
    const __m256i odd = _mm256_slli_epi32(_mm256_srli_epi32(bytes, 4), 16);
    return _mm256_or_si256(even, odd);
  } else {
    return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 2 * pair)));
  }
}

// Packs weight rows w[0..count) (count <= 8; the rest are zero columns) into
// panel slot `slot` of the scratch.
template <int BITS, typename T>
void pack_panel(const QuantizedRowRef* w, int count, int64_t K, int group_size, int64_t slot,
                Int16GemmScratch& s) {
  const int64_t pairs = K / 2;
  const int64_t groups = K / group_size;
  int32_t* panel = s.panels.data() + slot * pairs * kPanelColumns;
  float* scales = s.scales.data() + slot * groups * kPanelColumns;
  float* biases = s.biases.data() + slot * groups * kPanelColumns;
  const uint8_t* codes[kPanelColumns];
  for (int c = 0; c < kPanelColumns; ++c) {
    codes[c] = c < count ? w[c].codes : s.zero_row.data();
    for (int64_t g = 0; g < groups; ++g) {
      scales[g * kPanelColumns + c] = c < count ? to_float(static_cast<const T*>(w[c].scales)[g]) : 0.0f;
      biases[g * kPanelColumns + c] = c < count ? to_float(static_cast<const T*>(w[c].biases)[g]) : 0.0f;
    }
  }
  for (int64_t j = 0; j < pairs; j += 8) {
    __m256i v[kPanelColumns];
    for (int c = 0; c < kPanelColumns; ++c) {
      v[c] = code_pairs8<BITS>(codes[c], j);
    }
    transpose8x8(v);
    for (int i = 0; i < 8; ++i) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(panel + (j + i) * kPanelColumns), v[i]);
    }
  }
}

// ROWS activation rows from row0 times PANELS packed panels (8 columns
// each, `panel_stride` int32 apart): out[r * 8 * PANELS + c]. The int32 dots
// of a group live in registers (ROWS x PANELS of them); the float sums stay
// in `out` (L1), touched once per group, so they take no registers.
template <int ROWS, int PANELS, int GROUP>
inline void int16_gemm_tile(
    const int32_t* panel, int64_t panel_stride, const float* scales, const float* biases,
    int64_t scale_stride, const Int16Activations& x, int64_t row0, int64_t K, float* out) {
  constexpr int width = PANELS * kPanelColumns;
  const int64_t groups = K / GROUP;
  const int16_t* rows[ROWS];
  const float* row_scales[ROWS];
  const float* row_sums[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    rows[r] = x.values.data() + (row0 + r) * K;
    row_scales[r] = x.scales.data() + (row0 + r) * groups;
    row_sums[r] = x.sums.data() + (row0 + r) * groups;
  }
  for (int i = 0; i < ROWS * width; ++i) {
    out[i] = 0.0f;
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m256i dots[ROWS][PANELS];
    for (int r = 0; r < ROWS; ++r) {
      for (int p = 0; p < PANELS; ++p) {
        dots[r][p] = _mm256_setzero_si256();
      }
    }
    const int32_t* w = panel + g * (GROUP / 2) * kPanelColumns;
#pragma GCC unroll 4
    for (int j = 0; j < GROUP / 2; ++j) {
      __m256i codes[PANELS];
      for (int p = 0; p < PANELS; ++p) {
        codes[p] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p * panel_stride + j * kPanelColumns));
      }
      for (int r = 0; r < ROWS; ++r) {
        int32_t pair;
        std::memcpy(&pair, rows[r] + g * GROUP + 2 * j, sizeof(pair));
        const __m256i activations = _mm256_set1_epi32(pair);
        for (int p = 0; p < PANELS; ++p) {
          dots[r][p] = _mm256_add_epi32(dots[r][p], _mm256_madd_epi16(codes[p], activations));
        }
      }
    }
    for (int p = 0; p < PANELS; ++p) {
      const __m256 weight_scales = _mm256_loadu_ps(scales + p * scale_stride + g * kPanelColumns);
      const __m256 weight_biases = _mm256_loadu_ps(biases + p * scale_stride + g * kPanelColumns);
      for (int r = 0; r < ROWS; ++r) {
        float* sums = out + r * width + p * kPanelColumns;
        const __m256 factor = _mm256_mul_ps(weight_scales, _mm256_set1_ps(row_scales[r][g]));
        __m256 acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r][p]), factor, _mm256_loadu_ps(sums));
        acc = _mm256_fmadd_ps(weight_biases, _mm256_set1_ps(row_sums[r][g]), acc);
        _mm256_storeu_ps(sums, acc);
      }
    }
  }
}

template <int PANELS, int GROUP>
inline void int16_gemm_rows(
    int rows, const int32_t* panel, int64_t panel_stride, const float* scales, const float* biases,
    int64_t scale_stride, const Int16Activations& x, int64_t row0, int64_t K, float* out) {
#define MLX_MOE_GEMM_TILE(ROWS) \
  int16_gemm_tile<ROWS, PANELS, GROUP>(panel, panel_stride, scales, biases, scale_stride, x, row0, K, out)
  switch (rows) {
    case 4: MLX_MOE_GEMM_TILE(4); break;
    case 3: MLX_MOE_GEMM_TILE(3); break;
    case 2: MLX_MOE_GEMM_TILE(2); break;
    default: MLX_MOE_GEMM_TILE(1); break;
  }
#undef MLX_MOE_GEMM_TILE
}

template <int BITS, typename T>
void int16_gemm_format(
    const QuantizedRowRef* w, int64_t columns, const Int16Activations& x, int64_t num_rows, int64_t K,
    int group_size, float* acc, int64_t ldacc) {
  Int16GemmScratch& s = int16_gemm_scratch();
  const int64_t pairs = K / 2;
  const int64_t groups = K / group_size;
  const int64_t panel_count = (columns + kPanelColumns - 1) / kPanelColumns;
  // Many rows: pack every panel once, then pass over them per row block.
  // Few: pack one panel at a time into one slot (it stays in L1).
  const bool pack_all = num_rows > kGemmRowBlock;
  const int64_t slots = pack_all ? panel_count : 2;
  s.panels.resize(slots * pairs * kPanelColumns);
  s.scales.resize(slots * groups * kPanelColumns);
  s.biases.resize(slots * groups * kPanelColumns);
  s.zero_row.assign(K * BITS / 8, 0);
  auto pack = [&](int64_t p, int64_t slot) {
    const int count = static_cast<int>(std::min<int64_t>(kPanelColumns, columns - p * kPanelColumns));
    pack_panel<BITS, T>(w + p * kPanelColumns, count, K, group_size, slot, s);
  };
  // Panels p and p + 1 (slots `slot`, `slot + 1`) when `pair`, else p alone.
  auto multiply = [&](int64_t p, int64_t slot, bool pair, int64_t row_begin, int64_t row_end) {
    const int32_t* panel = s.panels.data() + slot * pairs * kPanelColumns;
    const float* scales = s.scales.data() + slot * groups * kPanelColumns;
    const float* biases = s.biases.data() + slot * groups * kPanelColumns;
    const int64_t c0 = p * kPanelColumns;
    const int width = (pair ? 2 : 1) * kPanelColumns;
    const int count = static_cast<int>(std::min<int64_t>(width, columns - c0));
    float tile[kGemmRowTile * 2 * kPanelColumns];
    for (int64_t r0 = row_begin; r0 < row_end; r0 += kGemmRowTile) {
      const int rows = static_cast<int>(std::min<int64_t>(kGemmRowTile, row_end - r0));
#define MLX_MOE_GEMM_ROWS(PANELS, GROUP)                                                          \
  int16_gemm_rows<PANELS, GROUP>(rows, panel, pairs * kPanelColumns, scales, biases, groups * kPanelColumns, \
                                 x, r0, K, tile)
      if (pair) {
        switch (group_size) {
          case 32: MLX_MOE_GEMM_ROWS(2, 32); break;
          case 64: MLX_MOE_GEMM_ROWS(2, 64); break;
          default: MLX_MOE_GEMM_ROWS(2, 128); break;
        }
      } else {
        switch (group_size) {
          case 32: MLX_MOE_GEMM_ROWS(1, 32); break;
          case 64: MLX_MOE_GEMM_ROWS(1, 64); break;
          default: MLX_MOE_GEMM_ROWS(1, 128); break;
        }
      }
#undef MLX_MOE_GEMM_ROWS
      for (int r = 0; r < rows; ++r) {
        float* dst = acc + (r0 + r) * ldacc + c0;
        for (int c = 0; c < count; ++c) {
          dst[c] += tile[r * width + c];
        }
      }
    }
  };
  if (pack_all) {
    for (int64_t p = 0; p < panel_count; ++p) {
      pack(p, p);
    }
    for (int64_t r = 0; r < num_rows; r += kGemmRowBlock) {
      for (int64_t p = 0; p < panel_count; p += 2) {
        multiply(p, p, p + 1 < panel_count, r, std::min(num_rows, r + kGemmRowBlock));
      }
    }
  } else {
    for (int64_t p = 0; p < panel_count; p += 2) {
      const bool pair = p + 1 < panel_count;
      pack(p, 0);
      if (pair) {
        pack(p + 1, 1);
      }
      multiply(p, 0, pair, 0, num_rows);
    }
  }
}

// acc[r * ldacc + c] += x_r . W_c (see the top of this file); supports what
// int16_direct_supports accepts. T: the activations' and scales' dtype.
template <typename T>
void int16_gemm(
    const QuantizedMatrices& q,
    const QuantizedRowRef* w,
    int64_t columns,
    const T* const* x_rows,
    int64_t x_col_stride,
    int64_t num_rows,
    int64_t K,
    float* acc,
    int64_t ldacc) {
  static_assert(!std::is_same_v<T, float>, "float32 activations keep the exact float kernel");
  const Int16Activations& x =
      prepared_int16_activations<T>(x_rows, x_col_stride, num_rows, K, q.group_size, false);
  if (q.bits == 4) {
    int16_gemm_format<4, T>(w, columns, x, num_rows, K, q.group_size, acc, ldacc);
  } else {
    int16_gemm_format<8, T>(w, columns, x, num_rows, K, q.group_size, acc, ldacc);
  }
}

} // namespace
} // namespace mlx_moe::cpu

#endif // MLX_MOE_SIMD_AVX2
