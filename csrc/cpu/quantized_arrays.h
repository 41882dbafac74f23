// MLX arrays of an mx.quantize triple -> the kernels' QuantizedMatrices.
#pragma once

#include <string>

#include "cpu/quantized.h"
#include "mlx/array.h"

namespace mlx_moe {

// w uint32 [..., rows, packed], scales and biases (or null) [..., rows,
// groups], all row contiguous (the ops make them so).
cpu::QuantizedMatrices quantized_matrices(
    const mlx::core::array& w,
    const mlx::core::array& scales,
    const mlx::core::array* biases,
    int group_size,
    int bits,
    const std::string& mode);

} // namespace mlx_moe
