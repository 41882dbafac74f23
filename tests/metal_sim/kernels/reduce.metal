// Threadgroup tree reduction: out[g] = sum of x over threadgroup g's slice.
// Fault toggles (the negative tests compile these in):
//   MSL_SIM_FAULT_NO_BARRIER: drop the barrier inside the tree loop;
//   MSL_SIM_FAULT_OFF_BY_ONE: read one element past the partner slot.
#include <metal_stdlib>
using namespace metal;

#ifndef MSL_SIM_FAULT_OFF_BY_ONE
#define MSL_SIM_FAULT_OFF_BY_ONE 0
#endif

template <typename T>
[[kernel]] void reduce_sum(
    device const T* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant uint& n [[buffer(2)]],
    uint gid [[thread_position_in_grid]],
    uint lid [[thread_position_in_threadgroup]],
    uint tgid [[threadgroup_position_in_grid]],
    uint tg_size [[threads_per_threadgroup]]) {
  threadgroup float partial[256];
  partial[lid] = gid < n ? float(x[gid]) : 0.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint stride = tg_size / 2; stride > 0; stride /= 2) {
    if (lid < stride) {
      partial[lid] += partial[lid + stride + MSL_SIM_FAULT_OFF_BY_ONE];
    }
#ifndef MSL_SIM_FAULT_NO_BARRIER
    threadgroup_barrier(mem_flags::mem_threadgroup);
#endif
  }
  if (lid == 0) {
    out[tgid] = partial[0];
  }
}

template [[host_name("reduce_sum_float")]] [[kernel]] decltype(reduce_sum<float>) reduce_sum<float>;
template [[host_name("reduce_sum_half")]] [[kernel]] decltype(reduce_sum<half>) reduce_sum<half>;
