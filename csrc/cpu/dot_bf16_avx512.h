// The AVX-512 build's dot tiles: bfloat16 x bfloat16 on AVX512-BF16
// (VDPBF16PS), and (at the end of this file) 16-lane float32 FMA tiles for
// float32 / float16 weights, for the dot path (b's K axis contiguous).
//
// VDPBF16PS multiplies pairs of bfloat16 values exactly and accumulates them
// in float32, 32 products per 512-bit instruction: twice the products of a
// float32 FMA, with no widening of the weights and half the load traffic
// (both operands stay 16-bit; the activation rows are read in place).
// Like the generic kernel, it accumulates in float32 and rounds once.
// Differences from exact float32 accumulation: the instruction flushes
// bfloat16 subnormal inputs to zero.
//
// Included by dot_kernels.h only in the AVX-512 build (kernels_avx512.cpp,
// compiled with -mavx512bf16 and friends, called only on CPUs that have them).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>


namespace mlx_moe::cpu {
namespace {

constexpr int kBf16Lanes = 32; // bfloat16 values per 512-bit register

// out[r * ldo + c] += sum_{k < K} w[c * ldw + k] * x[r][k].
// out[r * ldo + c] += sum_{k < K} w[c][k] * x[r][k]. `next` (or null): the
// weight rows of the next tile, prefetched line by line in step with this
// one, so their streams are already in flight when it starts.
template <int COLUMNS, int ROWS>
inline void dot_tile_bf16(
    const uint16_t* const* w,
    const uint16_t* const* x,
    int64_t K,
    float* out,
    int64_t ldo,
    const uint16_t* const* next) {
  __m512 acc[COLUMNS][ROWS];
#pragma GCC unroll 8
  for (int c = 0; c < COLUMNS; ++c) {
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      acc[c][r] = _mm512_setzero_ps();
    }
  }
  const int64_t k32 = K / kBf16Lanes * kBf16Lanes;
  auto step = [&](int64_t k, __mmask32 mask) {
    __m512bh wv[COLUMNS];
#pragma GCC unroll 8
    for (int c = 0; c < COLUMNS; ++c) {
      wv[c] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w[c] + k);
    }
    if (next) {
#pragma GCC unroll 8
      for (int c = 0; c < COLUMNS; ++c) {
        _mm_prefetch(reinterpret_cast<const char*>(next[c] + k), _MM_HINT_T1);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x[r] + k);
#pragma GCC unroll 8
      for (int c = 0; c < COLUMNS; ++c) {
        acc[c][r] = _mm512_dpbf16_ps(acc[c][r], wv[c], xv);
      }
    }
  };
  for (int64_t k = 0; k < k32; k += kBf16Lanes) {
    step(k, ~__mmask32(0));
  }
  if (k32 < K) {
    // Masked loads never touch the lanes past K, so no out-of-bounds read.
    step(k32, (__mmask32(1) << (K - k32)) - 1);
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < COLUMNS; ++c) {
      out[r * ldo + c] += _mm512_reduce_add_ps(acc[c][r]);
    }
  }
}

template <int COLUMNS, int MAX_ROWS>
inline void dot_tile_bf16_rows(
    int rows,
    const uint16_t* const* w,
    const uint16_t* const* x,
    int64_t K,
    float* out,
    int64_t ldo,
    const uint16_t* const* next) {
  if constexpr (MAX_ROWS >= 1) {
    if (rows == MAX_ROWS) {
      dot_tile_bf16<COLUMNS, MAX_ROWS>(w, x, K, out, ldo, next);
    } else {
      dot_tile_bf16_rows<COLUMNS, MAX_ROWS - 1>(rows, w, x, K, out, ldo, next);
    }
  }
}

template <int COLUMNS, int ROWS>
void dot_bf16_all(
    const uint16_t* const* w,
    int64_t columns,
    const uint16_t* const* x,
    int64_t num_rows,
    int64_t K,
    float* acc,
    int64_t ldacc,
    const uint16_t* const* following) {
  int64_t c = 0;
  for (; c + COLUMNS <= columns; c += COLUMNS) {
    // Prefetch the next full tile's weight rows during the first row tile
    // (after the last tile: the caller's next rows, if it gave them).
    const uint16_t* const* next = c + 2 * COLUMNS <= columns ? w + c + COLUMNS
        : c + COLUMNS == columns                               ? following
                                                               : nullptr;
    for (int64_t r = 0; r < num_rows; r += ROWS) {
      int rows = static_cast<int>(std::min<int64_t>(ROWS, num_rows - r));
      dot_tile_bf16_rows<COLUMNS, ROWS>(
          rows, w + c, x + r, K, acc + r * ldacc + c, ldacc, r == 0 ? next : nullptr);
    }
  }
  for (; c < columns; ++c) {
    for (int64_t r = 0; r < num_rows; r += ROWS) {
      int rows = static_cast<int>(std::min<int64_t>(ROWS, num_rows - r));
      dot_tile_bf16_rows<1, ROWS>(rows, w + c, x + r, K, acc + r * ldacc + c, ldacc, nullptr);
    }
  }
}

// All rows against all weight rows; x[r] points at row r's K contiguous
// bfloat16 values; acc is [rows, ldacc] float32.
inline void dot_bf16(
    const uint16_t* const* w,
    int64_t columns,
    const uint16_t* const* x,
    int64_t num_rows,
    int64_t K,
    float* acc,
    int64_t ldacc,
    const uint16_t* const* following) {
  // Tile shapes: 32 zmm registers; one row streams 8 weight rows at once,
  // more rows reuse each loaded weight vector (4 x 4 tile: 16 accumulators).
  if (num_rows == 1) {
    dot_bf16_all<8, 1>(w, columns, x, num_rows, K, acc, ldacc, following);
  } else if (num_rows == 2) {
    dot_bf16_all<6, 2>(w, columns, x, num_rows, K, acc, ldacc, following);
  } else {
    dot_bf16_all<4, 4>(w, columns, x, num_rows, K, acc, ldacc, following);
  }
}

} // namespace
} // namespace mlx_moe::cpu

namespace mlx_moe::cpu {
namespace {

// float32 / float16 weights against float32 activation rows with 16-lane
// (zmm) FMAs: the AVX-512 build's tile policy for dot_kernels.h's dot_chunk
// (32 registers allow a 4 x 4 tile), with masked loads for the K tail.
inline __m512 load16(const float* p, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, p);
}
inline __m512 load16(const Float16Bits* p, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}

struct Lanes16Tile {
  static constexpr bool kHandlesTail = true;
  static constexpr int64_t kLanes = 16;

  template <int COLUMNS, int ROWS, typename T>
  static inline void run(
      const T* const* w,
      int64_t k0,
      const float* x,
      int64_t ldx,
      int64_t kc,
      float* out,
      int64_t ldo,
      const T* const* next) {
    __m512 acc[COLUMNS][ROWS];
  #pragma GCC unroll 8
    for (int c = 0; c < COLUMNS; ++c) {
  #pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        acc[c][r] = _mm512_setzero_ps();
      }
    }
    auto step = [&](int64_t k, __mmask16 mask) {
      __m512 wv[COLUMNS];
  #pragma GCC unroll 8
      for (int c = 0; c < COLUMNS; ++c) {
        wv[c] = load16(w[c] + k0 + k, mask);
      }
      if (next) {
  #pragma GCC unroll 8
        for (int c = 0; c < COLUMNS; ++c) {
          _mm_prefetch(reinterpret_cast<const char*>(next[c] + k0 + k), _MM_HINT_T1);
        }
      }
  #pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * ldx + k);
  #pragma GCC unroll 8
        for (int c = 0; c < COLUMNS; ++c) {
          acc[c][r] = _mm512_fmadd_ps(wv[c], xv, acc[c][r]);
        }
      }
    };
    const int64_t k16 = kc / 16 * 16;
    for (int64_t k = 0; k < k16; k += 16) {
      step(k, ~__mmask16(0));
    }
    if (k16 < kc) {
      step(k16, (__mmask16(1) << (kc - k16)) - 1);
    }
  #pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
  #pragma GCC unroll 8
      for (int c = 0; c < COLUMNS; ++c) {
        out[r * ldo + c] += _mm512_reduce_add_ps(acc[c][r]);
      }
    }
  }
};

} // namespace
} // namespace mlx_moe::cpu
