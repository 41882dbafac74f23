// The dot-product engine shared by every CPU kernel whose weights have a
// contiguous K axis (mlx-lm's [E, N, K] expert layout): gather_mm's fast
// path, the fused gate/up/SwiGLU and the fused down/combine.
//
//   acc[r * ldacc + c] += sum_k w_rows[c][k] * x_rows[r][k]
//
// for the given weight rows (any pointers: consecutive rows of one matrix,
// gate and up rows interleaved, ...) and activation rows. Each register tile
// is COLUMNS weight rows x ROWS activation rows, dot products along K: the
// weight rows stream straight from memory with no packing (one token reads
// every weight byte exactly once, at memory speed) and many tokens reuse each
// loaded weight vector ROWS times from registers (compute bound).
//
// Generic build (simd.h, 8 float lanes): activation rows are widened to
// float32 a K-chunk at a time into a small buffer; weights are widened in
// registers. AVX-512 BF16 build (MLX_MOE_DOT_BF16, dot_bf16_avx512.h): both
// bfloat16 operands are read in place by VDPBF16PS.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"

namespace mlx_moe::cpu {
namespace {

// K-chunk of the generic dot kernel: the float32 activation rows of a chunk
// (rows x chunk x 4 bytes) stay within about half of a 1 MB L2, and chunks
// are at least 256 long so horizontal sums stay rare.
constexpr int64_t kDotChunkBytes = 512 * 1024;
constexpr int64_t kDotMinChunk = 256;

// Per-thread buffers, reused across calls (no allocation in steady state).
struct DotScratch {
  std::vector<float> rows; // activation rows of one K-chunk, float32
};

inline DotScratch& dot_scratch() {
  thread_local DotScratch s;
  return s;
}

inline int64_t round_up(int64_t x, int64_t multiple) {
  return (x + multiple - 1) / multiple * multiple;
}

// Converts columns [k0, k0 + kc) of every row to float32 into
// dst[r * ld + ...], padding up to ld with zeros.
template <typename T>
void load_rows(
    const T* const* rows,
    int64_t num_rows,
    int64_t col_stride,
    int64_t k0,
    int64_t kc,
    int64_t ld,
    float* dst) {
  for (int64_t r = 0; r < num_rows; ++r) {
    const T* src = rows[r];
    float* d = dst + r * ld;
    if (col_stride == 1) {
      const T* s = src + k0;
      int64_t k = 0;
      for (; k + 8 <= kc; k += 8) {
        store(d + k, load(s + k));
      }
      for (; k < kc; ++k) {
        d[k] = to_float(s[k]);
      }
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        d[k] = to_float(src[(k0 + k) * col_stride]);
      }
    }
    for (int64_t k = kc; k < ld; ++k) {
      d[k] = 0.0f;
    }
  }
}

// Tile policies for dot_chunk. Tile::run<COLUMNS, ROWS> computes one
// register tile: out[r * ldo + c] += sum_{k < kc} w[c][k0 + k] *
// x[r * ldx + k]. `next` (or null): the weight rows the next tile reads,
// prefetched in step with this one so their streams are in flight when it
// starts (a tile reads only a few KB per weight row, too short for the
// hardware prefetcher to ramp up on its own).
//
// The 8-lane tile (simd.h): `kc` must be a multiple of 8 (dot_chunk adds
// the K tail itself).
struct Lanes8Tile {
  static constexpr bool kHandlesTail = false;
  static constexpr int64_t kLanes = 8;

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
    Vec8 acc[COLUMNS][ROWS];
    const T* wp[COLUMNS];
  #pragma GCC unroll 8
    for (int c = 0; c < COLUMNS; ++c) {
      wp[c] = w[c] + k0;
  #pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        acc[c][r] = zero();
      }
    }
    for (int64_t k = 0; k < kc; k += 8) {
      Vec8 wv[COLUMNS];
  #pragma GCC unroll 8
      for (int c = 0; c < COLUMNS; ++c) {
        wv[c] = load(wp[c] + k);
      }
      if (next) {
  #pragma GCC unroll 8
        for (int c = 0; c < COLUMNS; ++c) {
          prefetch(next[c] + k0 + k);
        }
      }
  #pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        Vec8 xv = load(x + r * ldx + k);
  #pragma GCC unroll 8
        for (int c = 0; c < COLUMNS; ++c) {
          acc[c][r] = fma(wv[c], xv, acc[c][r]);
        }
      }
    }
  #pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
  #pragma GCC unroll 8
      for (int c = 0; c < COLUMNS; ++c) {
        out[r * ldo + c] += horizontal_sum(acc[c][r]);
      }
    }
  }
};

// Runs Tile's COLUMNS x rows tile for a runtime rows <= MAX_ROWS.
template <class Tile, int COLUMNS, int MAX_ROWS, typename T>
inline void tile_rows(
    int rows,
    const T* const* w,
    int64_t k0,
    const float* x,
    int64_t ldx,
    int64_t kc,
    float* out,
    int64_t ldo,
    const T* const* next) {
  if constexpr (MAX_ROWS >= 1) {
    if (rows == MAX_ROWS) {
      Tile::template run<COLUMNS, MAX_ROWS>(w, k0, x, ldx, kc, out, ldo, next);
    } else {
      tile_rows<Tile, COLUMNS, MAX_ROWS - 1>(rows, w, k0, x, ldx, kc, out, ldo, next);
    }
  }
}

// One K-chunk over all rows and columns with Tile's COLUMNS x ROWS tiles
// (Lanes8Tile here; the AVX-512 build adds Lanes16Tile).
template <class Tile, int COLUMNS, int ROWS, typename T>
void dot_chunk(
    const T* const* w,
    int64_t columns,
    int64_t k0,
    const float* x,
    int64_t ldx,
    int64_t num_rows,
    int64_t kc,
    float* acc,
    int64_t ldacc,
    const T* const* following) {
  // Tiles without masked loads get a multiple of their lanes; the rest of
  // K is added below.
  const int64_t k_tiles = Tile::kHandlesTail ? kc : kc / Tile::kLanes * Tile::kLanes;
  int64_t c = 0;
  for (; c + COLUMNS <= columns; c += COLUMNS) {
    // Prefetch the next full tile's weight rows during the first row tile
    // (after the last tile: the caller's next rows, if it gave them).
    const T* const* next = c + 2 * COLUMNS <= columns ? w + c + COLUMNS
        : c + COLUMNS == columns                        ? following
                                                        : nullptr;
    for (int64_t r = 0; r < num_rows; r += ROWS) {
      int rows = static_cast<int>(std::min<int64_t>(ROWS, num_rows - r));
      tile_rows<Tile, COLUMNS, ROWS>(
          rows, w + c, k0, x + r * ldx, ldx, k_tiles, acc + r * ldacc + c, ldacc,
          r == 0 ? next : nullptr);
    }
  }
  for (; c < columns; ++c) {
    for (int64_t r = 0; r < num_rows; r += ROWS) {
      int rows = static_cast<int>(std::min<int64_t>(ROWS, num_rows - r));
      tile_rows<Tile, 1, ROWS>(
          rows, w + c, k0, x + r * ldx, ldx, k_tiles, acc + r * ldacc + c, ldacc,
          static_cast<const T* const*>(nullptr));
    }
  }
  if (k_tiles < kc) {
    for (int64_t r = 0; r < num_rows; ++r) {
      for (int64_t cc = 0; cc < columns; ++cc) {
        float s = 0.0f;
        for (int64_t k = k_tiles; k < kc; ++k) {
          s += to_float(w[cc][k0 + k]) * x[r * ldx + k];
        }
        acc[r * ldacc + cc] += s;
      }
    }
  }
}

} // namespace
} // namespace mlx_moe::cpu

#if defined(MLX_MOE_DOT_BF16)
#include "cpu/dot_bf16_avx512.h"
#endif

namespace mlx_moe::cpu {
namespace {

// Most weight rows one tile reads (the widest tile of any build).
constexpr int kMaxTileColumns = 8;

// The engine's entry point (see the top of this file). x_rows[r] points at
// row r's first element; its K elements are x_col_stride apart. The weight
// rows' K axis must be contiguous. `following` (or null): kMaxTileColumns
// weight rows the caller will pass next, prefetched during the last tile so
// that a sequence of short calls (one per expert) keeps streaming.
template <typename T>
void dot_rows(
    const T* const* w_rows,
    int64_t columns,
    const T* const* x_rows,
    int64_t x_col_stride,
    int64_t num_rows,
    int64_t K,
    float* acc,
    int64_t ldacc,
    const T* const* following = nullptr) {
  if (num_rows == 0 || columns == 0 || K == 0) {
    return;
  }
#if defined(MLX_MOE_DOT_BF16)
  if constexpr (std::is_same_v<T, BFloat16Bits>) {
    if (x_col_stride == 1) {
      dot_bf16(
          reinterpret_cast<const uint16_t* const*>(w_rows), columns,
          reinterpret_cast<const uint16_t* const*>(x_rows), num_rows, K, acc, ldacc,
          reinterpret_cast<const uint16_t* const*>(following));
      return;
    }
  }
#endif
  DotScratch& s = dot_scratch();
  const int64_t chunk =
      std::min(K, std::max(kDotMinChunk, kDotChunkBytes / (4 * num_rows) / 8 * 8));
  const int64_t ldx = round_up(chunk, 8);
  s.rows.resize(num_rows * ldx);
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    const int64_t kc = std::min(chunk, K - k0);
    load_rows<T>(x_rows, num_rows, x_col_stride, k0, kc, ldx, s.rows.data());
#if defined(MLX_MOE_DOT_BF16)
    // AVX-512 build: 16-lane FMA tiles (dot_bf16_avx512.h); the 4 x 4 tile
    // measured ~10% faster than the 8-lane 3 x 4 one at 64 rows per expert,
    // no measurable difference at 1-2 rows. All row counts use the same
    // lane width, so a token's result does not depend on its batch.
    if constexpr (!std::is_same_v<T, BFloat16Bits>) {
      if (num_rows == 1) {
        dot_chunk<Lanes16Tile, 4, 1>(
            w_rows, columns, k0, s.rows.data(), ldx, num_rows, kc, acc, ldacc, following);
      } else if (num_rows == 2) {
        dot_chunk<Lanes16Tile, 4, 2>(
            w_rows, columns, k0, s.rows.data(), ldx, num_rows, kc, acc, ldacc, following);
      } else {
        dot_chunk<Lanes16Tile, 4, 4>(
            w_rows, columns, k0, s.rows.data(), ldx, num_rows, kc, acc, ldacc, following);
      }
      continue;
    }
#endif
    // Tile shapes (16 AVX2 registers): one row streams 4 weight rows at once
    // (memory bound; measured faster than 1, 2 or 8 rows with next-tile
    // prefetch on Zen 4); more rows reuse each weight vector over 2 or 4
    // rows (12 accumulators in the 3 x 4 tile).
    if (num_rows == 1) {
      dot_chunk<Lanes8Tile, 4, 1>(
          w_rows, columns, k0, s.rows.data(), ldx, num_rows, kc, acc, ldacc, following);
    } else if (num_rows == 2) {
      dot_chunk<Lanes8Tile, 4, 2>(
          w_rows, columns, k0, s.rows.data(), ldx, num_rows, kc, acc, ldacc, following);
    } else {
      dot_chunk<Lanes8Tile, 3, 4>(
          w_rows, columns, k0, s.rows.data(), ldx, num_rows, kc, acc, ldacc, following);
    }
  }
}

} // namespace
} // namespace mlx_moe::cpu
