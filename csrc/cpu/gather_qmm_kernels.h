// The quantized gather matmul's CPU task, compiled once per instruction set.
//
// A task is one matrix's group of rows times a block of output columns: the
// block's weight rows are dequantized into a per-thread buffer in the compute
// dtype (columns x K elements, a few hundred KB, cache resident) and handed
// to the dot engine (dot_kernels.h), which multiplies them with every row of
// the group. The packed weights are thus read from memory once per call and
// never expanded beyond one block.
#pragma once

#include <type_traits>
#include <vector>

#include "cpu/dot_kernels.h"
#include "cpu/gather_mm_kernels.h"
#include "cpu/gather_qmm_problem.h"
#include "cpu/quantized.h"
#include "cpu/quantized_dot.h"

#if defined(MLX_MOE_DOT_BF16)
#include "cpu/quantized_dot_avx512.h"
#endif
#include "cpu/quantized_dot_avx2.h"
#include "cpu/quantized_gemm_avx2.h"
#include "cpu/quantized_dot_int8_avx2.h"

namespace mlx_moe::cpu {
namespace {

// Up to this many activation rows per weight block, a direct kernel
// multiplies the packed codes in registers; beyond, dequantizing the block
// once into cache and running the dot engine on it costs less per row. The
// AVX-512 BF16 kernel widens 32 codes in 4 instructions, the generic one
// 8 codes in about 4 (so its unpacking, repeated per pair of rows, stops
// paying sooner).
constexpr int64_t kDirectRowLimit = 16;
constexpr int64_t kGenericDirectRowLimit = 6;
// The AVX2 integer kernel (quantized_dot_avx2.h) unpacks 32 codes in 3
// instructions and pays ~4 per extra row, so it stays ahead of
// dequantizing a little longer than the generic one.
constexpr int64_t kInt16DirectRowLimit = 8;

// The kernels that multiply the packed codes without a dequantized copy:
// true when one ran, false when the caller must dequantize. Few rows: the
// AVX-512 BF16 one where it applies, the AVX2 integer one, else the generic
// one (in the AVX2 build, 4-bit codes with bfloat16 activations: the 8-bit
// activation kernel of quantized_dot_int8_avx2.h). Many rows: the AVX2
// integer GEMM in the AVX2 build (the AVX-512 build's BF16 dot engine on
// dequantized blocks is as fast there).
template <typename T>
bool direct_quantized_dot(
    const QuantizedMatrices& q,
    const QuantizedRowRef* w,
    int64_t columns,
    const T* const* x_rows,
    int64_t x_col_stride,
    int64_t num_rows,
    int64_t K,
    float* acc,
    int64_t ldacc,
    const QuantizedRowRef* following = nullptr,
    int64_t following_count = 0) {
#if defined(MLX_MOE_DOT_BF16)
  if constexpr (std::is_same_v<T, BFloat16Bits>) {
    if (x_col_stride == 1 && num_rows <= kDirectRowLimit && direct_dot_supports(q)) {
      direct_dot_bf16(
          q, w, columns, reinterpret_cast<const uint16_t* const*>(x_rows), num_rows, K, acc, ldacc,
          following, following_count);
      return true;
    }
  }
#endif
  (void)following, (void)following_count;
#if defined(MLX_MOE_SIMD_AVX2)
  if constexpr (!std::is_same_v<T, float>) {
#if !defined(MLX_MOE_DOT_BF16)
    if constexpr (std::is_same_v<T, BFloat16Bits>) {
      if (x_col_stride == 1 && num_rows <= kInt16DirectRowLimit && int8_direct_supports<T>(q)) {
        int8_direct_dot(q, w, columns, x_rows, num_rows, K, acc, ldacc);
        return true;
      }
    }
#endif
    if (int16_direct_supports(q)) {
      if (num_rows <= kInt16DirectRowLimit) {
        int16_direct_dot<T>(q, w, columns, x_rows, x_col_stride, num_rows, K, acc, ldacc);
        return true;
      }
#if !defined(MLX_MOE_DOT_BF16)
      int16_gemm<T>(q, w, columns, x_rows, x_col_stride, num_rows, K, acc, ldacc);
      return true;
#endif
    }
  }
#endif
  if (num_rows <= kGenericDirectRowLimit) {
    generic_direct_dot<T>(q, w, columns, x_rows, x_col_stride, num_rows, K, acc, ldacc);
    return true;
  }
  return false;
}

// The weight side of a task; the activation rows, output rows and float32
// accumulators live in gather_mm's TaskScratch (scratch()).
template <typename T>
struct QuantizedTaskScratch {
  std::vector<T> weights;      // the dequantized block, [columns, K]
  std::vector<T> row;          // one dequantized row of a [K, N] matrix
  std::vector<const T*> w_rows;
  std::vector<QuantizedRowRef> refs;
};

template <typename T>
inline QuantizedTaskScratch<T>& quantized_scratch() {
  thread_local QuantizedTaskScratch<T> s;
  return s;
}

// Dequantizes output columns [n_begin, n_begin + columns) of `matrix` into
// s.weights as rows of K elements and points s.w_rows at them.
template <typename T>
void dequantize_columns(const QuantizedMatrices& w, bool transpose, int64_t matrix, int64_t n_begin,
                        int64_t columns, int64_t K, QuantizedTaskScratch<T>& s) {
  s.weights.resize(columns * K);
  s.w_rows.resize(columns);
  T* block = s.weights.data();
  if (transpose) {
    for (int64_t c = 0; c < columns; ++c) {
      dequantize_row<T>(w, matrix, n_begin + c, 0, K, block + c * K);
    }
  } else {
    // [K, N] packed along N: dequantize each row's slice of the block and
    // scatter it into column-major order (the gradient path).
    s.row.resize(columns);
    for (int64_t k = 0; k < K; ++k) {
      dequantize_row<T>(w, matrix, k, n_begin, columns, s.row.data());
      for (int64_t c = 0; c < columns; ++c) {
        block[c * K + k] = s.row[c];
      }
    }
  }
  for (int64_t c = 0; c < columns; ++c) {
    s.w_rows[c] = block + c * K;
  }
}

template <typename T>
void gather_qmm_task_typed(const GatherQMMProblem& p, const GatherMMTask& task) {
  TaskScratch& rows = scratch();
  QuantizedTaskScratch<T>& s = quantized_scratch<T>();
  const int64_t M = p.rows_per_pair;
  const int64_t begin = p.group_begin[task.group];
  const int64_t end = p.group_begin[task.group + 1];
  const int64_t num_rows = (end - begin) * M;
  const int64_t columns = task.n_end - task.n_begin;
  if (num_rows == 0 || columns == 0) {
    return;
  }
  rows.a_rows.resize(num_rows);
  rows.out_rows.resize(num_rows);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t pair = p.pair_order[i];
    for (int64_t m = 0; m < M; ++m) {
      const int64_t r = (i - begin) * M + m;
      rows.a_rows[r] = static_cast<const T*>(p.x) + p.x_offsets[pair] + m * p.x_row_stride;
      rows.out_rows[r] = static_cast<T*>(p.out) + (pair * M + m) * p.N + task.n_begin;
    }
  }
  rows.accumulators.assign(num_rows * columns, 0.0f);
  if (p.K > 0) {
    const int64_t matrix = p.matrix_of_pair[p.pair_order[begin]];
    const T* const* x_rows = reinterpret_cast<const T* const*>(rows.a_rows.data());
    bool done = false;
    if (p.transpose) {
      s.refs.resize(columns);
      for (int64_t c = 0; c < columns; ++c) {
        s.refs[c] = quantized_row<T>(p.w, matrix, task.n_begin + c);
      }
      done = direct_quantized_dot<T>(
          p.w, s.refs.data(), columns, x_rows, p.x_col_stride, num_rows, p.K,
          rows.accumulators.data(), columns);
    }
    if (!done) {
      dequantize_columns<T>(p.w, p.transpose, matrix, task.n_begin, columns, p.K, s);
      dot_rows<T>(
          s.w_rows.data(), columns, x_rows, p.x_col_stride, num_rows, p.K,
          rows.accumulators.data(), columns);
    }
  }
  store_rows<T>(rows, num_rows, columns);
}

inline void gather_qmm_task(const GatherQMMProblem& p, const GatherMMTask& task) {
  switch (p.dtype) {
    case ElementType::float32:
      return gather_qmm_task_typed<float>(p, task);
    case ElementType::float16:
      return gather_qmm_task_typed<Float16Bits>(p, task);
    case ElementType::bfloat16:
      return gather_qmm_task_typed<BFloat16Bits>(p, task);
  }
}

} // namespace
} // namespace mlx_moe::cpu
