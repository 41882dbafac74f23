// Small helpers shared by the Metal launch plans (*_plan.cpp): integer
// rounding, 32-bit checks of the sizes the kernels hold in uint, and the MSL
// name and size of a supported dtype. Plain C++, no Metal types.
#pragma once

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

#include <mlx/dtype.h>

namespace mlx_moe::metal {

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Threadgroup memory lengths must be multiples of 16 bytes.
inline int64_t round16(int64_t bytes) {
  return ceil_div(bytes, 16) * 16;
}

// `v` as the uint32 a kernel holds it; std::invalid_argument naming the op
// and the quantity otherwise.
inline uint32_t to_u32(int64_t v, const char* op, const char* what) {
  if (v < 0 || v > std::numeric_limits<uint32_t>::max()) {
    throw std::invalid_argument(std::string("[") + op + "] " + what + " out of range for the Metal kernels");
  }
  return static_cast<uint32_t>(v);
}

// MSL type name (the kernel-name suffix) and size of a supported dtype.
inline std::pair<const char*, int64_t> msl_type(mlx::core::Dtype dtype, const char* op) {
  if (dtype == mlx::core::float32) return {"float", 4};
  if (dtype == mlx::core::float16) return {"half", 2};
  if (dtype == mlx::core::bfloat16) return {"bfloat", 2};
  throw std::invalid_argument(std::string("[") + op + "] the Metal kernels take float32, float16 or bfloat16");
}

}  // namespace mlx_moe::metal
