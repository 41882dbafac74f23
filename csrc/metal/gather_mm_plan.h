// The launch plan of the gather_mm Metal kernels (gather_mm.metal): which
// kernel, grid, threadgroup size, threadgroup memory and constant-buffer
// parameters for given shapes. Plain C++ with no Metal types: the Metal
// dispatch (eval_gpu) and the simulator tests (tests/test_metal_gather_mm.py,
// through _ext._plan_gather_mm) both launch exactly what this returns.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include <mlx/dtype.h>

#include "metal/gather_mm_params.h"

namespace mlx_moe::metal {

// At most this many rows per expert: the decode (GEMV) kernel, whose row
// tile BM is the next power of two (1, 2, 4, 8), so one threadgroup covers
// all of an expert's rows and reads each weight once. Beyond it the
// simdgroup_matrix kernel wins: it reuses each staged weight for BM rows.
inline constexpr int64_t kDecodeMaxRowsPerExpert = 8;
// Decode threadgroup: 8 simdgroups x 4 columns = 32 output columns.
inline constexpr uint32_t kDecodeThreads = 256;
inline constexpr uint32_t kDecodeColsPerSimdgroup = 4;  // DECODE_COLS in the .metal file
// Threadgroup memory for the staged x rows: <= 8 KiB keeps room for several
// threadgroups per core (32 KiB), so memory latency is hidden.
inline constexpr int64_t kDecodeStageBytes = 8192;
// Prefill: from this many rows per expert the wide 32 x 64 tile, below it
// the narrow 16 x 32 one (less waste on an expert's partial last tile).
inline constexpr int64_t kPrefillWideMinRows = 64;
inline constexpr uint32_t kPrefillThreads = 128;  // PREFILL_THREADS
inline constexpr uint32_t kPrefillBK = 16;        // PREFILL_BK

struct GatherMMLaunch {
  std::string kernel;                // host name, with its instantiation suffix
  bool prefill = false;              // which kernel family
  std::array<uint32_t, 3> grid{};    // threadgroups (dispatchThreadgroups); all 0: nothing to launch
  std::array<uint32_t, 3> threads{};  // threads per threadgroup
  uint32_t threadgroup_memory = 0;   // bytes of [[threadgroup(0)]] (a multiple of 16)
  uint32_t block_rows = 0;           // BM: rows of one expert per threadgroup
  uint32_t block_cols = 0;           // output columns per threadgroup
  GatherMMParams params{};           // [[buffer(4)]], sent as is
};

// rows = entries * rows_per_index (M), the rows of out; x [lhs_batches * M,
// K]; w [num_experts, N, K]; out [rows, N]; max_rows_per_expert: an upper
// bound on any expert's row count (entries * M; rows is always valid).
// lhs_batches < 0: rows / M. Buffers: x, w, offsets (uint32 [num_experts +
// 1], over entries), out, params, order (uint32 [entries]: the entry at each
// sorted position), lhs (uint32 [entries]: the x matrix of each entry).
// Throws std::invalid_argument for bad shapes or an unsupported dtype
// (float32, float16, bfloat16).
GatherMMLaunch plan_gather_mm(
    int64_t rows,
    int64_t max_rows_per_expert,
    int64_t N,
    int64_t K,
    int64_t num_experts,
    mlx::core::Dtype dtype,
    int64_t rows_per_index = 1,
    int64_t lhs_batches = -1);

}  // namespace mlx_moe::metal
