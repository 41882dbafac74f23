// C = A @ B (row-major, M x K times K x N, all multiples of 16) with
// simdgroup_matrix: one threadgroup per 16x16 tile of C, four simdgroups
// (128 threads), each owning one 8x8 quarter; A and B staged through
// threadgroup memory 16 columns of K at a time.
// MSL_SIM_FAULT_NO_BARRIER: drop the barrier between staging and the MMA.
#include <metal_stdlib>
using namespace metal;

constant constexpr uint TILE = 16;

struct MatmulParams {
  uint M, N, K;
};

template <typename T>
[[kernel]] void matmul_simdgroup(
    device const T* A [[buffer(0)]],
    device const T* B [[buffer(1)]],
    device float* C [[buffer(2)]],
    constant MatmulParams& p [[buffer(3)]],
    uint2 tile [[threadgroup_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float As[TILE * TILE];
  threadgroup float Bs[TILE * TILE];
  const uint row0 = tile.y * TILE, col0 = tile.x * TILE;
  const uint sub_r = (sg / 2) * 8, sub_c = (sg % 2) * 8;
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (uint k0 = 0; k0 < p.K; k0 += TILE) {
    for (uint i = lid; i < TILE * TILE; i += 128) {
      uint r = i / TILE, c = i % TILE;
      As[i] = float(A[(row0 + r) * p.K + k0 + c]);
      Bs[i] = float(B[(k0 + r) * p.N + col0 + c]);
    }
#ifndef MSL_SIM_FAULT_NO_BARRIER
    threadgroup_barrier(mem_flags::mem_threadgroup);
#endif
    for (uint kk = 0; kk < TILE; kk += 8) {
      simdgroup_float8x8 a, b;
      simdgroup_load(a, As + sub_r * TILE + kk, TILE);
      simdgroup_load(b, Bs + kk * TILE + sub_c, TILE);
      simdgroup_multiply_accumulate(acc, a, b, acc);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  simdgroup_store(acc, C + (row0 + sub_r) * p.N + col0 + sub_c, p.N);
}

template [[host_name("matmul_simdgroup_float")]] [[kernel]] decltype(matmul_simdgroup<float>) matmul_simdgroup<float>;
template [[host_name("matmul_simdgroup_half")]] [[kernel]] decltype(matmul_simdgroup<half>) matmul_simdgroup<half>;
