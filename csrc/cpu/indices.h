// Reading index arrays on the CPU: any strides (broadcast included), every
// value checked against its bound, so a bad index is never an
// out-of-bounds read (its output is NaN instead).
#pragma once

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "mlx/array.h"

namespace mlx_moe {

namespace mx = mlx::core;

// Element offset of the flat position `index` of an array's leading
// `ndim` dimensions, given their shape and strides.
inline int64_t batch_offset(
    int64_t index,
    const mx::Shape& shape,
    const mx::Strides& strides,
    int ndim) {
  int64_t offset = 0;
  for (int d = ndim - 1; d >= 0 && index > 0; --d) {
    offset += (index % shape[d]) * strides[d];
    index /= shape[d];
  }
  return offset;
}

// The index array's values in row-major order (it may be broadcast or
// strided), each checked to lie in [0, bound). A value outside is never
// used to read: it is replaced by 0 and its position appended to
// `out_of_range`, so the caller can make that position's output NaN. (An
// exception thrown from a CPU task is MLX's only error channel there, and
// repeated ones leak MLX's in-flight task count until `eval` hangs; the
// GPU, which cannot raise either, gives NaN the same way. Indices already
// evaluated when the op is called are checked there and raise.)
inline std::vector<uint32_t> read_indices(
    const uint32_t* data,
    const mx::Shape& shape,
    const mx::Strides& strides,
    int64_t count,
    int64_t bound,
    std::vector<int64_t>& out_of_range) {
  std::vector<uint32_t> values(count);
  const int ndim = static_cast<int>(shape.size());
  for (int64_t i = 0; i < count; ++i) {
    uint32_t v = data[batch_offset(i, shape, strides, ndim)];
    if (v >= bound) {
      out_of_range.push_back(i);
      v = 0;
    }
    values[i] = v;
  }
  return values;
}

// Sets `count` consecutive elements of a float32 / float16 / bfloat16
// buffer to a quiet NaN.
inline void fill_nan(void* data, int64_t count, mx::Dtype dtype) {
  if (dtype == mx::float32) {
    std::fill(static_cast<uint32_t*>(data), static_cast<uint32_t*>(data) + count, 0x7FC00000u);
  } else {
    const uint16_t nan = dtype == mx::float16 ? 0x7E00 : 0x7FC0;
    std::fill(static_cast<uint16_t*>(data), static_cast<uint16_t*>(data) + count, nan);
  }
}

} // namespace mlx_moe
