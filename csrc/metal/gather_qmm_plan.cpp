#include "metal/gather_qmm_plan.h"
#include "metal/plan_common.h"

#include <algorithm>
#include <limits>
#include <stdexcept>

namespace mlx_moe::metal {

namespace {

constexpr const char* kOp = "gather_qmm";

uint32_t to_u32(int64_t v, const char* what) {
  return metal::to_u32(v, kOp, what);
}

// More than kQmmDecodeMaxRowsPerExpert rows per expert: the
// simdgroup_matrix kernel, 32 x 32 tiles, one 32-element block of K per step.
GatherQMMLaunch plan_prefill(
    const GatherQMMParams& params, int64_t max_rows, const char* type_name, const std::string& variant) {
  GatherQMMLaunch plan;
  plan.prefill = true;
  plan.params = params;
  plan.params.k_chunk = static_cast<uint32_t>(kQmmBlock);  // informational: the K step
  plan.block_rows = static_cast<uint32_t>(kQmmPrefillBM);
  plan.block_cols = static_cast<uint32_t>(kQmmPrefillBN);
  plan.threads = {kQmmPrefillThreads, 1, 1};
  const int64_t floats = std::max<int64_t>((kQmmPrefillBM + kQmmPrefillBN) * kQmmBlock, kQmmPrefillBM * kQmmPrefillBN);
  plan.threadgroup_memory = static_cast<uint32_t>(floats * 4);
  plan.kernel = std::string("gather_qmm_prefill_") + type_name + "_" + variant + "_bm" +
      std::to_string(kQmmPrefillBM) + "_bn" + std::to_string(kQmmPrefillBN);
  if (params.rows > 0 && max_rows > 0 && params.N > 0) {
    plan.grid = {
        static_cast<uint32_t>(ceil_div(params.N, kQmmPrefillBN)),
        params.num_experts,
        static_cast<uint32_t>(ceil_div(max_rows, kQmmPrefillBM))};
  }
  return plan;
}

}  // namespace

GatherQMMLaunch plan_gather_qmm(
    int64_t rows,
    int64_t max_rows_per_expert,
    int64_t N,
    int64_t K,
    int64_t num_experts,
    int group_size,
    int bits,
    const std::string& mode,
    mlx::core::Dtype dtype,
    int64_t rows_per_index,
    int64_t lhs_batches) {
  auto [type_name, type_size] = msl_type(dtype, kOp);
  std::string variant;
  if (mode == "affine") {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 5 && bits != 6 && bits != 8) {
      throw std::invalid_argument("[gather_qmm] affine bits must be 2, 3, 4, 5, 6 or 8");
    }
    if (group_size != 32 && group_size != 64 && group_size != 128) {
      throw std::invalid_argument("[gather_qmm] affine group_size must be 32, 64 or 128");
    }
    variant = "b" + std::to_string(bits);
  } else if (mode == "mxfp4") {
    if (bits != 4 || group_size != 32) {
      throw std::invalid_argument("[gather_qmm] mxfp4 takes bits 4 and group_size 32");
    }
    variant = "mxfp4";
  } else {
    throw std::invalid_argument("[gather_qmm] mode must be 'affine' or 'mxfp4'");
  }
  if (rows < 0 || N < 0 || K < 0 || num_experts < 1 || max_rows_per_expert < 0) {
    throw std::invalid_argument("[gather_qmm] negative sizes or no experts");
  }
  if (K % group_size != 0) {
    throw std::invalid_argument("[gather_qmm] K must be a multiple of group_size");
  }
  if (rows > 0 && max_rows_per_expert < 1) {
    throw std::invalid_argument("[gather_qmm] max_rows_per_expert must be >= 1 when there are rows");
  }
  if (rows_per_index < 1 || rows % rows_per_index != 0) {
    throw std::invalid_argument("[gather_qmm] rows must be a multiple of rows_per_index >= 1");
  }
  if (lhs_batches < 0) {
    lhs_batches = rows / rows_per_index;
  }
  // Row numbers are 32-bit in the kernel, element offsets 64-bit.
  to_u32(lhs_batches * rows_per_index, "lhs_batches * rows_per_index");
  const int64_t max_rows = std::min(max_rows_per_expert, rows);
  GatherQMMParams params{};
  params.rows = to_u32(rows, "rows");
  params.N = to_u32(N, "N");
  params.K = to_u32(K, "K");
  params.num_experts = to_u32(num_experts, "num_experts");
  params.group_size = static_cast<uint32_t>(group_size);
  params.bits = static_cast<uint32_t>(bits);
  params.groups = to_u32(K / group_size, "K / group_size");
  params.rows_per_index = to_u32(rows_per_index, "rows_per_index");
  params.lhs_batches = to_u32(lhs_batches, "lhs_batches");
  if (max_rows > kQmmDecodeMaxRowsPerExpert) {
    return plan_prefill(params, max_rows, type_name, variant);
  }

  int64_t bm = 1;
  while (bm < max_rows) bm *= 2;
  // As much of K as fits the stage, in whole 32-element blocks.
  const int64_t budget = std::max<int64_t>(kQmmBlock, kQmmStageBytes / (bm * type_size) / kQmmBlock * kQmmBlock);
  const int64_t k_chunk = std::min(std::max<int64_t>(K, kQmmBlock), budget);

  GatherQMMLaunch plan;
  plan.params = params;
  plan.params.k_chunk = static_cast<uint32_t>(k_chunk);
  plan.block_rows = static_cast<uint32_t>(bm);
  plan.block_cols = kQmmDecodeThreads / 32 * kQmmColsPerSimdgroup;
  plan.threads = {kQmmDecodeThreads, 1, 1};
  plan.threadgroup_memory = static_cast<uint32_t>(ceil_div(bm * k_chunk * type_size, 16) * 16);
  plan.kernel = std::string("gather_qmm_decode_") + type_name + "_" + variant + "_bm" + std::to_string(bm);
  if (rows > 0 && max_rows > 0 && N > 0) {
    plan.grid = {
        static_cast<uint32_t>(ceil_div(N, plan.block_cols)),
        static_cast<uint32_t>(num_experts),
        1};
  }
  return plan;
}

}  // namespace mlx_moe::metal
