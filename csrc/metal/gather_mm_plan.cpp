#include "metal/gather_mm_plan.h"
#include "metal/plan_common.h"

#include <algorithm>
#include <limits>
#include <stdexcept>

namespace mlx_moe::metal {

namespace {

constexpr const char* kOp = "gather_mm";

uint32_t to_u32(int64_t v, const char* what) {
  return metal::to_u32(v, kOp, what);
}

}  // namespace

GatherMMLaunch plan_gather_mm(
    int64_t rows,
    int64_t max_rows_per_expert,
    int64_t N,
    int64_t K,
    int64_t num_experts,
    mlx::core::Dtype dtype,
    int64_t rows_per_index,
    int64_t lhs_batches) {
  auto [type_name, type_size] = msl_type(dtype, kOp);
  if (rows < 0 || N < 0 || K < 0 || num_experts < 1 || max_rows_per_expert < 0) {
    throw std::invalid_argument("[gather_mm] negative sizes or no experts");
  }
  if (rows_per_index < 1 || rows % rows_per_index != 0) {
    throw std::invalid_argument("[gather_mm] rows must be a multiple of rows_per_index >= 1");
  }
  if (lhs_batches < 0) {
    lhs_batches = rows / rows_per_index;
  }
  // Row numbers are 32-bit in the kernels, element offsets 64-bit.
  to_u32(lhs_batches * rows_per_index, "lhs_batches * rows_per_index");
  if (rows > 0 && max_rows_per_expert < 1) {
    throw std::invalid_argument("[gather_mm] max_rows_per_expert must be >= 1 when there are rows");
  }
  const int64_t max_rows = std::min(max_rows_per_expert, rows);

  GatherMMLaunch plan;
  plan.params.rows = to_u32(rows, "rows");
  plan.params.N = to_u32(N, "N");
  plan.params.K = to_u32(K, "K");
  plan.params.num_experts = to_u32(num_experts, "num_experts");
  plan.params.rows_per_index = to_u32(rows_per_index, "rows_per_index");
  plan.params.lhs_batches = to_u32(lhs_batches, "lhs_batches");
  plan.prefill = max_rows > kDecodeMaxRowsPerExpert;

  if (!plan.prefill) {
    int64_t bm = 1;
    while (bm < max_rows) bm *= 2;
    const int64_t vec = 16 / type_size;  // elements per 16-byte load
    // As much of K as fits the stage budget, in whole vectors.
    const int64_t budget = std::max<int64_t>(vec, kDecodeStageBytes / (bm * type_size) / vec * vec);
    const int64_t k_chunk = std::min(ceil_div(std::max<int64_t>(K, 1), vec) * vec, budget);
    plan.block_rows = static_cast<uint32_t>(bm);
    plan.block_cols = kDecodeThreads / 32 * kDecodeColsPerSimdgroup;
    plan.threads = {kDecodeThreads, 1, 1};
    plan.threadgroup_memory = static_cast<uint32_t>(ceil_div(bm * k_chunk * type_size, 16) * 16);
    plan.params.k_chunk = static_cast<uint32_t>(k_chunk);
    plan.kernel = std::string("gather_mm_decode_") + type_name + "_bm" + std::to_string(bm);
  } else {
    const bool wide = max_rows >= kPrefillWideMinRows;
    plan.block_rows = wide ? 32 : 16;
    plan.block_cols = wide ? 64 : 32;
    plan.threads = {kPrefillThreads, 1, 1};
    const int64_t floats = std::max<int64_t>(
        (plan.block_rows + plan.block_cols) * kPrefillBK, plan.block_rows * plan.block_cols);
    plan.threadgroup_memory = static_cast<uint32_t>(floats * 4);
    plan.params.k_chunk = kPrefillBK;
    plan.kernel = std::string("gather_mm_prefill_") + type_name + "_bm" + std::to_string(plan.block_rows) +
        "_bn" + std::to_string(plan.block_cols);
  }
  if (rows > 0 && max_rows > 0 && N > 0) {
    plan.grid = {
        static_cast<uint32_t>(ceil_div(N, plan.block_cols)),
        static_cast<uint32_t>(num_experts),
        static_cast<uint32_t>(ceil_div(max_rows, plan.block_rows))};
  }
  return plan;
}

}  // namespace mlx_moe::metal
