// Reading index arrays on the CPU: any strides (broadcast included), every
// value checked against its bound, so a bad index is an error and never an
// out-of-bounds read.
#pragma once

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
// strided), each checked to lie in [0, bound); `what` names the argument
// in the error, `bound_meaning` says what the bound is.
inline std::vector<uint32_t> read_indices(
    const uint32_t* data,
    const mx::Shape& shape,
    const mx::Strides& strides,
    int64_t count,
    int64_t bound,
    const char* what,
    const char* bound_meaning) {
  std::vector<uint32_t> values(count);
  const int ndim = static_cast<int>(shape.size());
  for (int64_t i = 0; i < count; ++i) {
    uint32_t v = data[batch_offset(i, shape, strides, ndim)];
    if (v >= bound) {
      std::ostringstream msg;
      msg << what << " holds " << v << " (or a negative or too large value), outside [0, "
          << bound << "): " << bound_meaning << ".";
      throw std::out_of_range(msg.str());
    }
    values[i] = v;
  }
  return values;
}

} // namespace mlx_moe
