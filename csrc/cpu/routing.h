// Grouping of (row, expert) pairs by expert with a counting sort: one pass to
// count, a prefix sum, one pass to scatter. O(pairs + experts), stable (pairs
// keep their order inside a group, so sorted input comes out unchanged), and
// no comparison sort. Shared by every CPU kernel that dispatches to experts.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace mlx_moe::cpu {

struct ExpertGroups {
  // Pairs of group g: pair_order[group_begin[g] .. group_begin[g + 1]).
  std::vector<uint32_t> pair_order;
  std::vector<int64_t> group_begin;
  // The expert (matrix index) of each group. Only experts with at least one
  // pair get a group.
  std::vector<uint32_t> group_expert;

  int64_t num_groups() const {
    return static_cast<int64_t>(group_expert.size());
  }
};

// The counting sort itself: writes order[num_pairs] (pairs sorted by expert,
// stable) and offsets[num_experts + 1] (expert e's pairs are
// order[offsets[e] .. offsets[e + 1]), empty experts included).
// expert_of_pair[p] must be < num_experts for every p (checked by the
// caller, which knows the argument's name for the error message).
template <typename Offset>
void sort_by_expert(
    const uint32_t* expert_of_pair,
    int64_t num_pairs,
    int64_t num_experts,
    uint32_t* order,
    Offset* offsets) {
  std::fill(offsets, offsets + num_experts + 1, Offset(0));
  for (int64_t p = 0; p < num_pairs; ++p) {
    ++offsets[expert_of_pair[p] + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) {
    offsets[e + 1] += offsets[e];
  }
  std::vector<Offset> next(offsets, offsets + num_experts);
  for (int64_t p = 0; p < num_pairs; ++p) {
    order[next[expert_of_pair[p]]++] = static_cast<uint32_t>(p);
  }
}

// The groups of the experts that have pairs (see ExpertGroups).
inline ExpertGroups group_by_expert(
    const uint32_t* expert_of_pair,
    int64_t num_pairs,
    int64_t num_experts) {
  ExpertGroups groups;
  groups.pair_order.resize(num_pairs);
  std::vector<int64_t> offsets(num_experts + 1);
  sort_by_expert(expert_of_pair, num_pairs, num_experts, groups.pair_order.data(), offsets.data());
  for (int64_t e = 0; e < num_experts; ++e) {
    if (offsets[e + 1] > offsets[e]) {
      groups.group_expert.push_back(static_cast<uint32_t>(e));
      groups.group_begin.push_back(offsets[e]);
    }
  }
  groups.group_begin.push_back(num_pairs);
  return groups;
}

} // namespace mlx_moe::cpu
