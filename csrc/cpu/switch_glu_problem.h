// The fused SwitchGLU as the CPU kernels see it: plain pointers and strides,
// no MLX types (shared by the per-instruction-set kernel builds and the
// dispatch in switch_glu.cpp).
//
//   hidden[i] = silu(x[t] @ gate[e]^T) * (x[t] @ up[e]^T)      (gate_up task)
//   out[t]   += score[t, j] * (hidden[i] @ down[e]^T)          (down task)
//
// for every slot s = t * top_k + j routed to expert e = indices[t, j], where
// i is the slot's position in the expert-sorted order (routing.h).
#pragma once

#include <cstdint>

#include "cpu/gather_mm_problem.h"
#include "cpu/quantized.h"

namespace mlx_moe::cpu {

struct SwitchGluProblem {
  ElementType dtype = ElementType::float32;
  int64_t tokens = 0;
  int64_t top_k = 0;
  int64_t model_dims = 0;  // D
  int64_t hidden_dims = 0; // H
  int64_t num_experts = 0;

  const void* x = nullptr; // [tokens, D], rows x_row_stride apart
  int64_t x_row_stride = 0;

  // Weight row r of expert e starts at w + e * expert_stride + r * row_stride
  // (elements of dtype); every row is contiguous along its last axis.
  const void* gate = nullptr; // [E, H, D]
  const void* up = nullptr;   // [E, H, D]
  int64_t gate_up_expert_stride = 0;
  int64_t gate_up_row_stride = 0;
  const void* down = nullptr; // [E, D, H]
  int64_t down_expert_stride = 0;
  int64_t down_row_stride = 0;

  // Quantized experts (quantized = true): the weights are read from these
  // (mx.quantize triples, matrix = expert, row = output feature) instead
  // of the dense pointers above.
  bool quantized = false;
  QuantizedMatrices gate_quantized;
  QuantizedMatrices up_quantized;
  QuantizedMatrices down_quantized;

  // Routing: the slots sorted by expert; expert e's slots are
  // order[offsets[e] .. offsets[e + 1]).
  const uint32_t* order = nullptr;
  const uint32_t* offsets = nullptr;

  void* hidden = nullptr;        // [tokens * top_k, H], rows in sorted order
  const float* scores = nullptr; // [tokens * top_k], or null
  void* out = nullptr;           // [tokens, D] with scores, else [tokens * top_k, D]

  int64_t expert_rows(int64_t e) const {
    return offsets[e + 1] - offsets[e];
  }
};

// Hidden columns [h_begin, h_end) of every slot routed to `expert`.
struct GateUpTask {
  int64_t expert;
  int64_t h_begin;
  int64_t h_end;
};

// Output columns [d_begin, d_end), over experts [expert_begin, expert_end).
// With scores, a task covers every expert so that each output element has
// one writer (the k slots of a token meet in the task's accumulator).
struct DownTask {
  int64_t expert_begin;
  int64_t expert_end;
  int64_t d_begin;
  int64_t d_end;
};

} // namespace mlx_moe::cpu
