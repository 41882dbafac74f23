// The launch plan of the fused quantized SwitchGLU Metal kernels
// (switch_glu_quantized.metal), decode path only: gate_up then down, each
// with its kernel, grid, threadgroup size and threadgroup memory, and the
// shared constant-buffer parameters. Plain C++ with no Metal types: the
// Metal dispatch (switch_glu.cpp) and the simulator tests
// (tests/test_metal_switch_glu_quantized.py, through
// _ext._plan_switch_glu_quantized) launch exactly what this returns.
#pragma once

#include <cstdint>
#include <string>

#include <mlx/dtype.h>

#include "metal/switch_glu_plan.h"
#include "metal/switch_glu_quantized_params.h"

namespace mlx_moe::metal {

// ops.cpp takes the fused quantized kernels for calls of at most this many
// slots (T * k): each expert then has few rows and one pass over its
// weights. They are correct for any count (row tiles of 8, a weight pass
// each), but larger calls compose gather_qmm, whose prefill kernel reuses a
// weight tile for 32 rows.
inline constexpr int64_t kSwitchGluQuantizedFusedMaxSlots = 64;

struct SwitchGluQuantizedPlan {
  uint32_t block_rows = 0;   // BM: 1, or 8 (more rows per expert: several tiles)
  uint32_t block_cols = 0;   // columns per threadgroup (both launches)
  bool scores = false;       // down: combine with scores (out [T, D]) or per slot (out [T * k, D])
  SwitchGluLaunch gate_up;   // buffers: x, gate (codes, scales, biases), up (codes, scales, biases),
                             // order, offsets, hidden, params
  SwitchGluLaunch down;      // buffers: hidden, down (codes, scales, biases), order, offsets, out,
                             // params[, scores]
  SwitchGluQuantizedParams params{};
};

// Shapes as plan_switch_glu (x [tokens, D], gate/up with H rows, down with D
// rows, E experts), the weights quantized as mx.quantize packs them: mode
// "affine" (bits 2, 3, 4, 5, 6, 8; group_size 32, 64, 128) or "mxfp4" (bits
// 4, group_size 32); D and H multiples of group_size; with scores, tokens
// <= kSwitchGluDecodeMaxTokens. Throws std::invalid_argument otherwise (the
// ops then compose gather_qmm calls) or for an unsupported dtype. Row tile:
// 1 when max_rows_per_expert <= 1, else 8.
SwitchGluQuantizedPlan plan_switch_glu_quantized(
    int64_t tokens,
    int64_t top_k,
    int64_t max_rows_per_expert,
    int64_t D,
    int64_t H,
    int64_t num_experts,
    int group_size,
    int bits,
    const std::string& mode,
    mlx::core::Dtype dtype,
    bool scores);

}  // namespace mlx_moe::metal
