// The constant buffer of the quantized gather_mm Metal kernels
// ([[buffer(6)]] of gather_qmm.metal), defined once for both sides: the
// .metal file includes it as MSL, the launch plan (gather_qmm_plan.cpp) as
// C++, and the host sends the struct's bytes unchanged (setBytes). Only
// 32-bit unsigned fields, so MSL and C++ agree on the layout.
#pragma once

#ifndef __METAL_VERSION__
#include <cstdint>
namespace mlx_moe::metal {
#endif

struct GatherQMMParams {
  uint32_t rows;         // rows of x and out (all experts together)
  uint32_t N;            // output columns (rows of each expert's weight)
  uint32_t K;            // reduction length (unpacked), a multiple of 32 and of group_size
  uint32_t num_experts;  // E: offsets has E + 1 entries
  uint32_t k_chunk;      // K elements of x staged per pass (stride of a staged row), a multiple of 32
  uint32_t group_size;   // elements sharing one scale (and bias): 32, 64 or 128
  uint32_t bits;         // code width (informational: the kernel is specialised on it)
  uint32_t groups;       // K / group_size: scales (and biases) per weight row
  uint32_t rows_per_index;  // M: rows of x (and out) per index entry
  uint32_t lhs_batches;     // matrices of x ([lhs_batches * M, K]); an lhs id >= this reads NaN
  uint32_t reserved[2];     // keeps the struct a multiple of 16 bytes
};

#ifndef __METAL_VERSION__
static_assert(sizeof(GatherQMMParams) == 48, "GatherQMMParams must match the MSL layout");
}  // namespace mlx_moe::metal
#endif
