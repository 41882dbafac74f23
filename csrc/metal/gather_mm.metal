// gather_mm on Apple GPUs, in mlx-lm's SwitchLinear layout:
//
//   out[i * M + m, :] = x[lhs[i] * M + m, :] @ w[rhs[i]]^T
//
// x [lhs_batches * M, K], w [E, N, K], out [entries * M, N], for every index
// entry i (M rows each: mx.gather_mm's a [..., M, K]). The kernels see the
// entries grouped by expert, through the routing (route.metal): order[p] is
// the entry at sorted position p, and expert e owns sorted positions
// offsets[e] .. offsets[e + 1] (E + 1 uint32), so its rows are the sorted
// rows offsets[e] * M .. offsets[e + 1] * M; sorted row r is row r % M of
// entry order[r / M]. An lhs id >= lhs_batches reads NaN (never out of
// bounds); an entry in no expert's range is not written (the dispatch
// fills out with NaN first). float32 / float16 / bfloat16 in and out,
// float32 accumulation.
// The launch (kernel, grid, threadgroup size, threadgroup memory, params) is
// chosen by plan_gather_mm (gather_mm_plan.cpp), shared with the tests that
// run this file in the Metal-on-CPU simulator (tests/metal_sim/).
//
// Why two kernels
// ---------------
// * Decode (a few rows per expert, e.g. one token routed to top-k experts):
//   the work is a handful of GEMVs and is bound by reading the expert
//   weights: N * K * sizeof(T) bytes per active expert (each weight is read
//   exactly once when one threadgroup's row tile covers all the expert's
//   rows), against K * sizeof(T) per row of x and N * sizeof(T) of out. To
//   keep every GPU core streaming, the grid is (column tiles, experts, row
//   tiles): with N = 768..2048 that is 24..64 threadgroups of 256 threads
//   per active expert, many more than there are cores. Each simdgroup owns
//   DECODE_COLS output columns; a lane reads 16 bytes of each column's
//   weight row per step (4 floats or 8 halfs: one vector load, consecutive
//   lanes consecutive addresses, so a simdgroup reads 512 contiguous bytes
//   per column per step), multiplies them with the staged x rows and keeps
//   float partial sums; simd_sum reduces the 32 lanes at the end. The
//   expert's x rows are copied once into threadgroup memory (a barrier
//   later all simdgroups read them from there instead of from device
//   memory), K_chunk elements at a time; the plan keeps that staging at
//   <= 8 KiB so several threadgroups fit in a core's 32 KiB (occupancy
//   hides memory latency). Experts with no rows leave at once (the whole
//   threadgroup returns before any barrier).
// * Prefill (many rows per expert): the same weights are reused by many
//   rows, so the kernel is compute bound and uses simdgroup_matrix 8x8
//   multiply-accumulate (float). A threadgroup of 4 simdgroups (2 x 2) owns a
//   BM x BN tile of one expert's output; per K step of BK = 16 it stages the
//   x tile [BM][BK] and the weight tile [BN][BK] (converted to float, zeros
//   outside the matrix) in threadgroup memory, a barrier, then each
//   simdgroup multiplies its (BM/2) x (BN/2) part; the weight tile is read
//   transposed by simdgroup_load (transpose_matrix), so the device reads
//   stay contiguous along K. Each weight byte is read once per row tile:
//   bytes per row = N * K * sizeof(T) / BM. BM x BN = 16 x 32 ("narrow",
//   < 64 rows per expert) or 32 x 64 ("wide"): wider tiles reuse more but
//   waste more of a ragged expert's last tile. The output tile goes through
//   threadgroup memory for the guarded store of partial tiles.
//
// Only Metal 3 features available on M1 and later: simdgroup functions,
// simdgroup_matrix, and `bfloat` (MSL 3.1).
//
// Fault toggles (tests only; each must make the simulator tests fail):
//   GATHER_MM_FAULT_NO_X_BARRIER     decode: no barrier after staging x
//   GATHER_MM_FAULT_K_SHIFT          decode: x staged from column k + 1
//   GATHER_MM_FAULT_WRONG_REDUCTION  decode: lane 0's partial sum, no simd_sum
//   GATHER_MM_FAULT_TILE_BOUND       prefill: stores one row past the tile's rows
//   GATHER_MM_FAULT_PREFILL_NO_BARRIER prefill: no barrier after staging tiles
#include <metal_stdlib>

#include "gather_mm_params.h"

using namespace metal;

constant constexpr uint SIMD_WIDTH = 32;
constant constexpr uint DECODE_COLS = 4;  // output columns per simdgroup (decode)
constant constexpr uint PREFILL_BK = 16;  // K step of the prefill tiles
constant constexpr uint PREFILL_THREADS = 128;  // 4 simdgroups, 2 x 2

// ------------------------------------------------------------- 16 bytes
// 16 bytes of T as four 32-bit words; dot products of two such words in
// float (one float, or two 16-bit floats per word).
template <typename T>
struct Word {
  static inline float dot(uint a, uint b) {
    vec<T, 2> u = as_type<vec<T, 2>>(a);
    vec<T, 2> v = as_type<vec<T, 2>>(b);
    return fma(float(u.x), float(v.x), float(u.y) * float(v.y));
  }
};
template <>
struct Word<float> {
  static inline float dot(uint a, uint b) {
    return as_type<float>(a) * as_type<float>(b);
  }
};

template <typename T>
inline float dot16(uint4 a, uint4 b) {
  return (Word<T>::dot(a.x, b.x) + Word<T>::dot(a.y, b.y)) +
      (Word<T>::dot(a.z, b.z) + Word<T>::dot(a.w, b.w));
}

// ---------------------------------------------------------- row mapping
// Sorted row r (expert-grouped, M rows per entry): element k of its x row
// (NaN for an lhs id out of range), and its output row.
template <typename T>
inline T gathered_x(device const T* x, device const uint* order, device const uint* lhs,
                    constant GatherMMParams& p, uint r, uint k) {
  const uint M = p.rows_per_index;
  const uint batch = lhs[order[r / M]];
  return batch < p.lhs_batches ? x[(ulong(batch) * M + r % M) * p.K + k] : T(NAN);
}

inline ulong output_row(device const uint* order, constant GatherMMParams& p, uint r) {
  const uint M = p.rows_per_index;
  return ulong(order[r / M]) * M + r % M;
}

// --------------------------------------------------------------- decode
// Grid: (ceil(N / (simdgroups * DECODE_COLS)), E, ceil(max rows / BM)).
// Threadgroup (t, e, z): sorted rows offsets[e] * M + z * BM ... (at most
// BM), columns of column tile t. xs: [BM][k_chunk] of T (threadgroup(0)).
// Buffers: 0 x, 1 w, 2 offsets, 3 out, 4 params, 5 order, 6 lhs.
template <typename T, int BM>
[[kernel]] void gather_mm_decode(
    device const T* x [[buffer(0)]],
    device const T* w [[buffer(1)]],
    device const uint* offsets [[buffer(2)]],
    device T* out [[buffer(3)]],
    constant GatherMMParams& p [[buffer(4)]],
    device const uint* order [[buffer(5)]],
    device const uint* lhs [[buffer(6)]],
    threadgroup T* xs [[threadgroup(0)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint ntid [[threads_per_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr uint V = 16 / sizeof(T);  // elements per 16-byte load
  const uint e = tg.y;
  const uint row0 = offsets[e] * p.rows_per_index + tg.z * BM;
  const uint row_end = offsets[e + 1] * p.rows_per_index;
  if (row0 >= row_end) {
    return;  // no rows for this expert (or row tile): the whole threadgroup leaves
  }
  const uint nrows = min(uint(BM), row_end - row0);
  const uint n0 = (tg.x * nsg + sg) * DECODE_COLS;  // this simdgroup's first column
  const bool active = n0 < p.N;                     // uniform per simdgroup
  // Aligned rows (K a multiple of V) take 16-byte loads; otherwise every
  // weight row starts at a different alignment and the scalar path runs.
  const bool vector_k = (p.K % V) == 0;
  const uint stride = p.k_chunk;

  // Weight rows of this simdgroup's columns; columns past N read row N - 1
  // (valid memory, result never stored) so the loop stays branch-free.
  device const T* wrow[DECODE_COLS];
  for (uint c = 0; c < DECODE_COLS; ++c) {
    wrow[c] = w + (ulong(e) * p.N + min(n0 + c, p.N - 1)) * p.K;
  }

  float acc[BM][DECODE_COLS];
  for (int m = 0; m < BM; ++m) {
    for (uint c = 0; c < DECODE_COLS; ++c) {
      acc[m][c] = 0.0f;
    }
  }

  for (uint k0 = 0; k0 < p.K; k0 += stride) {
    const uint kc = min(stride, p.K - k0);
    // Stage x[row0 + m, k0 .. k0 + kc) (zeros for rows past the expert's).
    for (uint i = tid; i < uint(BM) * kc; i += ntid) {
      const uint m = i / kc;
      const uint k = i - m * kc;
#ifdef GATHER_MM_FAULT_K_SHIFT
      const uint kx = k0 + k + 1;
#else
      const uint kx = k0 + k;
#endif
      xs[m * stride + k] = m < nrows ? gathered_x(x, order, lhs, p, row0 + m, kx) : T(0.0f);
    }
#ifndef GATHER_MM_FAULT_NO_X_BARRIER
    threadgroup_barrier(mem_flags::mem_threadgroup);
#endif
    if (active && vector_k) {
      for (uint k = lane * V; k < kc; k += SIMD_WIDTH * V) {
        uint4 wv[DECODE_COLS];
        for (uint c = 0; c < DECODE_COLS; ++c) {
          wv[c] = *(device const uint4*)(wrow[c] + k0 + k);
        }
        for (int m = 0; m < BM; ++m) {
          if (uint(m) >= nrows) {
            break;  // uniform: the staged rows past the expert's are zeros
          }
          const uint4 xv = *(threadgroup const uint4*)(xs + m * stride + k);
          for (uint c = 0; c < DECODE_COLS; ++c) {
            acc[m][c] += dot16<T>(wv[c], xv);
          }
        }
      }
    } else if (active) {
      for (uint k = lane; k < kc; k += SIMD_WIDTH) {
        float wv[DECODE_COLS];
        for (uint c = 0; c < DECODE_COLS; ++c) {
          wv[c] = float(wrow[c][k0 + k]);
        }
        for (int m = 0; m < BM; ++m) {
          if (uint(m) >= nrows) {
            break;  // uniform: the staged rows past the expert's are zeros
          }
          const float xv = float(xs[m * stride + k]);
          for (uint c = 0; c < DECODE_COLS; ++c) {
            acc[m][c] = fma(wv[c], xv, acc[m][c]);
          }
        }
      }
    }
    if (k0 + stride < p.K) {
      threadgroup_barrier(mem_flags::mem_threadgroup);  // before xs is overwritten
    }
  }

  if (!active) {
    return;
  }
  for (int m = 0; m < BM; ++m) {
    if (uint(m) >= nrows) {
      break;
    }
    for (uint c = 0; c < DECODE_COLS; ++c) {
      const uint n = n0 + c;
      if (n >= p.N) {
        break;
      }
#ifdef GATHER_MM_FAULT_WRONG_REDUCTION
      const float s = simd_broadcast_first(acc[m][c]);
#else
      const float s = simd_sum(acc[m][c]);
#endif
      if (lane == (uint(m) * DECODE_COLS + c) % SIMD_WIDTH) {
        out[output_row(order, p, row0 + m) * p.N + n] = T(s);
      }
    }
  }
}

// -------------------------------------------------------------- prefill
// Grid: (ceil(N / BN), E, ceil(max rows / BM)), PREFILL_THREADS threads.
// smem (threadgroup(0)), float: the x tile [BM][BK] then the weight tile
// [BN][BK] during the K loop; the output tile [BM][BN] after it.
template <typename T, int BM, int BN>
[[kernel]] void gather_mm_prefill(
    device const T* x [[buffer(0)]],
    device const T* w [[buffer(1)]],
    device const uint* offsets [[buffer(2)]],
    device T* out [[buffer(3)]],
    constant GatherMMParams& p [[buffer(4)]],
    device const uint* order [[buffer(5)]],
    device const uint* lhs [[buffer(6)]],
    threadgroup float* smem [[threadgroup(0)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  constexpr uint BK = PREFILL_BK;
  constexpr int SM = BM / 2, SN = BN / 2;  // each simdgroup's part of the tile
  constexpr int TM = SM / 8, TN = SN / 8;  // ... in 8x8 matrices
  const uint e = tg.y;
  const uint row0 = offsets[e] * p.rows_per_index + tg.z * BM;
  const uint row_end = offsets[e + 1] * p.rows_per_index;
  if (row0 >= row_end) {
    return;  // no rows for this expert (or row tile): the whole threadgroup leaves
  }
  const uint nrows = min(uint(BM), row_end - row0);
  const uint n0 = tg.x * BN;
  device const T* wexp = w + ulong(e) * p.N * p.K;
  threadgroup float* xs = smem;            // [BM][BK]
  threadgroup float* ws = smem + BM * BK;  // [BN][BK]
  const uint sm = (sg / 2) * SM;
  const uint sn = (sg % 2) * SN;

  simdgroup_matrix<float, 8, 8> acc[TM][TN];
  for (int i = 0; i < TM; ++i) {
    for (int j = 0; j < TN; ++j) {
      acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
  }

  for (uint k0 = 0; k0 < p.K; k0 += BK) {
    for (uint i = tid; i < BM * BK; i += PREFILL_THREADS) {
      const uint m = i / BK, k = k0 + i % BK;
      xs[i] = (m < nrows && k < p.K) ? float(gathered_x(x, order, lhs, p, row0 + m, k)) : 0.0f;
    }
    for (uint i = tid; i < BN * BK; i += PREFILL_THREADS) {
      const uint n = n0 + i / BK, k = k0 + i % BK;
      ws[i] = (n < p.N && k < p.K) ? float(wexp[ulong(n) * p.K + k]) : 0.0f;
    }
#ifndef GATHER_MM_FAULT_PREFILL_NO_BARRIER
    threadgroup_barrier(mem_flags::mem_threadgroup);
#endif
    for (uint kk = 0; kk < BK; kk += 8) {
      simdgroup_matrix<float, 8, 8> a[TM];
      simdgroup_matrix<float, 8, 8> b[TN];
      for (int i = 0; i < TM; ++i) {
        simdgroup_load(a[i], xs + (sm + 8 * i) * BK + kk, BK);
      }
      for (int j = 0; j < TN; ++j) {
        // b[j](k, n) = ws[n][k]: the weight tile read transposed.
        simdgroup_load(b[j], ws + (sn + 8 * j) * BK + kk, BK, ulong2(0, 0), true);
      }
      for (int i = 0; i < TM; ++i) {
        for (int j = 0; j < TN; ++j) {
          simdgroup_multiply_accumulate(acc[i][j], a[i], b[j], acc[i][j]);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // before the tiles are overwritten
  }

  // Output tile through threadgroup memory: partial tiles are stored with a
  // bound check per element, converted to T once.
  for (int i = 0; i < TM; ++i) {
    for (int j = 0; j < TN; ++j) {
      simdgroup_store(acc[i][j], smem + (sm + 8 * i) * BN + sn + 8 * j, BN);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
#ifdef GATHER_MM_FAULT_TILE_BOUND
  const uint store_rows = min(nrows + 1, uint(BM));
#else
  const uint store_rows = nrows;
#endif
  for (uint i = tid; i < store_rows * BN; i += PREFILL_THREADS) {
    const uint m = i / BN, n = n0 + i % BN;
    if (n < p.N) {
      out[output_row(order, p, row0 + m) * p.N + n] = T(smem[i]);
    }
  }
}

// -------------------------------------------------------- instantiations
// Names spell the specialisation: gather_mm_{decode,prefill}_{type}_bm{BM}[_bn{BN}]
// (plan_gather_mm builds the same names). Each name is written out as one
// literal: the simulator's pre-pass reads host_name("...") as a single string.
#define instantiate_decode(host, T, bm) \
  template [[host_name(host)]] [[kernel]] decltype(gather_mm_decode<T, bm>) gather_mm_decode<T, bm>;

#define instantiate_prefill(host, T, bm, bn) \
  template [[host_name(host)]] [[kernel]] decltype(gather_mm_prefill<T, bm, bn>) gather_mm_prefill<T, bm, bn>;

instantiate_decode("gather_mm_decode_float_bm1", float, 1)
instantiate_decode("gather_mm_decode_float_bm2", float, 2)
instantiate_decode("gather_mm_decode_float_bm4", float, 4)
instantiate_decode("gather_mm_decode_float_bm8", float, 8)
instantiate_prefill("gather_mm_prefill_float_bm16_bn32", float, 16, 32)
instantiate_prefill("gather_mm_prefill_float_bm32_bn64", float, 32, 64)
instantiate_decode("gather_mm_decode_half_bm1", half, 1)
instantiate_decode("gather_mm_decode_half_bm2", half, 2)
instantiate_decode("gather_mm_decode_half_bm4", half, 4)
instantiate_decode("gather_mm_decode_half_bm8", half, 8)
instantiate_prefill("gather_mm_prefill_half_bm16_bn32", half, 16, 32)
instantiate_prefill("gather_mm_prefill_half_bm32_bn64", half, 32, 64)
instantiate_decode("gather_mm_decode_bfloat_bm1", bfloat, 1)
instantiate_decode("gather_mm_decode_bfloat_bm2", bfloat, 2)
instantiate_decode("gather_mm_decode_bfloat_bm4", bfloat, 4)
instantiate_decode("gather_mm_decode_bfloat_bm8", bfloat, 8)
instantiate_prefill("gather_mm_prefill_bfloat_bm16_bn32", bfloat, 16, 32)
instantiate_prefill("gather_mm_prefill_bfloat_bm32_bn64", bfloat, 32, 64)
