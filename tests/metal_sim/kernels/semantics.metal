// Small kernels that pin down the simulator's execution model (positions,
// simdgroups, divergence, threadgroup memory) and its diagnostics.
#include <metal_stdlib>
using namespace metal;

// Every thread records where it is (dispatchThreads with partial edges).
[[kernel]] void positions(
    device uint4* out [[buffer(0)]],
    constant uint2& grid [[buffer(1)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 tgid [[threadgroup_position_in_grid]],
    uint2 lid [[thread_position_in_threadgroup]],
    uint2 tg_size [[threads_per_threadgroup]],
    uint index [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  uint k = gid.y * grid.x + gid.x;
  out[3 * k + 0] = uint4(gid, tgid);
  out[3 * k + 1] = uint4(lid, tg_size);
  out[3 * k + 2] = uint4(index, lane, sg, 0);
}

// SIMD collectives, also on a partial last simdgroup and on divergent lanes.
[[kernel]] void simd_ops(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint i [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  float v = x[i];
  out[8 * i + 0] = simd_sum(v);
  out[8 * i + 1] = simd_max(v);
  out[8 * i + 2] = simd_shuffle_down(v, 1);
  out[8 * i + 3] = simd_shuffle_up(v, 2);
  out[8 * i + 4] = simd_shuffle_xor(v, 3);
  out[8 * i + 5] = simd_broadcast(v, 5);
  out[8 * i + 6] = simd_prefix_exclusive_sum(v);
  out[8 * i + 7] = lane < 8 ? simd_sum(v) : -1.0f;  // only lanes 0..7 take part
}

// Reverses each threadgroup's slice through [[threadgroup(0)]] memory.
[[kernel]] void reverse_dynamic(
    device float* x [[buffer(0)]],
    threadgroup float* tmp [[threadgroup(0)]],
    uint gid [[thread_position_in_grid]],
    uint lid [[thread_position_in_threadgroup]],
    uint n [[threads_per_threadgroup]]) {
  tmp[lid] = x[gid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  x[gid] = tmp[n - 1 - lid];
}

// Faulty on purpose: half the threadgroup waits at another barrier.
[[kernel]] void divergent_barrier(device float* out [[buffer(0)]], uint lid [[thread_position_in_threadgroup]]) {
  if (lid < 16) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[lid] = 1.0f;
}

// Faulty on purpose: threads past n return before the barrier.
[[kernel]] void exit_before_barrier(
    device float* out [[buffer(0)]],
    constant uint& n [[buffer(1)]],
    uint lid [[thread_position_in_threadgroup]]) {
  threadgroup float t[64];
  if (lid >= n) {
    return;
  }
  t[lid] = float(lid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[lid] = t[n - 1 - lid];
}

// Faulty on purpose: reads threadgroup memory nobody wrote.
[[kernel]] void uninitialized_read(device float* out [[buffer(0)]], uint lid [[thread_position_in_threadgroup]]) {
  threadgroup float t[64];
  if (lid < 32) {
    t[lid] = 1.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[lid] = t[lid];
}

// Faulty on purpose: every threadgroup writes the same element.
[[kernel]] void cross_threadgroup_write(device uint* out [[buffer(0)]], uint tgid [[threadgroup_position_in_grid]],
                                        uint lid [[thread_position_in_threadgroup]]) {
  if (lid == 0) {
    out[0] = tgid;
  }
}

// Atomics are not races.
[[kernel]] void atomic_count(device atomic_uint* counter [[buffer(0)]], uint gid [[thread_position_in_grid]]) {
  atomic_fetch_add_explicit(counter, gid, memory_order_relaxed);
}
