#include "metal/switch_glu_plan.h"
#include "metal/plan_common.h"

#include <algorithm>
#include <limits>
#include <stdexcept>

namespace mlx_moe::metal {

namespace {

constexpr const char* kOp = "switch_glu";

uint32_t to_u32(int64_t v, const char* what) {
  return metal::to_u32(v, kOp, what);
}

// Elements of a reduction of length `len` staged per pass for bm rows:
// whole 16-byte vectors, at most kSwitchGluStageBytes in all.
int64_t stage_chunk(int64_t len, int64_t bm, int64_t type_size) {
  const int64_t vec = 16 / type_size;
  const int64_t budget = std::max<int64_t>(vec, kSwitchGluStageBytes / (bm * type_size) / vec * vec);
  return std::min(ceil_div(std::max<int64_t>(len, 1), vec) * vec, budget);
}

// The simdgroup_matrix kernels: 32 x 32 output tiles, one threadgroup per
// (column tile, expert, row tile); with scores a float32 scratch and the
// combine launch.
SwitchGluPlan plan_prefill(
    int64_t tokens,
    int64_t top_k,
    int64_t max_rows,
    int64_t D,
    int64_t H,
    int64_t num_experts,
    const char* type_name,
    bool scores) {
  constexpr int64_t BM = kSwitchGluPrefillBM, BN = kSwitchGluPrefillBN, BK = kSwitchGluPrefillBK;
  SwitchGluPlan plan;
  plan.scores = scores;
  plan.prefill = true;
  plan.block_rows = static_cast<uint32_t>(BM);
  plan.block_cols = static_cast<uint32_t>(BN);
  auto& p = plan.params;
  set_shape_params(p, tokens, top_k, D, H, num_experts);
  p.d_chunk = static_cast<uint32_t>(BK);  // informational: the kernels stage BK per pass
  p.h_chunk = static_cast<uint32_t>(BK);

  const std::string suffix = std::string("_") + type_name + "_bm" + std::to_string(BM) + "_bn" + std::to_string(BN);
  plan.gate_up.kernel = "moe_gate_up_swiglu_prefill" + suffix;
  plan.gate_up.threads = {kSwitchGluPrefillThreads, 1, 1};
  // float: xs [BM][BK] + gs, us [BN][BK] in the K loop; g, u [BM][BN] after it.
  plan.gate_up.threadgroup_memory = {
      static_cast<uint32_t>(round16(std::max(BM * BK + 2 * BN * BK, 2 * BM * BN) * 4))};
  plan.down.kernel = (scores ? "moe_down_scaled_prefill" : "moe_down_slots_prefill") + suffix;
  plan.down.threads = {kSwitchGluPrefillThreads, 1, 1};
  plan.down.threadgroup_memory = {static_cast<uint32_t>(round16(std::max(BM * BK + BN * BK, BM * BN) * 4))};
  if (scores) {
    plan.combine.kernel = std::string("moe_combine_slots_") + type_name;
    plan.combine.threads = {kSwitchGluCombineThreads, 1, 1};
    plan.scratch_bytes = tokens * top_k * D * 4;
    to_u32(tokens * D, "tokens * D");
  }
  if (tokens > 0 && max_rows > 0) {
    const auto row_tiles = static_cast<uint32_t>(ceil_div(max_rows, BM));
    const auto experts = static_cast<uint32_t>(num_experts);
    if (H > 0) {
      plan.gate_up.grid = {static_cast<uint32_t>(ceil_div(H, BN)), experts, row_tiles};
    }
    if (D > 0) {
      plan.down.grid = {static_cast<uint32_t>(ceil_div(D, BN)), experts, row_tiles};
      if (scores) {
        plan.combine.grid = {static_cast<uint32_t>(ceil_div(tokens * D, kSwitchGluCombineThreads)), 1, 1};
      }
    }
  }
  return plan;
}

}  // namespace

SwitchGluPlan plan_switch_glu(
    int64_t tokens,
    int64_t top_k,
    int64_t max_rows_per_expert,
    int64_t D,
    int64_t H,
    int64_t num_experts,
    mlx::core::Dtype dtype,
    bool scores) {
  auto [type_name, type_size] = msl_type(dtype, kOp);
  if (tokens < 0 || top_k < 1 || D < 0 || H < 0 || num_experts < 1 || max_rows_per_expert < 0) {
    throw std::invalid_argument("[switch_glu] negative sizes, top_k < 1 or no experts");
  }
  if (tokens > 0 && max_rows_per_expert < 1) {
    throw std::invalid_argument("[switch_glu] max_rows_per_expert must be >= 1 when there are tokens");
  }
  const int64_t max_rows = std::min(max_rows_per_expert, tokens * top_k);
  to_u32(tokens * top_k * std::max(D, H), "tokens * top_k * max(D, H)");
  to_u32(num_experts * H * D, "num_experts * H * D");
  if (max_rows > kSwitchGluDecodeMaxRowsPerExpert || (scores && tokens > kSwitchGluDecodeMaxTokens)) {
    return plan_prefill(tokens, top_k, max_rows, D, H, num_experts, type_name, scores);
  }

  SwitchGluPlan plan;
  plan.scores = scores;
  int64_t bm = 1;
  while (bm < max_rows) bm *= 2;
  plan.block_rows = static_cast<uint32_t>(bm);
  plan.block_cols = kSwitchGluDecodeBlockCols;

  const int64_t d_chunk = stage_chunk(D, bm, type_size);
  const int64_t h_chunk = stage_chunk(H, bm, type_size);
  auto& p = plan.params;
  set_shape_params(p, tokens, top_k, D, H, num_experts);
  p.d_chunk = static_cast<uint32_t>(d_chunk);
  p.h_chunk = static_cast<uint32_t>(h_chunk);

  const std::string suffix = std::string("_") + type_name + "_bm" + std::to_string(bm);
  plan_decode_launches(
      plan.gate_up, plan.down, "moe_gate_up_swiglu_decode" + suffix,
      (scores ? "moe_down_combine_decode" : "moe_down_slots_decode") + suffix, bm, d_chunk, h_chunk, type_size,
      tokens, max_rows, D, H, num_experts, scores);
  return plan;
}

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
    bool scores) {
  constexpr int64_t block_cols = kSwitchGluDecodeBlockCols;
  gate_up.kernel = std::move(gate_up_kernel);
  gate_up.threads = {kSwitchGluThreads, 1, 1};
  gate_up.threadgroup_memory = {static_cast<uint32_t>(round16(bm * d_chunk * type_size))};
  down.kernel = std::move(down_kernel);
  down.threads = {kSwitchGluThreads, 1, 1};
  down.threadgroup_memory = {static_cast<uint32_t>(round16(bm * h_chunk * type_size))};
  if (scores) {
    down.threadgroup_memory.push_back(static_cast<uint32_t>(round16(std::max<int64_t>(tokens, 1) * block_cols * 4)));
  }
  if (tokens > 0 && max_rows > 0) {
    if (H > 0) {
      gate_up.grid = {static_cast<uint32_t>(ceil_div(H, block_cols)), static_cast<uint32_t>(num_experts), 1};
    }
    if (D > 0) {
      down.grid = {static_cast<uint32_t>(ceil_div(D, block_cols)), 1, 1};
    }
  }
}

}  // namespace mlx_moe::metal
