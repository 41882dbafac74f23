// The constant buffer of the fused quantized SwitchGLU Metal kernels
// (switch_glu_quantized.metal), defined once for both sides like
// switch_glu_params.h. Only 32-bit unsigned fields.
#pragma once

#ifndef __METAL_VERSION__
#include <cstdint>
namespace mlx_moe::metal {
#endif

struct SwitchGluQuantizedParams {
  uint32_t tokens;       // T: rows of x (and of out with scores)
  uint32_t top_k;        // k: slots per token; slot s = t * k + j
  uint32_t D;            // model dims: columns of x and out, rows of down
  uint32_t H;            // hidden dims: rows of gate/up, columns of hidden and down
  uint32_t num_experts;  // E: offsets has E + 1 entries
  uint32_t d_chunk;      // gate_up: D elements of x staged per pass (a multiple of 32)
  uint32_t h_chunk;      // down: H elements of hidden staged per pass (a multiple of 32)
  uint32_t group_size;   // elements sharing one scale (and bias): 32, 64 or 128
  uint32_t bits;         // code width (informational: the kernels are specialised on it)
  uint32_t reserved[3];  // keeps the struct a multiple of 16 bytes
};

#ifndef __METAL_VERSION__
static_assert(sizeof(SwitchGluQuantizedParams) == 48, "SwitchGluQuantizedParams must match the MSL layout");
}  // namespace mlx_moe::metal
#endif
