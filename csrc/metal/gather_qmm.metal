// Quantized gather_mm on Apple GPUs, decode path, mlx-lm's QuantizedSwitchLinear
// layout:
//
//   out[i * M + m, :] = x[lhs[i] * M + m, :] @ dequant(w[rhs[i]])^T
//
// for every index entry i (M rows each), the entries grouped by expert
// through the routing as in gather_mm.metal (order[p]: the entry at sorted
// position p; expert e owns positions offsets[e] .. offsets[e + 1], i.e.
// sorted rows offsets[e] * M .. offsets[e + 1] * M; an lhs id >=
// lhs_batches reads NaN), and w quantized as mx.quantize
// packs it (csrc/cpu/quantized.h): each weight row is a little-endian bit
// stream of `bits`-bit codes ([E, N, K * bits / 32] uint32), groups of
// group_size consecutive elements share a scale (and a bias):
//   affine: w = scale * q + bias, scales/biases [E, N, K / group_size] in T;
//   mxfp4:  w = e2m1(q) * 2^(scale - 127), scales uint8 E8M0, no biases.
// float32 / float16 / bfloat16 activations, float32 accumulation.
//
// Buffers: 0 x, 1 w (packed, uint32), 2 scales (T, or uint8 for mxfp4),
// 3 biases (T; unused by mxfp4, but something must be bound), 4 offsets,
// 5 out, 6 GatherQMMParams, 7 order, 8 lhs; threadgroup(0): the staged x
// rows. The launch
// (kernel, grid, threads, threadgroup memory, params) comes from
// plan_gather_qmm (gather_qmm_plan.cpp).
//
// Decode (at most 8 rows per expert): memory bound on the packed weights,
// N * K * bits / 8 bytes per active expert plus the scales. Same shape as
// gather_mm_decode: grid (ceil(N / 32), E, 1), 256 threads = 8 simdgroups,
// each owning 4 output columns; one threadgroup covers all of an expert's
// rows (BM = next power of two), so every packed byte is read once. The
// expert's x rows are staged once in threadgroup memory (k_chunk elements of
// K at a time, one barrier) and read from there by all simdgroups.
//
// Per step a lane takes one block of 32 consecutive elements of K for each
// of its simdgroup's 4 columns: 32 * bits bits = `bits` uint32 words of the
// packed row, loaded as uint4 (bits 4, 8), uint2 (bits 2, 6) or uint (3, 5),
// consecutive lanes reading consecutive blocks (a simdgroup streams
// 32 * 4 * bits contiguous bytes per column per step). A block never spans
// two groups (group_size is a multiple of 32), so one scale/bias applies to
// it, and the dequantization stays in registers with
//   sum_j (s q_j + b) x_j = s * sum_j q_j x_j + b * sum_j x_j,
// sum_j x_j computed once per row and block and shared by the 4 columns.
// simd_sum reduces the 32 lanes' partial sums at the end. Dequantized
// weights are never written anywhere. Experts without rows return before any
// barrier. Columns past N read row N - 1 (valid memory) and are not stored.
//
// Fault toggles (tests only; each must make the simulator tests fail):
//   GATHER_QMM_FAULT_NO_X_BARRIER   decode: no barrier after staging x
//   GATHER_QMM_FAULT_GROUP_INDEX    the next group's scale/bias (clamped; both kernels)
//   GATHER_QMM_FAULT_NO_BIAS_SUM    the bias term dropped (both kernels)
//   GATHER_QMM_FAULT_PREFILL_NO_BARRIER  prefill: no barrier after staging the tiles
#include <metal_stdlib>

#include "gather_qmm_params.h"
#include "quantized_block.h"

using namespace metal;

// Sorted row r: element k of its x row (NaN for an lhs id out of range),
// and its output row.
template <typename T>
inline T qmm_gathered_x(device const T* x, device const uint* order, device const uint* lhs,
                        constant GatherQMMParams& p, uint r, uint k) {
  const uint M = p.rows_per_index;
  const uint batch = lhs[order[r / M]];
  return batch < p.lhs_batches ? x[(ulong(batch) * M + r % M) * p.K + k] : T(NAN);
}

inline ulong qmm_output_row(device const uint* order, constant GatherQMMParams& p, uint r) {
  const uint M = p.rows_per_index;
  return ulong(order[r / M]) * M + r % M;
}

// Grid: (ceil(N / (simdgroups * QMM_COLS)), E, 1). Threadgroup (t, e): sorted
// rows offsets[e] * M .. offsets[e + 1] * M (at most BM), columns of column
// tile t.
// BITS: code width (4 with FP4 = mxfp4 e2m1 codes and E8M0 scales).
template <typename T, int BM, int BITS, bool FP4>
[[kernel]] void gather_qmm_decode(
    device const T* x [[buffer(0)]],
    device const uint* w [[buffer(1)]],
    device const uchar* scales [[buffer(2)]],
    device const T* biases [[buffer(3)]],
    device const uint* offsets [[buffer(4)]],
    device T* out [[buffer(5)]],
    constant GatherQMMParams& p [[buffer(6)]],
    device const uint* order [[buffer(7)]],
    device const uint* lhs [[buffer(8)]],
    threadgroup T* xs [[threadgroup(0)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint ntid [[threads_per_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  const uint e = tg.y;
  const uint row0 = offsets[e] * p.rows_per_index + tg.z * BM;
  const uint row_end = offsets[e + 1] * p.rows_per_index;
  if (row0 >= row_end) {
    return;  // no rows for this expert: the whole threadgroup leaves
  }
  const uint nrows = min(uint(BM), row_end - row0);
  const uint n0 = (tg.x * nsg + sg) * QMM_COLS;  // this simdgroup's first column
  const bool active = n0 < p.N;                  // uniform per simdgroup
  const uint stride = p.k_chunk;
  const uint row_words = p.K / QMM_BLOCK * BITS;

  // Packed rows and scale/bias rows of this simdgroup's columns; columns
  // past N use row N - 1 (valid memory, result never stored).
  device const uint* wrow[QMM_COLS];
  ulong srow[QMM_COLS];
  for (uint c = 0; c < QMM_COLS; ++c) {
    const ulong r = ulong(e) * p.N + min(n0 + c, p.N - 1);
    wrow[c] = w + r * row_words;
    srow[c] = r * p.groups;
  }

  float acc[BM][QMM_COLS];
  for (int m = 0; m < BM; ++m) {
    for (uint c = 0; c < QMM_COLS; ++c) {
      acc[m][c] = 0.0f;
    }
  }

  for (uint k0 = 0; k0 < p.K; k0 += stride) {
    const uint kc = min(stride, p.K - k0);
    // Stage x[row0 + m, k0 .. k0 + kc) (zeros for rows past the expert's).
    for (uint i = tid; i < uint(BM) * kc; i += ntid) {
      const uint m = i / kc;
      const uint k = i - m * kc;
      xs[m * stride + k] = m < nrows ? qmm_gathered_x(x, order, lhs, p, row0 + m, k0 + k) : T(0.0f);
    }
#ifndef GATHER_QMM_FAULT_NO_X_BARRIER
    threadgroup_barrier(mem_flags::mem_threadgroup);
#endif
    if (active) {
      for (uint k = lane * QMM_BLOCK; k < kc; k += QMM_SIMD_WIDTH * QMM_BLOCK) {
        const uint kg = k0 + k;
#ifdef GATHER_QMM_FAULT_GROUP_INDEX
        const uint group = min(kg / p.group_size + 1, p.groups - 1);
#else
        const uint group = kg / p.group_size;
#endif
        uint wd[QMM_COLS][BITS];
        float s[QMM_COLS];
        float b[QMM_COLS];
        for (uint c = 0; c < QMM_COLS; ++c) {
          qmm_load_block<BITS>(wrow[c] + kg / QMM_BLOCK * BITS, wd[c]);
          if (FP4) {
            s[c] = qmm_e8m0(scales[srow[c] + group]);
            b[c] = 0.0f;
          } else {
            s[c] = float(((device const T*)scales)[srow[c] + group]);
            b[c] = float(biases[srow[c] + group]);
          }
        }
        for (int m = 0; m < BM; ++m) {
          if (uint(m) >= nrows) {
            break;  // uniform: the staged row is zeros
          }
          threadgroup const T* xr = xs + m * stride + k;
          float xv[QMM_BLOCK];
          float xsum = 0.0f;
          for (uint j = 0; j < QMM_BLOCK; ++j) {
            xv[j] = float(xr[j]);
            xsum += xv[j];
          }
          for (uint c = 0; c < QMM_COLS; ++c) {
            float qdot = 0.0f;
            for (uint j = 0; j < QMM_BLOCK; ++j) {
              const uint q = qmm_code<BITS>(wd[c], j);
              qdot = fma(FP4 ? QMM_E2M1[q] : float(q), xv[j], qdot);
            }
#ifdef GATHER_QMM_FAULT_NO_BIAS_SUM
            acc[m][c] = fma(s[c], qdot, acc[m][c]);
#else
            acc[m][c] = fma(s[c], qdot, fma(b[c], xsum, acc[m][c]));
#endif
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
    for (uint c = 0; c < QMM_COLS; ++c) {
      const uint n = n0 + c;
      if (n >= p.N) {
        break;
      }
      const float v = simd_sum(acc[m][c]);
      if (lane == (uint(m) * QMM_COLS + c) % QMM_SIMD_WIDTH) {
        out[qmm_output_row(order, p, row0 + m) * p.N + n] = T(v);
      }
    }
  }
}

// ------------------------------------------------------------- prefill
// More than 8 rows per expert: compute bound, the structure of
// gather_mm_prefill. A threadgroup of 4 simdgroups (2 x 2) owns a BM x BN
// output tile of one expert (row tile tg.z of its sorted rows, column tile
// tg.x). Per K step of one 32-element block it stages the x tile [BM][32]
// and the weight tile [BN][32] in float threadgroup memory, the weights
// dequantized there once (s * q + b in float; e2m1(q) * 2^e for mxfp4) and
// then reused by all BM rows through simdgroup_matrix 8x8
// multiply-accumulate (the weight tile read transposed by simdgroup_load).
// A block never spans two groups, so one scale (and bias) per column and
// step. Packed bytes per output row: N * K * bits / 8 / BM. The output tile
// goes through threadgroup memory for the guarded store of partial tiles.
// Grid (ceil(N / BN), E, ceil(max rows / BM)), QMM_PREFILL_THREADS threads;
// threadgroup(0): max((BM + BN) * 32, BM * BN) floats.
constant constexpr uint QMM_PREFILL_THREADS = 128;

template <typename T, int BM, int BN, int BITS, bool FP4>
[[kernel]] void gather_qmm_prefill(
    device const T* x [[buffer(0)]],
    device const uint* w [[buffer(1)]],
    device const uchar* scales [[buffer(2)]],
    device const T* biases [[buffer(3)]],
    device const uint* offsets [[buffer(4)]],
    device T* out [[buffer(5)]],
    constant GatherQMMParams& p [[buffer(6)]],
    device const uint* order [[buffer(7)]],
    device const uint* lhs [[buffer(8)]],
    threadgroup float* smem [[threadgroup(0)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  constexpr uint BK = QMM_BLOCK;
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
  const uint row_words = p.K / QMM_BLOCK * BITS;
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
    for (uint i = tid; i < BM * BK; i += QMM_PREFILL_THREADS) {
      const uint m = i / BK;
      xs[i] = m < nrows ? float(qmm_gathered_x(x, order, lhs, p, row0 + m, k0 + i % BK)) : 0.0f;
    }
#ifdef GATHER_QMM_FAULT_GROUP_INDEX
    const uint group = min(k0 / p.group_size + 1, p.groups - 1);
#else
    const uint group = k0 / p.group_size;
#endif
    for (uint i = tid; i < BN * BK; i += QMM_PREFILL_THREADS) {
      const uint n = n0 + i / BK;
      const uint j = i % BK;
      float v = 0.0f;  // columns past N: zeros, never stored
      if (n < p.N) {
        const ulong r = ulong(e) * p.N + n;
        device const uint* block = w + r * row_words + k0 / QMM_BLOCK * BITS;
        const uint bit = j * BITS;
        const uint off = bit % 32;
        uint q = block[bit / 32] >> off;
        if (off + BITS > 32) {
          q |= block[bit / 32 + 1] << (32 - off);
        }
        q &= (1u << BITS) - 1u;
        const ulong g = r * p.groups + group;
        if (FP4) {
          v = QMM_E2M1[q] * qmm_e8m0(scales[g]);
        } else {
#ifdef GATHER_QMM_FAULT_NO_BIAS_SUM
          v = float(((device const T*)scales)[g]) * float(q);
#else
          v = fma(float(((device const T*)scales)[g]), float(q), float(biases[g]));
#endif
        }
      }
      ws[i] = v;
    }
#ifndef GATHER_QMM_FAULT_PREFILL_NO_BARRIER
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

  for (int i = 0; i < TM; ++i) {
    for (int j = 0; j < TN; ++j) {
      simdgroup_store(acc[i][j], smem + (sm + 8 * i) * BN + sn + 8 * j, BN);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint i = tid; i < nrows * BN; i += QMM_PREFILL_THREADS) {
    const uint m = i / BN, n = n0 + i % BN;
    if (n < p.N) {
      out[qmm_output_row(order, p, row0 + m) * p.N + n] = T(smem[i]);
    }
  }
}

// -------------------------------------------------------- instantiations
// gather_qmm_decode_{type}_{b2,b3,b4,b5,b6,b8,mxfp4}_bm{1,2,4,8}
// (plan_gather_qmm builds the same names). Each name is one literal: the
// simulator's pre-pass reads host_name("...") as a single string.
#define instantiate_qmm(host, T, bm, bits, fp4) \
  template [[host_name(host)]] [[kernel]] decltype(gather_qmm_decode<T, bm, bits, fp4>) \
      gather_qmm_decode<T, bm, bits, fp4>;
// gather_qmm_prefill_{type}_{variant}_bm32_bn32
#define instantiate_qmm_prefill(host, T, bits, fp4) \
  template [[host_name(host)]] [[kernel]] decltype(gather_qmm_prefill<T, 32, 32, bits, fp4>) \
      gather_qmm_prefill<T, 32, 32, bits, fp4>;

// Tests may build a subset (faster simulator builds): GATHER_QMM_ONLY_VARIANT
// = 2..8 for that affine width only, 1 for mxfp4 only.
#if !defined(GATHER_QMM_ONLY_VARIANT) || GATHER_QMM_ONLY_VARIANT == 2
instantiate_qmm("gather_qmm_decode_float_b2_bm1", float, 1, 2, false)
instantiate_qmm("gather_qmm_decode_float_b2_bm2", float, 2, 2, false)
instantiate_qmm("gather_qmm_decode_float_b2_bm4", float, 4, 2, false)
instantiate_qmm("gather_qmm_decode_float_b2_bm8", float, 8, 2, false)
instantiate_qmm("gather_qmm_decode_half_b2_bm1", half, 1, 2, false)
instantiate_qmm("gather_qmm_decode_half_b2_bm2", half, 2, 2, false)
instantiate_qmm("gather_qmm_decode_half_b2_bm4", half, 4, 2, false)
instantiate_qmm("gather_qmm_decode_half_b2_bm8", half, 8, 2, false)
instantiate_qmm("gather_qmm_decode_bfloat_b2_bm1", bfloat, 1, 2, false)
instantiate_qmm("gather_qmm_decode_bfloat_b2_bm2", bfloat, 2, 2, false)
instantiate_qmm("gather_qmm_decode_bfloat_b2_bm4", bfloat, 4, 2, false)
instantiate_qmm("gather_qmm_decode_bfloat_b2_bm8", bfloat, 8, 2, false)
instantiate_qmm_prefill("gather_qmm_prefill_float_b2_bm32_bn32", float, 2, false)
instantiate_qmm_prefill("gather_qmm_prefill_half_b2_bm32_bn32", half, 2, false)
instantiate_qmm_prefill("gather_qmm_prefill_bfloat_b2_bm32_bn32", bfloat, 2, false)
#endif
#if !defined(GATHER_QMM_ONLY_VARIANT) || GATHER_QMM_ONLY_VARIANT == 3
instantiate_qmm("gather_qmm_decode_float_b3_bm1", float, 1, 3, false)
instantiate_qmm("gather_qmm_decode_float_b3_bm2", float, 2, 3, false)
instantiate_qmm("gather_qmm_decode_float_b3_bm4", float, 4, 3, false)
instantiate_qmm("gather_qmm_decode_float_b3_bm8", float, 8, 3, false)
instantiate_qmm("gather_qmm_decode_half_b3_bm1", half, 1, 3, false)
instantiate_qmm("gather_qmm_decode_half_b3_bm2", half, 2, 3, false)
instantiate_qmm("gather_qmm_decode_half_b3_bm4", half, 4, 3, false)
instantiate_qmm("gather_qmm_decode_half_b3_bm8", half, 8, 3, false)
instantiate_qmm("gather_qmm_decode_bfloat_b3_bm1", bfloat, 1, 3, false)
instantiate_qmm("gather_qmm_decode_bfloat_b3_bm2", bfloat, 2, 3, false)
instantiate_qmm("gather_qmm_decode_bfloat_b3_bm4", bfloat, 4, 3, false)
instantiate_qmm("gather_qmm_decode_bfloat_b3_bm8", bfloat, 8, 3, false)
instantiate_qmm_prefill("gather_qmm_prefill_float_b3_bm32_bn32", float, 3, false)
instantiate_qmm_prefill("gather_qmm_prefill_half_b3_bm32_bn32", half, 3, false)
instantiate_qmm_prefill("gather_qmm_prefill_bfloat_b3_bm32_bn32", bfloat, 3, false)
#endif
#if !defined(GATHER_QMM_ONLY_VARIANT) || GATHER_QMM_ONLY_VARIANT == 4
instantiate_qmm("gather_qmm_decode_float_b4_bm1", float, 1, 4, false)
instantiate_qmm("gather_qmm_decode_float_b4_bm2", float, 2, 4, false)
instantiate_qmm("gather_qmm_decode_float_b4_bm4", float, 4, 4, false)
instantiate_qmm("gather_qmm_decode_float_b4_bm8", float, 8, 4, false)
instantiate_qmm("gather_qmm_decode_half_b4_bm1", half, 1, 4, false)
instantiate_qmm("gather_qmm_decode_half_b4_bm2", half, 2, 4, false)
instantiate_qmm("gather_qmm_decode_half_b4_bm4", half, 4, 4, false)
instantiate_qmm("gather_qmm_decode_half_b4_bm8", half, 8, 4, false)
instantiate_qmm("gather_qmm_decode_bfloat_b4_bm1", bfloat, 1, 4, false)
instantiate_qmm("gather_qmm_decode_bfloat_b4_bm2", bfloat, 2, 4, false)
instantiate_qmm("gather_qmm_decode_bfloat_b4_bm4", bfloat, 4, 4, false)
instantiate_qmm("gather_qmm_decode_bfloat_b4_bm8", bfloat, 8, 4, false)
instantiate_qmm_prefill("gather_qmm_prefill_float_b4_bm32_bn32", float, 4, false)
instantiate_qmm_prefill("gather_qmm_prefill_half_b4_bm32_bn32", half, 4, false)
instantiate_qmm_prefill("gather_qmm_prefill_bfloat_b4_bm32_bn32", bfloat, 4, false)
#endif
#if !defined(GATHER_QMM_ONLY_VARIANT) || GATHER_QMM_ONLY_VARIANT == 5
instantiate_qmm("gather_qmm_decode_float_b5_bm1", float, 1, 5, false)
instantiate_qmm("gather_qmm_decode_float_b5_bm2", float, 2, 5, false)
instantiate_qmm("gather_qmm_decode_float_b5_bm4", float, 4, 5, false)
instantiate_qmm("gather_qmm_decode_float_b5_bm8", float, 8, 5, false)
instantiate_qmm("gather_qmm_decode_half_b5_bm1", half, 1, 5, false)
instantiate_qmm("gather_qmm_decode_half_b5_bm2", half, 2, 5, false)
instantiate_qmm("gather_qmm_decode_half_b5_bm4", half, 4, 5, false)
instantiate_qmm("gather_qmm_decode_half_b5_bm8", half, 8, 5, false)
instantiate_qmm("gather_qmm_decode_bfloat_b5_bm1", bfloat, 1, 5, false)
instantiate_qmm("gather_qmm_decode_bfloat_b5_bm2", bfloat, 2, 5, false)
instantiate_qmm("gather_qmm_decode_bfloat_b5_bm4", bfloat, 4, 5, false)
instantiate_qmm("gather_qmm_decode_bfloat_b5_bm8", bfloat, 8, 5, false)
instantiate_qmm_prefill("gather_qmm_prefill_float_b5_bm32_bn32", float, 5, false)
instantiate_qmm_prefill("gather_qmm_prefill_half_b5_bm32_bn32", half, 5, false)
instantiate_qmm_prefill("gather_qmm_prefill_bfloat_b5_bm32_bn32", bfloat, 5, false)
#endif
#if !defined(GATHER_QMM_ONLY_VARIANT) || GATHER_QMM_ONLY_VARIANT == 6
instantiate_qmm("gather_qmm_decode_float_b6_bm1", float, 1, 6, false)
instantiate_qmm("gather_qmm_decode_float_b6_bm2", float, 2, 6, false)
instantiate_qmm("gather_qmm_decode_float_b6_bm4", float, 4, 6, false)
instantiate_qmm("gather_qmm_decode_float_b6_bm8", float, 8, 6, false)
instantiate_qmm("gather_qmm_decode_half_b6_bm1", half, 1, 6, false)
instantiate_qmm("gather_qmm_decode_half_b6_bm2", half, 2, 6, false)
instantiate_qmm("gather_qmm_decode_half_b6_bm4", half, 4, 6, false)
instantiate_qmm("gather_qmm_decode_half_b6_bm8", half, 8, 6, false)
instantiate_qmm("gather_qmm_decode_bfloat_b6_bm1", bfloat, 1, 6, false)
instantiate_qmm("gather_qmm_decode_bfloat_b6_bm2", bfloat, 2, 6, false)
instantiate_qmm("gather_qmm_decode_bfloat_b6_bm4", bfloat, 4, 6, false)
instantiate_qmm("gather_qmm_decode_bfloat_b6_bm8", bfloat, 8, 6, false)
instantiate_qmm_prefill("gather_qmm_prefill_float_b6_bm32_bn32", float, 6, false)
instantiate_qmm_prefill("gather_qmm_prefill_half_b6_bm32_bn32", half, 6, false)
instantiate_qmm_prefill("gather_qmm_prefill_bfloat_b6_bm32_bn32", bfloat, 6, false)
#endif
#if !defined(GATHER_QMM_ONLY_VARIANT) || GATHER_QMM_ONLY_VARIANT == 8
instantiate_qmm("gather_qmm_decode_float_b8_bm1", float, 1, 8, false)
instantiate_qmm("gather_qmm_decode_float_b8_bm2", float, 2, 8, false)
instantiate_qmm("gather_qmm_decode_float_b8_bm4", float, 4, 8, false)
instantiate_qmm("gather_qmm_decode_float_b8_bm8", float, 8, 8, false)
instantiate_qmm("gather_qmm_decode_half_b8_bm1", half, 1, 8, false)
instantiate_qmm("gather_qmm_decode_half_b8_bm2", half, 2, 8, false)
instantiate_qmm("gather_qmm_decode_half_b8_bm4", half, 4, 8, false)
instantiate_qmm("gather_qmm_decode_half_b8_bm8", half, 8, 8, false)
instantiate_qmm("gather_qmm_decode_bfloat_b8_bm1", bfloat, 1, 8, false)
instantiate_qmm("gather_qmm_decode_bfloat_b8_bm2", bfloat, 2, 8, false)
instantiate_qmm("gather_qmm_decode_bfloat_b8_bm4", bfloat, 4, 8, false)
instantiate_qmm("gather_qmm_decode_bfloat_b8_bm8", bfloat, 8, 8, false)
instantiate_qmm_prefill("gather_qmm_prefill_float_b8_bm32_bn32", float, 8, false)
instantiate_qmm_prefill("gather_qmm_prefill_half_b8_bm32_bn32", half, 8, false)
instantiate_qmm_prefill("gather_qmm_prefill_bfloat_b8_bm32_bn32", bfloat, 8, false)
#endif
#if !defined(GATHER_QMM_ONLY_VARIANT) || GATHER_QMM_ONLY_VARIANT == 1
instantiate_qmm("gather_qmm_decode_float_mxfp4_bm1", float, 1, 4, true)
instantiate_qmm("gather_qmm_decode_float_mxfp4_bm2", float, 2, 4, true)
instantiate_qmm("gather_qmm_decode_float_mxfp4_bm4", float, 4, 4, true)
instantiate_qmm("gather_qmm_decode_float_mxfp4_bm8", float, 8, 4, true)
instantiate_qmm("gather_qmm_decode_half_mxfp4_bm1", half, 1, 4, true)
instantiate_qmm("gather_qmm_decode_half_mxfp4_bm2", half, 2, 4, true)
instantiate_qmm("gather_qmm_decode_half_mxfp4_bm4", half, 4, 4, true)
instantiate_qmm("gather_qmm_decode_half_mxfp4_bm8", half, 8, 4, true)
instantiate_qmm("gather_qmm_decode_bfloat_mxfp4_bm1", bfloat, 1, 4, true)
instantiate_qmm("gather_qmm_decode_bfloat_mxfp4_bm2", bfloat, 2, 4, true)
instantiate_qmm("gather_qmm_decode_bfloat_mxfp4_bm4", bfloat, 4, 4, true)
instantiate_qmm("gather_qmm_decode_bfloat_mxfp4_bm8", bfloat, 8, 4, true)
instantiate_qmm_prefill("gather_qmm_prefill_float_mxfp4_bm32_bn32", float, 4, true)
instantiate_qmm_prefill("gather_qmm_prefill_half_mxfp4_bm32_bn32", half, 4, true)
instantiate_qmm_prefill("gather_qmm_prefill_bfloat_mxfp4_bm32_bn32", bfloat, 4, true)
#endif
