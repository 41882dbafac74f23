// Routing on Apple GPUs (MoeRoute): a STABLE counting sort of the T * k slots
// (s = t * k + j) of indices [T, k] (uint32 expert ids) by expert, as
// csrc/cpu/routing.h does on the CPU:
//   order [T * k]          the slots sorted by expert, slots of one expert in
//                          increasing slot order
//   offsets [E + 1]        expert e owns order[offsets[e] .. offsets[e + 1])
//   sorted_experts [T * k] the expert of each sorted position
//   error [1]              0, or 1 if some id is >= E: then every offset is 0
//                          (an empty routing: later kernels read nothing;
//                          order / sorted_experts are left untouched) and the
//                          host raises.
//
// One threadgroup (grid (1, 1, 1)), threads a multiple of 32, <= 1024, from
// plan_route (route_plan.cpp). E <= ROUTE_MAX_EXPERTS.
//   1. zero the threadgroup histogram (E atomic counters) and the error flag;
//   2. count with threadgroup atomics (an id >= E raises the flag);
//   3. exclusive prefix sum of the counts (simd_prefix_exclusive_sum per
//      simdgroup, then over the simdgroup totals; blocks of `threads` experts
//      with a carry) into offsets and into `next`, the running first free
//      position of each expert;
//   4. stable scatter, chunks of `threads` consecutive slots: within a
//      simdgroup a slot's rank among the lanes with the same expert comes from
//      ballots over the bits of the id (match mask, popcount of the lower
//      lanes); the simdgroups of a chunk then take their turn in index order
//      (one barrier per turn): the highest lane of each expert reads next[e]
//      and shares it by simd_shuffle, every lane writes position next[e] +
//      rank, and that highest lane advances next[e] by the count. Chunks go in
//      slot order, so positions within an expert follow slot order.
//
// Fault toggle (tests only; must make the simulator tests fail):
//   ROUTE_FAULT_NO_TURN_BARRIER   no barrier between the simdgroups' turns
#include <metal_stdlib>

#include "route_params.h"

using namespace metal;

constant constexpr uint ROUTE_MAX_EXPERTS = 512;
constant constexpr uint ROUTE_SIMD = 32;

// Buffers: 0 indices, 1 order, 2 offsets, 3 sorted_experts, 4 error, 5 params.
[[kernel]] void moe_route(
    device const uint* indices [[buffer(0)]],
    device uint* order [[buffer(1)]],
    device uint* offsets [[buffer(2)]],
    device uint* sorted_experts [[buffer(3)]],
    device uint* error [[buffer(4)]],
    constant RouteParams& p [[buffer(5)]],
    uint tid [[thread_index_in_threadgroup]],
    uint ntid [[threads_per_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  threadgroup atomic_uint counts[ROUTE_MAX_EXPERTS];
  threadgroup uint next[ROUTE_MAX_EXPERTS];
  threadgroup uint sg_base[ROUTE_SIMD];
  threadgroup uint block_total[1];
  threadgroup atomic_uint bad[1];

  const uint E = p.num_experts;
  const uint slots = p.slots;

  // 1. zero
  for (uint e = tid; e < E; e += ntid) {
    atomic_store_explicit(&counts[e], 0u, memory_order_relaxed);
  }
  if (tid == 0) {
    atomic_store_explicit(&bad[0], 0u, memory_order_relaxed);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // 2. count
  for (uint s = tid; s < slots; s += ntid) {
    const uint e = indices[s];
    if (e < E) {
      atomic_fetch_add_explicit(&counts[e], 1u, memory_order_relaxed);
    } else {
      atomic_store_explicit(&bad[0], 1u, memory_order_relaxed);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  if (atomic_load_explicit(&bad[0], memory_order_relaxed) != 0) {  // uniform
    for (uint e = tid; e <= E; e += ntid) {
      offsets[e] = 0;
    }
    if (tid == 0) {
      error[0] = 1;
    }
    return;  // every thread leaves: no barrier follows for anyone
  }
  if (tid == 0) {
    error[0] = 0;
  }

  // 3. exclusive prefix sum, blocks of ntid experts
  uint carry = 0;
  for (uint e0 = 0; e0 < E; e0 += ntid) {
    const uint e = e0 + tid;
    const uint c = e < E ? atomic_load_explicit(&counts[e], memory_order_relaxed) : 0u;
    const uint incl = simd_prefix_inclusive_sum(c);
    if (lane == ROUTE_SIMD - 1) {
      sg_base[sg] = incl;  // this simdgroup's total
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg == 0) {
      const uint t = lane < nsg ? sg_base[lane] : 0u;
      const uint t_excl = simd_prefix_exclusive_sum(t);
      const uint total = simd_sum(t);
      simdgroup_barrier(mem_flags::mem_threadgroup);
      if (lane < nsg) {
        sg_base[lane] = t_excl;
      }
      if (lane == 0) {
        block_total[0] = total;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (e < E) {
      const uint excl = carry + sg_base[sg] + incl - c;
      offsets[e] = excl;
      next[e] = excl;
    }
    carry += block_total[0];
    threadgroup_barrier(mem_flags::mem_threadgroup);  // sg_base / block_total reused
  }
  if (tid == 0) {
    offsets[E] = carry;  // == slots
  }

  // 4. stable scatter (next[] is visible: the last barrier of step 3)
  for (uint c0 = 0; c0 < slots; c0 += ntid) {
    const uint s = c0 + tid;
    const bool valid = s < slots;
    const uint key = valid ? indices[s] : E;  // E: no slot
    ulong peers = static_cast<ulong>(static_cast<simd_vote::vote_t>(simd_ballot(true)));
    for (uint b = 0; b < p.key_bits; ++b) {
      const bool bit = ((key >> b) & 1u) != 0;
      const ulong v = static_cast<ulong>(static_cast<simd_vote::vote_t>(simd_ballot(bit)));
      peers &= bit ? v : ~v;
    }
    const ulong below = (ulong(1) << lane) - 1;
    const uint rank = uint(popcount(peers & below));
    const uint count = uint(popcount(peers));
    const uint leader = 31 - clz(uint(peers));  // highest lane of this expert
    const bool last = leader == lane;
    // simdgroups of this chunk that hold slots (uniform)
    const uint turns = min(nsg, (slots - c0 + ROUTE_SIMD - 1) / ROUTE_SIMD);
    for (uint turn = 0; turn < turns; ++turn) {
      if (sg == turn) {
        // only the highest lane of each expert touches next[key]; the others
        // get its value by a shuffle (no threadgroup access to order)
        const uint mine = (valid && last) ? next[key] : 0u;
        const uint base = simd_shuffle(mine, leader);
        if (valid) {
          order[base + rank] = s;
          sorted_experts[base + rank] = key;
          if (last) {
            next[key] = base + count;
          }
        }
      }
#ifndef ROUTE_FAULT_NO_TURN_BARRIER
      threadgroup_barrier(mem_flags::mem_threadgroup);
#endif
    }
  }
}
