// The launch plan of the quantized gather_mm Metal kernels, decode and
// prefill (gather_qmm.metal): kernel, grid, threadgroup size, threadgroup memory and
// constant-buffer parameters. Plain C++ with no Metal types: the Metal
// dispatch (GatherQMM::eval_gpu) and the simulator tests (tests/test_metal_gather_qmm.py,
// through _ext._plan_gather_qmm) launch exactly what this returns.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include <mlx/dtype.h>

#include "metal/gather_qmm_params.h"

namespace mlx_moe::metal {

// The decode kernel covers at most this many rows per expert (row tile BM =
// next power of two: 1, 2, 4, 8); beyond it the prefill kernel
// (simdgroup_matrix, kQmmPrefillBM x kQmmPrefillBN output tiles).
inline constexpr int64_t kQmmDecodeMaxRowsPerExpert = 8;
inline constexpr int64_t kQmmPrefillBM = 32;
inline constexpr int64_t kQmmPrefillBN = 32;
inline constexpr uint32_t kQmmPrefillThreads = 128;  // QMM_PREFILL_THREADS
// 8 simdgroups x 4 columns = 32 output columns per threadgroup.
inline constexpr uint32_t kQmmDecodeThreads = 256;
inline constexpr uint32_t kQmmColsPerSimdgroup = 4;  // QMM_COLS
inline constexpr int64_t kQmmBlock = 32;             // QMM_BLOCK: K elements per lane per step
// Staged x rows: up to 16 KiB, so a simdgroup's 32 lanes x 32 elements
// (1024 of K) fit for 16-bit x up to BM = 8 (float x at BM = 8 gets 512).
inline constexpr int64_t kQmmStageBytes = 16384;

struct GatherQMMLaunch {
  std::string kernel;                 // host name, with its instantiation suffix
  bool prefill = false;               // the simdgroup_matrix kernel (else decode)
  std::array<uint32_t, 3> grid{};     // threadgroups; all 0: nothing to launch
  std::array<uint32_t, 3> threads{};  // threads per threadgroup
  uint32_t threadgroup_memory = 0;    // bytes of [[threadgroup(0)]] (a multiple of 16)
  uint32_t block_rows = 0;            // BM
  uint32_t block_cols = 0;            // output columns per threadgroup
  GatherQMMParams params{};           // [[buffer(6)]], sent as is
};

// rows = entries * rows_per_index (M), the rows of out; x [lhs_batches * M,
// K] (lhs_batches < 0: rows / M); packed w [num_experts, N, K * bits / 32]
// uint32, scales/biases [num_experts, N, K / group_size], out [rows, N].
// Buffers: x, w, scales, biases, offsets (over entries), out, params, order,
// lhs (as gather_mm_plan.h). mode: "affine" (bits 2, 3, 4, 5, 6, 8;
// group_size 32, 64, 128) or "mxfp4" (bits 4, group_size 32). K must be a
// multiple of group_size. Throws std::invalid_argument otherwise or for an unsupported dtype (float32,
// float16, bfloat16).
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
    int64_t rows_per_index = 1,
    int64_t lhs_batches = -1);

}  // namespace mlx_moe::metal
