// The launch plan of the fused SwitchGLU Metal kernels (switch_glu.metal),
// decode path: two launches, gate_up (x -> hidden) then down (hidden -> out),
// each with its kernel, grid, threadgroup size, threadgroup memory and the
// shared constant-buffer parameters. Plain C++ with no Metal types: the
// Metal dispatch (eval_gpu) and the simulator tests
// (tests/test_metal_switch_glu.py, through _ext._plan_switch_glu) both launch
// exactly what this returns.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <mlx/dtype.h>

#include "metal/plan_common.h"
#include "metal/switch_glu_params.h"

namespace mlx_moe::metal {

// The decode kernels keep all of an expert's rows in one row tile of at most
// this many rows (BM = next power of two: 1, 2, 4, 8).
inline constexpr int64_t kSwitchGluDecodeMaxRowsPerExpert = 8;
// ... and the down kernel's per-token float accumulators [tokens][32] in
// threadgroup memory: at most this many tokens (16 KiB).
inline constexpr int64_t kSwitchGluDecodeMaxTokens = 128;
inline constexpr uint32_t kSwitchGluThreads = 256;      // 8 simdgroups
inline constexpr uint32_t kSwitchGluColsPerSimdgroup = 4;  // SWITCH_COLS in the .metal file
// Output columns per decode threadgroup (both launches): 8 simdgroups x 4.
inline constexpr uint32_t kSwitchGluDecodeBlockCols = kSwitchGluThreads / 32 * kSwitchGluColsPerSimdgroup;
// Staged x / hidden rows: <= 8 KiB (several threadgroups per core).
inline constexpr int64_t kSwitchGluStageBytes = 8192;
// Prefill kernels (above kSwitchGluDecodeMaxRowsPerExpert rows per expert,
// or with scores above kSwitchGluDecodeMaxTokens tokens): 32 x 32 output
// tiles of simdgroup_matrix 8x8, 4 simdgroups, K staged 16 at a time
// (SWITCH_PREFILL_* in the .metal file).
inline constexpr int64_t kSwitchGluPrefillBM = 32;
inline constexpr int64_t kSwitchGluPrefillBN = 32;
inline constexpr int64_t kSwitchGluPrefillBK = 16;
inline constexpr uint32_t kSwitchGluPrefillThreads = 128;
inline constexpr uint32_t kSwitchGluCombineThreads = 256;

// The bound on any expert's slot count the Metal dispatch plans with: the
// routing is only known on the GPU, after the launches are encoded, so the
// bound comes from shapes alone. T * k holds for any indices (an expert can
// take every slot when a token repeats an id); routers that pick k distinct
// experts per token never exceed T, which a future indirect dispatch (grid
// from the routing's counts) could exploit.
inline int64_t switch_glu_row_bound(int64_t tokens, int64_t top_k) {
  return tokens * top_k;
}

struct SwitchGluLaunch {
  std::string kernel;                  // host name
  std::array<uint32_t, 3> grid{};      // threadgroups; all 0: nothing to launch
  std::array<uint32_t, 3> threads{};   // threads per threadgroup
  std::vector<uint32_t> threadgroup_memory;  // bytes of [[threadgroup(i)]] (multiples of 16)
};

struct SwitchGluPlan {
  uint32_t block_rows = 0;   // BM
  uint32_t block_cols = 0;   // columns per threadgroup (both launches)
  bool scores = false;       // down: combine with scores (out [T, D]) or per slot (out [T * k, D])
  bool prefill = false;      // the simdgroup_matrix kernels (else decode)
  SwitchGluLaunch gate_up;   // buffers: x, gate, up, order, offsets, hidden, params
  SwitchGluLaunch down;      // buffers: hidden, down, order, offsets, out, params[, scores]
                             // (prefill with scores: out is the float32 scratch [T * k, D])
  SwitchGluLaunch combine;   // prefill with scores only (else empty kernel name, grid 0):
                             // buffers: scratch, out [T, D], params
  int64_t scratch_bytes = 0; // float32 [T * k, D] scratch (prefill with scores), else 0
  SwitchGluParams params{};  // [[buffer(6)]] of gate_up, [[buffer(5)]] of down, sent as is
};

// The shape fields of a SwitchGLU constant buffer (SwitchGluParams or
// SwitchGluQuantizedParams), each checked to fit the kernels' uint32.
template <typename Params>
void set_shape_params(Params& p, int64_t tokens, int64_t top_k, int64_t D, int64_t H, int64_t num_experts) {
  p.tokens = to_u32(tokens, "switch_glu", "tokens");
  p.top_k = to_u32(top_k, "switch_glu", "top_k");
  p.D = to_u32(D, "switch_glu", "D");
  p.H = to_u32(H, "switch_glu", "H");
  p.num_experts = to_u32(num_experts, "switch_glu", "num_experts");
}

// The two decode launches shared by the float and the quantized decode
// kernels: gate_up over (32-column tile of H, expert), down over 32-column
// tiles of D (all experts in each threadgroup); `bm` staged rows of d_chunk
// / h_chunk elements of `type_size` bytes, plus the per-token float
// accumulators of the down launch with scores. Kernel names as given.
void plan_decode_launches(
    SwitchGluLaunch& gate_up,
    SwitchGluLaunch& down,
    std::string gate_up_kernel,
    std::string down_kernel,
    int64_t bm,
    int64_t d_chunk,
    int64_t h_chunk,
    int64_t type_size,
    int64_t tokens,
    int64_t max_rows,
    int64_t D,
    int64_t H,
    int64_t num_experts,
    bool scores);

// x [tokens, D], gate/up [E, H, D], down [E, D, H], hidden [tokens * top_k, H]
// (sorted order), out [tokens, D] with scores else [tokens * top_k, D];
// max_rows_per_expert: an upper bound on any expert's slot count (at most
// kSwitchGluDecodeMaxRowsPerExpert for the decode kernels; above it, or with
// scores and more than kSwitchGluDecodeMaxTokens tokens, the prefill
// kernels). Throws std::invalid_argument for bad shapes or an unsupported
// dtype (float32, float16, bfloat16).
SwitchGluPlan plan_switch_glu(
    int64_t tokens,
    int64_t top_k,
    int64_t max_rows_per_expert,
    int64_t D,
    int64_t H,
    int64_t num_experts,
    mlx::core::Dtype dtype,
    bool scores);

}  // namespace mlx_moe::metal
