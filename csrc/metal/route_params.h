// The constant buffer of the routing Metal kernel (route.metal), defined once
// for both sides: the .metal file includes it as MSL, the launch plan
// (route_plan.cpp) as C++; the host sends the struct's bytes unchanged.
// Only 32-bit unsigned fields (same layout in MSL and C++).
#pragma once

#ifndef __METAL_VERSION__
#include <cstdint>
namespace mlx_moe::metal {
#endif

struct RouteParams {
  uint32_t slots;        // T * k: entries of indices, order and sorted_experts
  uint32_t num_experts;  // E (<= 512): offsets has E + 1 entries
  uint32_t key_bits;     // bits of E (ids 0..E, E standing for "no slot"), for the ballot match
  uint32_t reserved;     // keeps the struct 16 bytes
};

#ifndef __METAL_VERSION__
static_assert(sizeof(RouteParams) == 16, "RouteParams must match the MSL layout");
}  // namespace mlx_moe::metal
#endif
