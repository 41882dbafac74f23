// The launch plan of the routing Metal kernel (route.metal): kernel, grid,
// threadgroup size and the constant-buffer parameters. Plain C++ with no
// Metal types: the Metal dispatch (MoeRoute::eval_gpu) and the simulator
// tests (tests/test_metal_route.py, through _ext._plan_route) both launch
// exactly what this returns.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "metal/route_params.h"

namespace mlx_moe::metal {

inline constexpr int64_t kRouteMaxExperts = 512;   // ROUTE_MAX_EXPERTS in the .metal file
inline constexpr uint32_t kRouteMaxThreads = 1024;

struct RoutePlan {
  std::string kernel;                 // host name
  std::array<uint32_t, 3> grid{};     // threadgroups: (1, 1, 1); always launched (writes offsets and error)
  std::array<uint32_t, 3> threads{};  // a multiple of 32, <= 1024
  RouteParams params{};               // [[buffer(5)]], sent as is
};

// slots = T * k (indices flattened, uint32), num_experts = E in 1..512;
// max_threads: the pipeline's maxTotalThreadsPerThreadgroup on a Mac (the
// kernel takes any multiple of 32). Buffers: indices, order [slots],
// offsets [E + 1], sorted_experts [slots], error [1] (uint32), params.
RoutePlan plan_route(int64_t slots, int64_t num_experts, int64_t max_threads = kRouteMaxThreads);

}  // namespace mlx_moe::metal
