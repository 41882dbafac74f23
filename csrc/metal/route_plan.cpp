#include "metal/route_plan.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

namespace mlx_moe::metal {

RoutePlan plan_route(int64_t slots, int64_t num_experts, int64_t max_threads) {
  if (slots < 0 || slots > std::numeric_limits<uint32_t>::max() / 2) {
    throw std::invalid_argument("[route] the number of slots (T * k) is out of range for the Metal kernel");
  }
  if (num_experts < 1 || num_experts > kRouteMaxExperts) {
    throw std::invalid_argument(
        "[route] the Metal kernel takes 1 to " + std::to_string(kRouteMaxExperts) + " experts, got " +
        std::to_string(num_experts));
  }
  RoutePlan plan;
  plan.kernel = "moe_route";
  plan.grid = {1, 1, 1};
  // One thread per slot (chunks of the threadgroup beyond that), and at
  // least one per expert so the prefix sum is one block.
  const int64_t want = std::max<int64_t>(std::max<int64_t>(slots, num_experts), 1);
  if (max_threads < 32) {
    throw std::invalid_argument("[route] the Metal kernel needs at least 32 threads per threadgroup");
  }
  const int64_t cap = std::min<int64_t>(max_threads / 32 * 32, kRouteMaxThreads);
  const int64_t threads = std::min<int64_t>((want + 31) / 32 * 32, cap);
  plan.threads = {static_cast<uint32_t>(threads), 1, 1};
  uint32_t bits = 0;
  while ((int64_t(1) << bits) <= num_experts) {  // ids 0..E (E: no slot)
    ++bits;
  }
  plan.params.slots = static_cast<uint32_t>(slots);
  plan.params.num_experts = static_cast<uint32_t>(num_experts);
  plan.params.key_bits = bits;
  return plan;
}

}  // namespace mlx_moe::metal
