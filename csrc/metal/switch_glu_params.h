// The constant buffer of the fused SwitchGLU Metal kernels
// (switch_glu.metal), defined once for both sides: the .metal file includes
// it as MSL, the launch plan (switch_glu_plan.cpp) as C++, and the host sends
// the struct's bytes unchanged (setBytes). Both launches of one SwitchGLU
// (gate_up and down) take the same struct. Only 32-bit unsigned fields: the
// layout is the same in MSL and C++ without padding rules to agree on.
#pragma once

#ifndef __METAL_VERSION__
#include <cstdint>
namespace mlx_moe::metal {
#endif

struct SwitchGluParams {
  uint32_t tokens;       // T: rows of x (and of out with scores)
  uint32_t top_k;        // k: slots per token; slot s = t * k + j
  uint32_t D;            // model dims: columns of x and out, rows of down
  uint32_t H;            // hidden dims: rows of gate/up, columns of hidden and down
  uint32_t num_experts;  // E: offsets has E + 1 entries
  uint32_t d_chunk;      // gate_up: D elements of x staged per pass (stride of a staged row)
  uint32_t h_chunk;      // down: H elements of hidden staged per pass (stride of a staged row)
  uint32_t reserved;     // keeps the struct a multiple of 16 bytes
};

#ifndef __METAL_VERSION__
static_assert(sizeof(SwitchGluParams) == 32, "SwitchGluParams must match the MSL layout");
}  // namespace mlx_moe::metal
#endif
