// Two-level SIMD reduction: simd_sum inside each simdgroup, partial sums in
// threadgroup memory, simd_sum again in simdgroup 0. out[g] = sum of slice g.
// MSL_SIM_FAULT_WRONG_REDUCTION: a shuffle-down tree that stops one step early.
#include <metal_stdlib>
using namespace metal;

template <typename T>
[[kernel]] void simd_reduce(
    device const T* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant uint& n [[buffer(2)]],
    uint gid [[thread_position_in_grid]],
    uint tgid [[threadgroup_position_in_grid]],
    uint simd_lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint simd_groups [[simdgroups_per_threadgroup]]) {
  threadgroup float sums[32];
  float v = gid < n ? float(x[gid]) : 0.0f;
#ifdef MSL_SIM_FAULT_WRONG_REDUCTION
  for (ushort offset = 16; offset > 1; offset /= 2) {
    v += simd_shuffle_down(v, offset);
  }
#else
  v = simd_sum(v);
#endif
  if (simd_lane == 0) {
    sums[simd_group] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (simd_group == 0) {
    float s = simd_lane < simd_groups ? sums[simd_lane] : 0.0f;
    s = simd_sum(s);
    if (simd_lane == 0) {
      out[tgid] = s;
    }
  }
}

// Lane 0 of each simdgroup gets the simdgroup's sum by a shuffle-down tree.
[[kernel]] void simd_shuffle_reduce(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint gid [[thread_position_in_grid]],
    uint simd_lane [[thread_index_in_simdgroup]]) {
  float v = x[gid];
  for (ushort offset = 16; offset > 0; offset /= 2) {
    v += simd_shuffle_down(v, offset);
  }
  if (simd_lane == 0) {
    out[gid / 32] = v;
  }
}

template [[host_name("simd_reduce_float")]] [[kernel]] decltype(simd_reduce<float>) simd_reduce<float>;
template [[host_name("simd_reduce_bfloat")]] [[kernel]] decltype(simd_reduce<bfloat>) simd_reduce<bfloat>;
