// The gather matmul as the CPU kernels see it: plain pointers, strides and
// expert groups, no MLX types, so the SIMD kernels (compiled once per
// instruction set) and the dispatch in gather_mm.cpp share one description.
#pragma once

#include <cstdint>

namespace mlx_moe::cpu {

enum class ElementType { float32, float16, bfloat16 };

// out[p] = a[lhs[p]] @ b[rhs[p]] for every index pair p, where a[i] is an
// [M, K] matrix and b[j] a [K, N] matrix, and out is contiguous [pairs, M, N].
// The pairs are grouped by their b matrix (see routing.h): every group
// streams its b matrix once for all of its rows.
struct GatherMMProblem {
  int64_t rows_per_pair = 0; // M
  int64_t N = 0;
  int64_t K = 0;
  ElementType dtype = ElementType::float32;

  // a and b in elements of dtype. a_offsets[p] / b_offsets[p]: where pair
  // p's a and b matrices start.
  const void* a = nullptr;
  int64_t a_row_stride = 0;
  int64_t a_col_stride = 0;
  const int64_t* a_offsets = nullptr;

  const void* b = nullptr;
  int64_t b_k_stride = 0;
  int64_t b_n_stride = 0;
  const int64_t* b_offsets = nullptr;

  void* out = nullptr;

  // Group g holds pairs pair_order[group_begin[g] .. group_begin[g + 1]),
  // all with the same b matrix.
  const uint32_t* pair_order = nullptr;
  const int64_t* group_begin = nullptr;
  int64_t num_groups = 0;

  int64_t group_rows(int64_t g) const {
    return (group_begin[g + 1] - group_begin[g]) * rows_per_pair;
  }
};

// One unit of parallel work: output columns [n_begin, n_end) of every row
// of group `group`.
struct GatherMMTask {
  int64_t group;
  int64_t n_begin;
  int64_t n_end;
};

} // namespace mlx_moe::cpu
