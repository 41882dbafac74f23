#include "metal/switch_glu_quantized_plan.h"
#include "metal/plan_common.h"

#include <algorithm>
#include <limits>
#include <stdexcept>

namespace mlx_moe::metal {

namespace {

[[noreturn]] void reject(const std::string& why) {
  throw std::invalid_argument("[switch_glu] quantized Metal kernels: " + why);
}

uint32_t to_u32(int64_t v, const char* what) {
  return metal::to_u32(v, "switch_glu", what);
}

// Elements of a reduction of length `len` (a multiple of 32) staged per pass
// for bm rows: whole 32-element blocks, at most kSwitchGluStageBytes.
int64_t stage_chunk(int64_t len, int64_t bm, int64_t type_size) {
  const int64_t budget = std::max<int64_t>(32, kSwitchGluStageBytes / (bm * type_size) / 32 * 32);
  return std::min(std::max<int64_t>(len, 32), budget);
}

}  // namespace

SwitchGluQuantizedPlan plan_switch_glu_quantized(
    int64_t tokens,
    int64_t top_k,
    int64_t max_rows_per_expert,
    int64_t D,
    int64_t H,
    int64_t num_experts,
    int group_size,
    int bits,
    const std::string& mode,
    mlx::core::Dtype dtype,
    bool scores) {
  if (dtype != mlx::core::float32 && dtype != mlx::core::float16 && dtype != mlx::core::bfloat16) {
    reject("float32, float16 or bfloat16 only");
  }
  const auto [type_name, type_size] = msl_type(dtype, "switch_glu");
  std::string variant;
  if (mode == "affine" && (bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8) &&
      (group_size == 32 || group_size == 64 || group_size == 128)) {
    variant = "b" + std::to_string(bits);
  } else if (mode == "mxfp4" && bits == 4 && group_size == 32) {
    variant = "mxfp4";
  } else {
    reject("no kernel for mode " + mode + ", bits " + std::to_string(bits) + ", group size " +
           std::to_string(group_size));
  }
  if (tokens < 0 || top_k < 1 || D < 0 || H < 0 || num_experts < 1 || max_rows_per_expert < 0) {
    reject("negative sizes, top_k < 1 or no experts");
  }
  if (D % group_size != 0 || H % group_size != 0) {
    reject("D and H must be multiples of group_size");
  }
  if (tokens > 0 && max_rows_per_expert < 1) {
    reject("max_rows_per_expert must be >= 1 when there are tokens");
  }
  const int64_t max_rows = std::min(max_rows_per_expert, tokens * top_k);
  if (scores && tokens > kSwitchGluDecodeMaxTokens) {
    reject("at most 128 tokens with scores (the down launch's per-token accumulators)");
  }
  to_u32(tokens * top_k * std::max(D, H), "tokens * top_k * max(D, H)");

  SwitchGluQuantizedPlan plan;
  plan.scores = scores;
  const int64_t bm = max_rows <= 1 ? 1 : 8;
  plan.block_rows = static_cast<uint32_t>(bm);
  plan.block_cols = kSwitchGluDecodeBlockCols;
  const int64_t d_chunk = stage_chunk(D, bm, type_size);
  const int64_t h_chunk = stage_chunk(H, bm, type_size);
  auto& p = plan.params;
  set_shape_params(p, tokens, top_k, D, H, num_experts);
  p.d_chunk = static_cast<uint32_t>(d_chunk);
  p.h_chunk = static_cast<uint32_t>(h_chunk);
  p.group_size = static_cast<uint32_t>(group_size);
  p.bits = static_cast<uint32_t>(bits);
  const std::string suffix = std::string("_") + type_name + "_" + variant + "_bm" + std::to_string(bm);
  plan_decode_launches(
      plan.gate_up, plan.down, "moe_gate_up_swiglu_quantized_decode" + suffix,
      (scores ? "moe_down_combine_quantized_decode" : "moe_down_slots_quantized_decode") + suffix, bm, d_chunk,
      h_chunk, type_size, tokens, max_rows, D, H, num_experts, scores);
  return plan;
}

}  // namespace mlx_moe::metal
