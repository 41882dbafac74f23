// The C++ op functions: argument checks, dtype and shape rules, and the
// primitive graph. Every message names the op, like MLX's own.
#pragma once

#include <optional>

#include "mlx/ops.h"

namespace mlx_moe {

namespace mx = mlx::core;

// Same semantics as mx::gather_mm: out[i] = a[lhs_indices[i]] @
// b[rhs_indices[i]] over the broadcast index arrays, indices into the
// flattened batch dimensions of a [..., M, K] and b [..., K, N]; without
// indices it is a plain (broadcasting) matmul. float32, float16 and
// bfloat16, accumulated in float32.
mx::array gather_mm(
    mx::array a,
    mx::array b,
    std::optional<mx::array> lhs_indices = std::nullopt,
    std::optional<mx::array> rhs_indices = std::nullopt,
    bool sorted_indices = false,
    mx::StreamOrDevice s = {});

// True when this build has our kernels for the stream's device. Where it
// has none (the GPU before the Metal/CUDA kernels land) the ops fall back
// to MLX's own implementation.
bool has_kernels_for(const mx::Stream& stream);

} // namespace mlx_moe
