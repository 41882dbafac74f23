// The gather matmul on quantized matrices as the CPU kernels see it (shared
// by the per-instruction-set builds and the dispatch in gather_qmm.cpp).
#pragma once

#include <cstdint>

#include "cpu/gather_mm_problem.h"
#include "cpu/quantized.h"

namespace mlx_moe::cpu {

// out[p] = x[lhs[p]] @ W[rhs[p]]^T (transpose) or x[lhs[p]] @ W[rhs[p]] for
// every index pair p, W[j] the dequantized matrix j of `w`: [N, K] packed
// along K (transpose) or [K, N] packed along N. x[i] is [M, K]; out is
// contiguous [pairs, M, N]. Pairs are grouped by matrix as in
// GatherMMProblem, and tasks are GatherMMTasks (group x column block).
struct GatherQMMProblem {
  int64_t rows_per_pair = 0; // M
  int64_t N = 0;
  int64_t K = 0;
  ElementType dtype = ElementType::float32;

  const void* x = nullptr; // elements of dtype
  int64_t x_row_stride = 0;
  int64_t x_col_stride = 0;
  const int64_t* x_offsets = nullptr; // where pair p's x matrix starts

  QuantizedMatrices w;
  bool transpose = true;
  const uint32_t* matrix_of_pair = nullptr;

  void* out = nullptr;

  const uint32_t* pair_order = nullptr;
  const int64_t* group_begin = nullptr;
  int64_t num_groups = 0;

  int64_t group_rows(int64_t g) const {
    return (group_begin[g + 1] - group_begin[g]) * rows_per_pair;
  }
};

} // namespace mlx_moe::cpu
