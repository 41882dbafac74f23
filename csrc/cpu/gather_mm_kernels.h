// The gather matmul's CPU task, written once against simd.h and compiled
// once per instruction set (kernels_portable.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp).
//
// A task is one expert group (all rows that use the same b matrix) times a
// block of output columns; the products accumulate in float32 in a per-task
// buffer that is rounded to the output dtype once at the end. Two inner
// kernels, chosen by b's layout:
//   - dot (dot_kernels.h): b's K axis is contiguous, the transposed weight
//     view mlx-lm's SwitchLinear passes (w[e] is [N, K] row-major);
//   - outer (below): b's N axis is contiguous, or b is strided and gets
//     packed 16 columns at a time: a 6 rows x 16 columns outer-product tile,
//     broadcast activations times weight vectors, over K-chunks whose weight
//     panel stays in L1.
#pragma once

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/dot_kernels.h"
#include "cpu/gather_mm_problem.h"

namespace mlx_moe::cpu {
namespace {

constexpr int64_t kOuterChunk = 256;
constexpr int kOuterRows = 6;
constexpr int kOuterColumns = 16;

struct TaskScratch {
  std::vector<float> rows;         // activation rows of one K-chunk (outer)
  std::vector<float> accumulators; // [rows, columns of the task] float32
  std::vector<float> packed_b;     // one packed weight panel (outer)
  std::vector<const void*> a_rows;
  std::vector<void*> out_rows;
  std::vector<const void*> w_rows;
};

inline TaskScratch& scratch() {
  thread_local TaskScratch s;
  return s;
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
    load_rows<T>(
        reinterpret_cast<const T* const*>(s.a_rows.data()), num_rows, p.a_col_stride, k0, kc,
        ldx, s.rows.data());
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
    if (p.b_k_stride == 1) {
      const T* w = static_cast<const T*>(p.b) + p.b_offsets[p.pair_order[begin]] +
          task.n_begin * p.b_n_stride;
      s.w_rows.resize(columns);
      for (int64_t c = 0; c < columns; ++c) {
        s.w_rows[c] = w + c * p.b_n_stride;
      }
      dot_rows<T>(
          reinterpret_cast<const T* const*>(s.w_rows.data()), columns,
          reinterpret_cast<const T* const*>(s.a_rows.data()), p.a_col_stride, num_rows, p.K,
          s.accumulators.data(), columns);
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
