// MLX dtype -> the kernels' ElementType (float32, float16, bfloat16), with an
// error naming the op for anything else.
#pragma once

#include <stdexcept>
#include <string>

#include "cpu/gather_mm_problem.h"
#include "mlx/dtype.h"

namespace mlx_moe::cpu {

inline ElementType element_type(mlx::core::Dtype dtype, const char* op) {
  if (dtype == mlx::core::float32) {
    return ElementType::float32;
  }
  if (dtype == mlx::core::float16) {
    return ElementType::float16;
  }
  if (dtype == mlx::core::bfloat16) {
    return ElementType::bfloat16;
  }
  throw std::invalid_argument(
      std::string("[") + op + "] The CPU kernel supports float32, float16 and bfloat16.");
}

} // namespace mlx_moe::cpu
