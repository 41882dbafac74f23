// The C++ op functions: argument checks, dtype and shape rules, and the
// primitive graph. Every message names the op, like MLX's own.
#pragma once

#include <optional>
#include <utility>

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

// The fused SwitchGLU of a MoE layer (mlx-lm's SwitchGLU with SwiGLU):
// for every token t and slot j with expert e = indices[t, j],
//   y[t, j] = (silu(x[t] @ gate[e]^T) * (x[t] @ up[e]^T)) @ down[e]^T,
// returned as [..., k, D], or, with scores, as sum_j scores[t, j] * y[t, j],
// [..., D], computed inside the down kernel. x [..., D]; gate_weight and
// up_weight [E, H, D]; down_weight [E, D, H]; indices [..., k]. With
// gate_weight empty, up_weight is one fused gate_up weight [E, 2H, D] (gate
// rows first). Differentiable in x, the weights and scores.
mx::array switch_glu(
    mx::array x,
    std::optional<mx::array> gate_weight,
    mx::array up_weight,
    mx::array down_weight,
    mx::array indices,
    std::optional<mx::array> scores = std::nullopt,
    mx::StreamOrDevice s = {});

// The routing step on its own: the slots (t * k + j) of indices [..., k]
// sorted by expert, and the offsets [E + 1] of each expert's range.
std::pair<mx::array, mx::array> route(mx::array indices, int num_experts, mx::StreamOrDevice s = {});

// True when this build has our kernels for the stream's device. Where it
// has none (the GPU before the Metal/CUDA kernels land) the ops fall back
// to MLX's own implementation.
bool has_kernels_for(const mx::Stream& stream);

} // namespace mlx_moe
