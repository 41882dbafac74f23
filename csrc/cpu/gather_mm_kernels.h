// The gather matmul's CPU kernels, written once against simd.h and compiled
// once per instruction set (gather_mm_avx2.cpp, gather_mm_portable.cpp).
//
// A task is one expert group (all rows that use the same b matrix) times a
// block of output columns. Its rows are converted to float32 a K-chunk at a
// time into a small buffer; b is read in its own dtype and widened in
// registers (never copied whole); the products accumulate in float32 in a
// per-task buffer that is rounded to the output dtype once at the end.
//
// Two inner kernels, chosen by b's layout:
//   - dot: b's K axis is contiguous (the transposed weight view mlx-lm's
//     SwitchLinear passes: w[e] is [N, K] row-major). Each register tile is
//     COLUMNS weight rows x ROWS activation rows, dot products along K, so
//     weight rows stream straight from memory with no packing: one token
//     reads every weight byte exactly once (memory bound), and many tokens
//     reuse each loaded weight vector ROWS times (compute bound).
//   - outer: b's N axis is contiguous (or b is strided and gets packed
//     16 columns at a time): 6 rows x 16 columns outer-product tile,
//     broadcast activations times weight vectors.
#pragma once

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/gather_mm_problem.h"
#include "cpu/simd.h"

namespace mlx_moe::cpu {
namespace {

// K-chunk of the dot kernel: sized so that the float32 activation rows of a
// chunk (rows x chunk x 4 bytes) stay within about half of a 1 MB L2, and at
// least 256 so horizontal sums stay rare.
constexpr int64_t kDotChunkBytes = 512 * 1024;
constexpr int64_t kDotMinChunk = 256;
// K-chunk of the outer kernel: a 16-column weight panel of this depth
// (16 KB in float32) stays in L1 while the row tiles pass over it.
constexpr int64_t kOuterChunk = 256;
// Register tile of the outer kernel.
constexpr int kOuterRows = 6;
constexpr int kOuterColumns = 16;

struct TaskScratch {
  std::vector<float> rows;         // activation rows of one K-chunk, float32
  std::vector<float> accumulators; // [rows, columns of the task] float32
  std::vector<float> packed_b;     // one packed weight panel (outer kernel)
  std::vector<const void*> a_rows;
  std::vector<void*> out_rows;
};

inline TaskScratch& scratch() {
  thread_local TaskScratch s;
  return s;
}

inline int64_t round_up(int64_t x, int64_t multiple) {
  return (x + multiple - 1) / multiple * multiple;
}

// Converts columns [k0, k0 + kc) of every row to float32 into
// dst[r * ld + ...], padding up to ld with zeros.
template <typename T>
void load_rows(
    const std::vector<const void*>& rows,
    int64_t col_stride,
    int64_t k0,
    int64_t kc,
    int64_t ld,
    float* dst) {
  for (size_t r = 0; r < rows.size(); ++r) {
    const T* src = static_cast<const T*>(rows[r]);
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

// ---------------------------------------------------------------- dot kernel
// out[r * ldo + c] += sum_k w[c * ldw + k] * x[r * ldx + k], k < k8 (a
// multiple of 8), for c < COLUMNS and r < ROWS. `next` (or null): the weight
// rows the next tile reads, prefetched in step with this one, so their
// streams are in flight when it starts (each tile reads only a few KB per
// weight row, too short for the hardware prefetcher to ramp up alone).
template <int COLUMNS, int ROWS, typename T>
inline void dot_tile(
    const T* w,
    int64_t ldw,
    const float* x,
    int64_t ldx,
    int64_t k8,
    float* out,
    int64_t ldo,
    const T* next) {
  Vec8 acc[COLUMNS][ROWS];
#pragma GCC unroll 8
  for (int c = 0; c < COLUMNS; ++c) {
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      acc[c][r] = zero();
    }
  }
  for (int64_t k = 0; k < k8; k += 8) {
    Vec8 wv[COLUMNS];
#pragma GCC unroll 8
    for (int c = 0; c < COLUMNS; ++c) {
      wv[c] = load(w + c * ldw + k);
    }
    if (next) {
#pragma GCC unroll 8
      for (int c = 0; c < COLUMNS; ++c) {
        prefetch(next + c * ldw + k);
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

template <int COLUMNS, int MAX_ROWS, typename T>
inline void dot_tile_rows(
    int rows,
    const T* w,
    int64_t ldw,
    const float* x,
    int64_t ldx,
    int64_t k8,
    float* out,
    int64_t ldo,
    const T* next) {
  if constexpr (MAX_ROWS >= 1) {
    if (rows == MAX_ROWS) {
      dot_tile<COLUMNS, MAX_ROWS>(w, ldw, x, ldx, k8, out, ldo, next);
    } else {
      dot_tile_rows<COLUMNS, MAX_ROWS - 1>(rows, w, ldw, x, ldx, k8, out, ldo, next);
    }
  }
}

// One K-chunk of the dot kernel over all rows and the task's columns, with a
// register tile of COLUMNS weight rows x ROWS activation rows.
template <int COLUMNS, int ROWS, typename T>
void dot_chunk(
    const T* w, // weight row n_begin, column k0
    int64_t ldw,
    int64_t columns,
    const float* x,
    int64_t ldx,
    int64_t num_rows,
    int64_t kc,
    float* acc,
    int64_t ldacc) {
  const int64_t k8 = kc / 8 * 8;
  int64_t c = 0;
  for (; c + COLUMNS <= columns; c += COLUMNS) {
    // Prefetch the next full tile's weight rows during the first row tile.
    const T* next = c + 2 * COLUMNS <= columns ? w + (c + COLUMNS) * ldw : nullptr;
    for (int64_t r = 0; r < num_rows; r += ROWS) {
      int rows = static_cast<int>(std::min<int64_t>(ROWS, num_rows - r));
      dot_tile_rows<COLUMNS, ROWS>(
          rows, w + c * ldw, ldw, x + r * ldx, ldx, k8, acc + r * ldacc + c, ldacc,
          r == 0 ? next : nullptr);
    }
  }
  for (; c < columns; ++c) {
    for (int64_t r = 0; r < num_rows; r += ROWS) {
      int rows = static_cast<int>(std::min<int64_t>(ROWS, num_rows - r));
      dot_tile_rows<1, ROWS>(
          rows, w + c * ldw, ldw, x + r * ldx, ldx, k8, acc + r * ldacc + c, ldacc,
          static_cast<const T*>(nullptr));
    }
  }
  if (k8 < kc) {
    for (int64_t r = 0; r < num_rows; ++r) {
      for (int64_t cc = 0; cc < columns; ++cc) {
        float s = 0.0f;
        for (int64_t k = k8; k < kc; ++k) {
          s += to_float(w[cc * ldw + k]) * x[r * ldx + k];
        }
        acc[r * ldacc + cc] += s;
      }
    }
  }
}

template <typename T>
void run_dot(const GatherMMProblem& p, const GatherMMTask& task, TaskScratch& s) {
  const int64_t num_rows = static_cast<int64_t>(s.a_rows.size());
  const int64_t columns = task.n_end - task.n_begin;
  const int64_t chunk = std::min(
      p.K,
      std::max(kDotMinChunk, kDotChunkBytes / (4 * num_rows) / 8 * 8));
  const int64_t ldx = round_up(chunk, 8);
  s.rows.resize(num_rows * ldx);
  const T* w = static_cast<const T*>(p.b) +
      p.b_offsets[p.pair_order[p.group_begin[task.group]]] +
      task.n_begin * p.b_n_stride;
  float* acc = s.accumulators.data();
  for (int64_t k0 = 0; k0 < p.K; k0 += chunk) {
    const int64_t kc = std::min(chunk, p.K - k0);
    load_rows<T>(s.a_rows, p.a_col_stride, k0, kc, ldx, s.rows.data());
    const T* wk = w + k0;
    // Tile shapes: one row streams 8 weight rows at once (memory bound);
    // more rows reuse each weight vector over 2 or 4 rows (12 of the 16
    // AVX2 registers hold accumulators in the 3 x 4 tile).
    if (num_rows == 1) {
      dot_chunk<8, 1>(wk, p.b_n_stride, columns, s.rows.data(), ldx, num_rows, kc, acc, columns);
    } else if (num_rows == 2) {
      dot_chunk<4, 2>(wk, p.b_n_stride, columns, s.rows.data(), ldx, num_rows, kc, acc, columns);
    } else {
      dot_chunk<3, 4>(wk, p.b_n_stride, columns, s.rows.data(), ldx, num_rows, kc, acc, columns);
    }
  }
}

// -------------------------------------------------------------- outer kernel
// out[r * ldo + j] += sum_k x[r * ldx + k] * b[k * ldb + j], j < 16, for
// r < ROWS; only the first `columns` columns are written.
template <int ROWS, typename T>
inline void outer_tile(
    const T* b,
    int64_t ldb,
    const float* x,
    int64_t ldx,
    int64_t kc,
    float* out,
    int64_t ldo,
    int64_t columns) {
  Vec8 acc[ROWS][2];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
    acc[r][0] = zero();
    acc[r][1] = zero();
  }
  for (int64_t k = 0; k < kc; ++k) {
    Vec8 b0 = load(b + k * ldb);
    Vec8 b1 = load(b + k * ldb + 8);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      Vec8 xv = broadcast(x[r * ldx + k]);
      acc[r][0] = fma(xv, b0, acc[r][0]);
      acc[r][1] = fma(xv, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
    float* o = out + r * ldo;
    if (columns == kOuterColumns) {
      store(o, add(load(o), acc[r][0]));
      store(o + 8, add(load(o + 8), acc[r][1]));
    } else {
      float tmp[kOuterColumns];
      store(tmp, acc[r][0]);
      store(tmp + 8, acc[r][1]);
      for (int64_t j = 0; j < columns; ++j) {
        o[j] += tmp[j];
      }
    }
  }
}

template <int MAX_ROWS, typename T>
inline void outer_tile_rows(
    int rows,
    const T* b,
    int64_t ldb,
    const float* x,
    int64_t ldx,
    int64_t kc,
    float* out,
    int64_t ldo,
    int64_t columns) {
  if constexpr (MAX_ROWS >= 1) {
    if (rows == MAX_ROWS) {
      outer_tile<MAX_ROWS>(b, ldb, x, ldx, kc, out, ldo, columns);
    } else {
      outer_tile_rows<MAX_ROWS - 1>(rows, b, ldb, x, ldx, kc, out, ldo, columns);
    }
  }
}

template <typename T>
void run_outer(const GatherMMProblem& p, const GatherMMTask& task, TaskScratch& s) {
  const int64_t num_rows = static_cast<int64_t>(s.a_rows.size());
  const int64_t columns = task.n_end - task.n_begin;
  const int64_t ldx = kOuterChunk;
  s.rows.resize(num_rows * ldx);
  s.packed_b.resize(kOuterChunk * kOuterColumns);
  const T* w = static_cast<const T*>(p.b) +
      p.b_offsets[p.pair_order[p.group_begin[task.group]]];
  float* acc = s.accumulators.data();
  for (int64_t k0 = 0; k0 < p.K; k0 += kOuterChunk) {
    const int64_t kc = std::min(kOuterChunk, p.K - k0);
    load_rows<T>(s.a_rows, p.a_col_stride, k0, kc, ldx, s.rows.data());
    for (int64_t c = 0; c < columns; c += kOuterColumns) {
      const int64_t width = std::min<int64_t>(kOuterColumns, columns - c);
      const int64_t n = task.n_begin + c;
      auto run_rows = [&](const auto* panel, int64_t ldb) {
        for (int64_t r = 0; r < num_rows; r += kOuterRows) {
          int rows = static_cast<int>(std::min<int64_t>(kOuterRows, num_rows - r));
          outer_tile_rows<kOuterRows>(
              rows, panel, ldb, s.rows.data() + r * ldx, ldx, kc,
              acc + r * columns + c, columns, width);
        }
      };
      if (p.b_n_stride == 1 && width == kOuterColumns) {
        // Weight rows are contiguous along N: read them in place.
        run_rows(w + k0 * p.b_k_stride + n, p.b_k_stride);
      } else {
        // Strided or ragged edge: pack a zero-padded float32 panel.
        float* panel = s.packed_b.data();
        for (int64_t k = 0; k < kc; ++k) {
          const T* src = w + (k0 + k) * p.b_k_stride + n * p.b_n_stride;
          float* dst = panel + k * kOuterColumns;
          for (int64_t j = 0; j < width; ++j) {
            dst[j] = to_float(src[j * p.b_n_stride]);
          }
          for (int64_t j = width; j < kOuterColumns; ++j) {
            dst[j] = 0.0f;
          }
        }
        run_rows(static_cast<const float*>(panel), kOuterColumns);
      }
    }
  }
}

// ------------------------------------------------------------------ one task
// Rounds the float32 accumulators to the output rows.
template <typename T>
void store_rows(const TaskScratch& s, int64_t num_rows, int64_t columns) {
  for (int64_t r = 0; r < num_rows; ++r) {
    T* o = static_cast<T*>(s.out_rows[r]);
    const float* a = s.accumulators.data() + r * columns;
    for (int64_t j = 0; j < columns; ++j) {
      o[j] = from_float<T>(a[j]);
    }
  }
}

template <typename T>
void run_task_typed(const GatherMMProblem& p, const GatherMMTask& task) {
  TaskScratch& s = scratch();
  const int64_t M = p.rows_per_pair;
  const int64_t begin = p.group_begin[task.group];
  const int64_t end = p.group_begin[task.group + 1];
  const int64_t num_rows = (end - begin) * M;
  const int64_t columns = task.n_end - task.n_begin;
  if (num_rows == 0 || columns == 0) {
    return;
  }
  s.a_rows.resize(num_rows);
  s.out_rows.resize(num_rows);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t pair = p.pair_order[i];
    for (int64_t m = 0; m < M; ++m) {
      const int64_t r = (i - begin) * M + m;
      s.a_rows[r] = static_cast<const T*>(p.a) + p.a_offsets[pair] + m * p.a_row_stride;
      s.out_rows[r] = static_cast<T*>(p.out) + (pair * M + m) * p.N + task.n_begin;
    }
  }
  s.accumulators.assign(num_rows * columns, 0.0f);
  if (p.K > 0) {
#if defined(MLX_MOE_DOT_BF16)
    // Both operands bfloat16 with contiguous K: the AVX512-BF16 kernel
    // (dot_bf16_avx512.h) reads them in place.
    if constexpr (std::is_same_v<T, BFloat16Bits>) {
      if (p.b_k_stride == 1 && p.a_col_stride == 1) {
        const T* w = static_cast<const T*>(p.b) + p.b_offsets[p.pair_order[begin]] +
            task.n_begin * p.b_n_stride;
        dot_bf16(
            reinterpret_cast<const uint16_t*>(w), p.b_n_stride, columns,
            reinterpret_cast<const uint16_t* const*>(s.a_rows.data()), num_rows, p.K,
            s.accumulators.data());
        store_rows<T>(s, num_rows, columns);
        return;
      }
    }
#endif
    if (p.b_k_stride == 1) {
      run_dot<T>(p, task, s);
    } else {
      run_outer<T>(p, task, s);
    }
  }
  store_rows<T>(s, num_rows, columns);
}

inline void run_task(const GatherMMProblem& p, const GatherMMTask& task) {
  switch (p.dtype) {
    case ElementType::float32:
      run_task_typed<float>(p, task);
      break;
    case ElementType::float16:
      run_task_typed<Float16Bits>(p, task);
      break;
    case ElementType::bfloat16:
      run_task_typed<BFloat16Bits>(p, task);
      break;
  }
}

} // namespace
} // namespace mlx_moe::cpu
