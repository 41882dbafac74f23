// The constant buffer of the gather_mm Metal kernels ([[buffer(4)]]),
// defined once for both sides: gather_mm.metal includes it as MSL, the
// launch plan (gather_mm_plan.cpp) as C++, and the host sends the struct's
// bytes unchanged (setBytes). Only 32-bit unsigned fields: the layout is the
// same in MSL and C++ without padding rules to agree on.
#pragma once

#ifndef __METAL_VERSION__
#include <cstdint>
namespace mlx_moe::metal {
#endif

struct GatherMMParams {
  uint32_t rows;         // rows of x and out (all experts together)
  uint32_t N;            // output columns (rows of each expert's weight)
  uint32_t K;            // reduction length
  uint32_t num_experts;  // E: offsets has E + 1 entries
  uint32_t k_chunk;      // decode: K elements of x staged per pass (stride of a staged row);
                         // prefill: the K step of the staged tiles
  uint32_t rows_per_index;  // M: rows of x (and out) per index entry
  uint32_t lhs_batches;     // matrices of x ([lhs_batches * M, K]); an lhs id >= this reads NaN
  uint32_t reserved;        // keeps the struct a multiple of 16 bytes
};

#ifndef __METAL_VERSION__
static_assert(sizeof(GatherMMParams) == 32, "GatherMMParams must match the MSL layout");
}  // namespace mlx_moe::metal
#endif
