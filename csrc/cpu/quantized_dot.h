// The generic direct quantized dot product (simd.h's 8 float lanes: AVX2,
// NEON or plain C++), for few activation rows when the build has no
// specialised kernel for the format (quantized_dot_avx512.h): every affine
// width and mxfp4, any activation dtype.
//
// Per group g of a weight row and activation row x:
//   affine: sum_{k in g} (s q_k + b) x_k = s * sum q_k x_k + b * X_g
//   mxfp4:  sum_{k in g} s e2m1(q_k) x_k  = s * sum e2m1(q_k) x_k
// with X_g = sum_{k in g} x_k computed once per row. The codes are widened
// to float lanes in registers (codes8 / e2m1_values8 in quantized.h) and
// multiplied with the float32 copy of the activations; a group's partial
// sums are scaled once at the group's end. Never a dequantized copy.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/quantized.h"
#include "cpu/simd.h"

namespace mlx_moe::cpu {
namespace {

constexpr int kGenericDirectColumns = 4;
constexpr int kGenericDirectRows = 2;

struct GenericDirectScratch {
  std::vector<float> x;          // [rows, K] float32 activations
  std::vector<float> group_sums; // [rows, groups]
};

inline GenericDirectScratch& generic_direct_scratch() {
  thread_local GenericDirectScratch s;
  return s;
}

// `FORMAT`: the affine bit width (1..8), or 0 for mxfp4.
template <int FORMAT>
inline Vec8 code_values8(const uint8_t* row, int64_t element) {
  if constexpr (FORMAT == 0) {
    return e2m1_values8(row + element / 2);
  } else {
    return codes8<FORMAT>(row + element / 8 * FORMAT);
  }
}

template <typename T>
inline float scale_value(const QuantizedRowRef& w, int64_t g, bool mxfp4) {
  return mxfp4 ? e8m0_to_float(static_cast<const uint8_t*>(w.scales)[g])
               : to_float(static_cast<const T*>(w.scales)[g]);
}

template <int FORMAT, typename T, int COLUMNS, int ROWS>
inline void generic_direct_tile(
    const QuantizedRowRef* w,
    const float* x,
    const float* group_sums,
    int64_t K,
    int group_size,
    float* out,
    int64_t ldo,
    const QuantizedRowRef* next) {
  const int64_t groups = K / group_size;
  Vec8 acc[COLUMNS][ROWS];
  float bias_terms[COLUMNS][ROWS] = {};
#pragma GCC unroll 4
  for (int c = 0; c < COLUMNS; ++c) {
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      acc[c][r] = zero();
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    Vec8 group_acc[COLUMNS][ROWS];
#pragma GCC unroll 4
    for (int c = 0; c < COLUMNS; ++c) {
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) {
        group_acc[c][r] = zero();
      }
    }
    for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 8) {
      Vec8 codes[COLUMNS];
#pragma GCC unroll 4
      for (int c = 0; c < COLUMNS; ++c) {
        codes[c] = code_values8<FORMAT>(w[c].codes, k);
      }
      if (next && k % 64 == 0) {
#pragma GCC unroll 4
        for (int c = 0; c < COLUMNS; ++c) {
          prefetch(next[c].codes + k * (FORMAT == 0 ? 4 : FORMAT) / 8);
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) {
        const Vec8 xv = load(x + r * K + k);
#pragma GCC unroll 4
        for (int c = 0; c < COLUMNS; ++c) {
          group_acc[c][r] = fma(codes[c], xv, group_acc[c][r]);
        }
      }
    }
#pragma GCC unroll 4
    for (int c = 0; c < COLUMNS; ++c) {
      const Vec8 scale = broadcast(scale_value<T>(w[c], g, FORMAT == 0));
      const float bias = FORMAT == 0 ? 0.0f : to_float(static_cast<const T*>(w[c].biases)[g]);
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) {
        acc[c][r] = fma(group_acc[c][r], scale, acc[c][r]);
        bias_terms[c][r] += bias * group_sums[r * groups + g];
      }
    }
  }
#pragma GCC unroll 4
  for (int c = 0; c < COLUMNS; ++c) {
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      out[r * ldo + c] += horizontal_sum(acc[c][r]) + bias_terms[c][r];
    }
  }
}

template <int FORMAT, typename T, int COLUMNS, int MAX_ROWS>
inline void generic_direct_rows(
    int rows,
    const QuantizedRowRef* w,
    const float* x,
    const float* group_sums,
    int64_t K,
    int group_size,
    float* out,
    int64_t ldo,
    const QuantizedRowRef* next) {
  if constexpr (MAX_ROWS >= 1) {
    if (rows == MAX_ROWS) {
      generic_direct_tile<FORMAT, T, COLUMNS, MAX_ROWS>(w, x, group_sums, K, group_size, out, ldo, next);
    } else {
      generic_direct_rows<FORMAT, T, COLUMNS, MAX_ROWS - 1>(
          rows, w, x, group_sums, K, group_size, out, ldo, next);
    }
  }
}

template <int FORMAT, typename T>
void generic_direct_dot_format(
    const QuantizedRowRef* w,
    int64_t columns,
    const T* const* x_rows,
    int64_t x_col_stride,
    int64_t num_rows,
    int64_t K,
    int group_size,
    float* acc,
    int64_t ldacc) {
  GenericDirectScratch& s = generic_direct_scratch();
  const int64_t groups = K / group_size;
  s.x.resize(num_rows * K);
  s.group_sums.resize(num_rows * groups);
  for (int64_t r = 0; r < num_rows; ++r) {
    float* x = s.x.data() + r * K;
    for (int64_t k = 0; k < K; ++k) {
      x[k] = to_float(x_rows[r][k * x_col_stride]);
    }
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.0f;
      for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) {
        sum += x[k];
      }
      s.group_sums[r * groups + g] = sum;
    }
  }
  int64_t c = 0;
  for (; c + kGenericDirectColumns <= columns; c += kGenericDirectColumns) {
    const int64_t ahead = c + 2 * kGenericDirectColumns;
    const QuantizedRowRef* next = ahead + kGenericDirectColumns <= columns ? w + ahead : nullptr;
    for (int64_t r = 0; r < num_rows; r += kGenericDirectRows) {
      const int n = static_cast<int>(std::min<int64_t>(kGenericDirectRows, num_rows - r));
      generic_direct_rows<FORMAT, T, kGenericDirectColumns, kGenericDirectRows>(
          n, w + c, s.x.data() + r * K, s.group_sums.data() + r * groups, K, group_size,
          acc + r * ldacc + c, ldacc, r == 0 ? next : nullptr);
    }
  }
  for (; c < columns; ++c) {
    for (int64_t r = 0; r < num_rows; r += kGenericDirectRows) {
      const int n = static_cast<int>(std::min<int64_t>(kGenericDirectRows, num_rows - r));
      generic_direct_rows<FORMAT, T, 1, kGenericDirectRows>(
          n, w + c, s.x.data() + r * K, s.group_sums.data() + r * groups, K, group_size,
          acc + r * ldacc + c, ldacc, nullptr);
    }
  }
}

// Runs the generic direct kernel for any supported format.
template <typename T>
void generic_direct_dot(
    const QuantizedMatrices& q,
    const QuantizedRowRef* w,
    int64_t columns,
    const T* const* x_rows,
    int64_t x_col_stride,
    int64_t num_rows,
    int64_t K,
    float* acc,
    int64_t ldacc) {
  const int gs = q.group_size;
#define MLX_MOE_GENERIC_DIRECT(FORMAT) \
  generic_direct_dot_format<FORMAT, T>(w, columns, x_rows, x_col_stride, num_rows, K, gs, acc, ldacc)
  if (q.mode == QuantizationMode::mxfp4) {
    MLX_MOE_GENERIC_DIRECT(0);
    return;
  }
  switch (q.bits) {
    case 1: MLX_MOE_GENERIC_DIRECT(1); break;
    case 2: MLX_MOE_GENERIC_DIRECT(2); break;
    case 3: MLX_MOE_GENERIC_DIRECT(3); break;
    case 4: MLX_MOE_GENERIC_DIRECT(4); break;
    case 5: MLX_MOE_GENERIC_DIRECT(5); break;
    case 6: MLX_MOE_GENERIC_DIRECT(6); break;
    case 8: MLX_MOE_GENERIC_DIRECT(8); break;
    default: break;
  }
#undef MLX_MOE_GENERIC_DIRECT
}

} // namespace
} // namespace mlx_moe::cpu
