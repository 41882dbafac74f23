// The fused SwitchGLU on Apple GPUs, decode path (a few tokens):
//
//   hidden[i] = silu(x[t_i] @ gate[e]^T) * (x[t_i] @ up[e]^T)     (gate_up launch)
//   out[t]    = sum_j scores[t, j] * (hidden[i(t, j)] @ down[e]^T) (down launch)
//
// x [T, D], gate/up [E, H, D], down [E, D, H]; routing as in routing.h: the
// slots s = t * top_k + j sorted by expert, `order` [T * k] (uint32: the slot
// at each sorted position i), `offsets` [E + 1] (uint32: expert e owns sorted
// positions offsets[e] .. offsets[e + 1]); hidden [T * k, H] in sorted order,
// in the compute dtype. With scores (float32 [T * k], by slot) out is
// [T, D]; without, out is per slot, [T * k, D] in slot order.
// float32 / float16 / bfloat16, float32 accumulation. The launches (kernel,
// grid, threadgroup size, threadgroup memory, params) come from
// plan_switch_glu (switch_glu_plan.cpp), shared with the tests that run this
// file in the Metal-on-CPU simulator (tests/metal_sim/).
//
// gate_up: grid (ceil(H / 32), E, 1), 256 threads. A threadgroup owns one
//   expert and 32 hidden columns (8 simdgroups x SWITCH_COLS); it stages the
//   expert's x rows (gathered through order / top_k) in threadgroup memory,
//   d_chunk elements of D at a time, then each simdgroup reads 16 bytes per
//   lane of the gate AND the up row of each of its columns per step and
//   accumulates both in the same K loop (float), one simd_sum per output.
//   Epilogue: silu(g) * u in float, rounded once to T. An expert without
//   rows leaves before any barrier. Each gate/up weight byte is read once.
// down: grid (ceil(D / 32), 1, 1), 256 threads. A threadgroup owns 32 output
//   columns for ALL experts, so the k slots of a token meet in one
//   threadgroup and are summed without atomics: for each expert with rows it
//   stages the expert's hidden rows (contiguous in sorted order, h_chunk at a
//   time), dots them with the expert's down rows of its columns (16-byte
//   loads, simd_sum), multiplies by the slot's score and adds into a float
//   accumulator per (token, column) in threadgroup memory (threadgroup(1));
//   the accumulator of a column is only touched by the one lane that owns the
//   column (initialise, accumulate, store), so it needs no barrier. The
//   per-slot variant (no scores) stores each slot's row directly.
// The plan keeps the rows of an expert <= BM (1, 2, 4, 8): one row tile.
//
// Prefill path (more than 8 rows per expert, or scores with > 128 tokens):
// simdgroup_matrix 8x8 tiles, see "prefill" below. gate_up: grid
// (ceil(H / 32), E, ceil(max rows / 32)), 128 threads, a 32 x 32 tile of
// both g and u in one K loop, silu(g) * u epilogue, hidden in sorted order.
// down: grid (ceil(D / 32), E, ceil(max rows / 32)); without scores the
// rows go to out [T * k, D] by slot; with scores to a float32 scratch
// [T * k, D] by slot, scaled by the score, then moe_combine_slots sums each
// token's k rows (no float atomics, deterministic).
//
// Only Metal 3 features available on M1 and later: simdgroup functions and
// `bfloat` (MSL 3.1).
//
// Fault toggles (tests only; each must make the simulator tests fail):
//   SWITCH_GLU_FAULT_NO_X_BARRIER    gate_up: no barrier after staging x
//   SWITCH_GLU_FAULT_TOKEN_SHIFT     gate_up: x staged from the next token's row
//   SWITCH_GLU_FAULT_NO_H_BARRIER    down: no barrier before the hidden stage is overwritten
//   SWITCH_GLU_FAULT_PREFILL_NO_STAGE_BARRIER  gate_up prefill: no barrier after staging x/gate/up
#include <metal_stdlib>

#include "switch_glu_params.h"

using namespace metal;

constant constexpr uint SWITCH_SIMD = 32;
constant constexpr uint SWITCH_COLS = 4;  // output columns per simdgroup

// 16 bytes of T as four 32-bit words; dot products in float.
template <typename T>
struct SwitchWord {
  static inline float dot(uint a, uint b) {
    vec<T, 2> u = as_type<vec<T, 2>>(a);
    vec<T, 2> v = as_type<vec<T, 2>>(b);
    return fma(float(u.x), float(v.x), float(u.y) * float(v.y));
  }
};
template <>
struct SwitchWord<float> {
  static inline float dot(uint a, uint b) {
    return as_type<float>(a) * as_type<float>(b);
  }
};

template <typename T>
inline float switch_dot16(uint4 a, uint4 b) {
  return (SwitchWord<T>::dot(a.x, b.x) + SwitchWord<T>::dot(a.y, b.y)) +
      (SwitchWord<T>::dot(a.z, b.z) + SwitchWord<T>::dot(a.w, b.w));
}

// ------------------------------------------------------------- gate_up
// Buffers: 0 x, 1 gate, 2 up, 3 order, 4 offsets, 5 hidden, 6 params;
// threadgroup(0): xs [BM][d_chunk] of T.
template <typename T, int BM>
[[kernel]] void moe_gate_up_swiglu_decode(
    device const T* x [[buffer(0)]],
    device const T* gate [[buffer(1)]],
    device const T* up [[buffer(2)]],
    device const uint* order [[buffer(3)]],
    device const uint* offsets [[buffer(4)]],
    device T* hidden [[buffer(5)]],
    constant SwitchGluParams& p [[buffer(6)]],
    threadgroup T* xs [[threadgroup(0)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint ntid [[threads_per_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr uint V = 16 / sizeof(T);
  const uint e = tg.y;
  const uint row0 = offsets[e];
  const uint row_end = offsets[e + 1];
  if (row0 >= row_end) {
    return;  // no rows for this expert: the whole threadgroup leaves
  }
  const uint nrows = min(uint(BM), row_end - row0);
  const uint h0 = (tg.x * nsg + sg) * SWITCH_COLS;  // this simdgroup's first hidden column
  const bool active = h0 < p.H;                      // uniform per simdgroup
  const bool vector_k = (p.D % V) == 0;
  const uint stride = p.d_chunk;

  // Columns past H read row H - 1 (valid memory, never stored).
  device const T* grow[SWITCH_COLS];
  device const T* urow[SWITCH_COLS];
  for (uint c = 0; c < SWITCH_COLS; ++c) {
    const ulong r = (ulong(e) * p.H + min(h0 + c, p.H - 1)) * p.D;
    grow[c] = gate + r;
    urow[c] = up + r;
  }

  float ga[BM][SWITCH_COLS];
  float ua[BM][SWITCH_COLS];
  for (int m = 0; m < BM; ++m) {
    for (uint c = 0; c < SWITCH_COLS; ++c) {
      ga[m][c] = 0.0f;
      ua[m][c] = 0.0f;
    }
  }

  for (uint k0 = 0; k0 < p.D; k0 += stride) {
    const uint kc = min(stride, p.D - k0);
    // Stage x[token of sorted row row0 + m, k0 .. k0 + kc) (zeros past the expert's rows).
    for (uint i = tid; i < uint(BM) * kc; i += ntid) {
      const uint m = i / kc;
      const uint k = i - m * kc;
      T v = T(0.0f);
      if (m < nrows) {
#ifdef SWITCH_GLU_FAULT_TOKEN_SHIFT
        const uint token = order[row0 + m] / p.top_k + 1;
#else
        const uint token = order[row0 + m] / p.top_k;
#endif
        v = x[ulong(token) * p.D + k0 + k];
      }
      xs[m * stride + k] = v;
    }
#ifndef SWITCH_GLU_FAULT_NO_X_BARRIER
    threadgroup_barrier(mem_flags::mem_threadgroup);
#endif
    if (active && vector_k) {
      for (uint k = lane * V; k < kc; k += SWITCH_SIMD * V) {
        uint4 gv[SWITCH_COLS];
        uint4 uv[SWITCH_COLS];
        for (uint c = 0; c < SWITCH_COLS; ++c) {
          gv[c] = *(device const uint4*)(grow[c] + k0 + k);
          uv[c] = *(device const uint4*)(urow[c] + k0 + k);
        }
        for (int m = 0; m < BM; ++m) {
          if (uint(m) >= nrows) {
            break;  // uniform: the staged rows past the expert's are zeros
          }
          const uint4 xv = *(threadgroup const uint4*)(xs + m * stride + k);
          for (uint c = 0; c < SWITCH_COLS; ++c) {
            ga[m][c] += switch_dot16<T>(gv[c], xv);
            ua[m][c] += switch_dot16<T>(uv[c], xv);
          }
        }
      }
    } else if (active) {
      for (uint k = lane; k < kc; k += SWITCH_SIMD) {
        float gv[SWITCH_COLS];
        float uv[SWITCH_COLS];
        for (uint c = 0; c < SWITCH_COLS; ++c) {
          gv[c] = float(grow[c][k0 + k]);
          uv[c] = float(urow[c][k0 + k]);
        }
        for (int m = 0; m < BM; ++m) {
          if (uint(m) >= nrows) {
            break;  // uniform: the staged rows past the expert's are zeros
          }
          const float xv = float(xs[m * stride + k]);
          for (uint c = 0; c < SWITCH_COLS; ++c) {
            ga[m][c] = fma(gv[c], xv, ga[m][c]);
            ua[m][c] = fma(uv[c], xv, ua[m][c]);
          }
        }
      }
    }
    if (k0 + stride < p.D) {
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
    for (uint c = 0; c < SWITCH_COLS; ++c) {
      const uint n = h0 + c;
      if (n >= p.H) {
        break;
      }
      const float g = simd_sum(ga[m][c]);
      const float u = simd_sum(ua[m][c]);
      if (lane == (uint(m) * SWITCH_COLS + c) % SWITCH_SIMD) {
        const float h = g / (1.0f + exp(-g)) * u;
        hidden[ulong(row0 + m) * p.H + n] = T(h);
      }
    }
  }
}

// ---------------------------------------------------------------- down
// Shared body of the two down kernels. SCORES: out [T, D] = the score-
// weighted sum over a token's slots, accumulated in tacc [T][32] (float,
// threadgroup(1)); otherwise out [T * k, D] per slot (scores, tacc unused).
template <typename T, int BM, bool SCORES>
inline void moe_down_decode_body(
    device const T* hidden,
    device const T* down,
    device const uint* order,
    device const uint* offsets,
    device const float* scores,
    device T* out,
    constant SwitchGluParams& p,
    threadgroup T* hs,
    threadgroup float* tacc,
    uint tgx,
    uint tid,
    uint ntid,
    uint sg,
    uint nsg,
    uint lane) {
  constexpr uint V = 16 / sizeof(T);
  const uint bn = nsg * SWITCH_COLS;                 // columns per threadgroup
  const uint n0 = (tgx * nsg + sg) * SWITCH_COLS;   // this simdgroup's first output column
  const bool active = n0 < p.D;                      // uniform per simdgroup
  const bool vector_k = (p.H % V) == 0;
  const uint stride = p.h_chunk;
  // Lane c < SWITCH_COLS owns column n0 + c: the only thread that touches
  // its accumulators.
  const bool owner = lane < SWITCH_COLS && n0 + lane < p.D;
  const uint tcol = sg * SWITCH_COLS + lane;

  if (SCORES && owner) {
    for (uint t = 0; t < p.tokens; ++t) {
      tacc[t * bn + tcol] = 0.0f;
    }
  }

  for (uint e = 0; e < p.num_experts; ++e) {
    const uint row_end = offsets[e + 1];
    // Uniform over the threadgroup: every thread sees the same offsets.
    for (uint r0 = offsets[e]; r0 < row_end; r0 += BM) {
      const uint nrows = min(uint(BM), row_end - r0);
      device const T* drow[SWITCH_COLS];
      for (uint c = 0; c < SWITCH_COLS; ++c) {
        drow[c] = down + (ulong(e) * p.D + min(n0 + c, p.D - 1)) * p.H;
      }
      float acc[BM][SWITCH_COLS];
      for (int m = 0; m < BM; ++m) {
        for (uint c = 0; c < SWITCH_COLS; ++c) {
          acc[m][c] = 0.0f;
        }
      }
      for (uint k0 = 0; k0 < p.H; k0 += stride) {
        const uint kc = min(stride, p.H - k0);
        for (uint i = tid; i < uint(BM) * kc; i += ntid) {
          const uint m = i / kc;
          const uint k = i - m * kc;
          hs[m * stride + k] = m < nrows ? hidden[ulong(r0 + m) * p.H + k0 + k] : T(0.0f);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (active && vector_k) {
          for (uint k = lane * V; k < kc; k += SWITCH_SIMD * V) {
            uint4 wv[SWITCH_COLS];
            for (uint c = 0; c < SWITCH_COLS; ++c) {
              wv[c] = *(device const uint4*)(drow[c] + k0 + k);
            }
            for (int m = 0; m < BM; ++m) {
              if (uint(m) >= nrows) {
                break;  // uniform: the staged rows past the expert's are zeros
              }
              const uint4 hv = *(threadgroup const uint4*)(hs + m * stride + k);
              for (uint c = 0; c < SWITCH_COLS; ++c) {
                acc[m][c] += switch_dot16<T>(wv[c], hv);
              }
            }
          }
        } else if (active) {
          for (uint k = lane; k < kc; k += SWITCH_SIMD) {
            float wv[SWITCH_COLS];
            for (uint c = 0; c < SWITCH_COLS; ++c) {
              wv[c] = float(drow[c][k0 + k]);
            }
            for (int m = 0; m < BM; ++m) {
              if (uint(m) >= nrows) {
                break;  // uniform: the staged rows past the expert's are zeros
              }
              const float hv = float(hs[m * stride + k]);
              for (uint c = 0; c < SWITCH_COLS; ++c) {
                acc[m][c] = fma(wv[c], hv, acc[m][c]);
              }
            }
          }
        }
#ifndef SWITCH_GLU_FAULT_NO_H_BARRIER
        threadgroup_barrier(mem_flags::mem_threadgroup);  // before hs is overwritten
#endif
      }
      if (active) {
        for (int m = 0; m < BM; ++m) {
          if (uint(m) >= nrows) {
            break;
          }
          const uint slot = order[r0 + m];
          for (uint c = 0; c < SWITCH_COLS; ++c) {
            const uint n = n0 + c;
            if (n >= p.D) {
              break;
            }
            const float s = simd_sum(acc[m][c]);
            if (lane == c) {
              if (SCORES) {
                tacc[(slot / p.top_k) * bn + tcol] += scores[slot] * s;
              } else {
                out[ulong(slot) * p.D + n] = T(s);
              }
            }
          }
        }
      }
    }
  }

  if (SCORES && owner) {
    for (uint t = 0; t < p.tokens; ++t) {
      out[ulong(t) * p.D + n0 + lane] = T(tacc[t * bn + tcol]);
    }
  }
}

// Buffers: 0 hidden, 1 down, 2 order, 3 offsets, 4 out [T, D], 5 params,
// 6 scores (float32 [T * k]); threadgroup(0): hs [BM][h_chunk] of T,
// threadgroup(1): tacc [T][32] float.
template <typename T, int BM>
[[kernel]] void moe_down_combine_decode(
    device const T* hidden [[buffer(0)]],
    device const T* down [[buffer(1)]],
    device const uint* order [[buffer(2)]],
    device const uint* offsets [[buffer(3)]],
    device T* out [[buffer(4)]],
    constant SwitchGluParams& p [[buffer(5)]],
    device const float* scores [[buffer(6)]],
    threadgroup T* hs [[threadgroup(0)]],
    threadgroup float* tacc [[threadgroup(1)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint ntid [[threads_per_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  moe_down_decode_body<T, BM, true>(
      hidden, down, order, offsets, scores, out, p, hs, tacc, tg.x, tid, ntid, sg, nsg, lane);
}

// Buffers: 0 hidden, 1 down, 2 order, 3 offsets, 4 out [T * k, D] (slot
// order), 5 params; threadgroup(0): hs [BM][h_chunk] of T.
template <typename T, int BM>
[[kernel]] void moe_down_slots_decode(
    device const T* hidden [[buffer(0)]],
    device const T* down [[buffer(1)]],
    device const uint* order [[buffer(2)]],
    device const uint* offsets [[buffer(3)]],
    device T* out [[buffer(4)]],
    constant SwitchGluParams& p [[buffer(5)]],
    threadgroup T* hs [[threadgroup(0)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint ntid [[threads_per_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  moe_down_decode_body<T, BM, false>(
      hidden, down, order, offsets, (device const float*)nullptr, out, p, hs,
      (threadgroup float*)nullptr, tg.x, tid, ntid, sg, nsg, lane);
}

// ------------------------------------------------------------- prefill
// Many rows per expert (> 8): compute bound, simdgroup_matrix<float, 8, 8>
// multiply-accumulate. PREFILL_THREADS threads = 4 simdgroups (2 x 2); a
// threadgroup owns a BM x BN output tile of one expert (row tile tg.z of the
// expert's sorted rows, column tile tg.x), each simdgroup a (BM/2) x (BN/2)
// part of it. K is staged PREFILL_BK at a time in float threadgroup memory
// (zeros past the rows / columns / K), weight tiles are read transposed by
// simdgroup_load. Partial tiles are stored through threadgroup memory with a
// bound check per element.
constant constexpr uint SWITCH_PREFILL_THREADS = 128;
constant constexpr uint SWITCH_PREFILL_BK = 16;

// gate_up prefill. Grid (ceil(H / BN), E, ceil(max rows / BM)).
// Buffers as the decode kernel; threadgroup(0) smem, float: during the K loop
// xs [BM][BK], gs [BN][BK], us [BN][BK]; after it g [BM][BN], u [BM][BN].
template <typename T, int BM, int BN>
[[kernel]] void moe_gate_up_swiglu_prefill(
    device const T* x [[buffer(0)]],
    device const T* gate [[buffer(1)]],
    device const T* up [[buffer(2)]],
    device const uint* order [[buffer(3)]],
    device const uint* offsets [[buffer(4)]],
    device T* hidden [[buffer(5)]],
    constant SwitchGluParams& p [[buffer(6)]],
    threadgroup float* smem [[threadgroup(0)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  constexpr uint BK = SWITCH_PREFILL_BK;
  constexpr int SM = BM / 2, SN = BN / 2;
  constexpr int TM = SM / 8, TN = SN / 8;
  const uint e = tg.y;
  const uint row0 = offsets[e] + tg.z * BM;
  const uint row_end = offsets[e + 1];
  if (row0 >= row_end) {
    return;  // no rows for this expert (or row tile): the whole threadgroup leaves
  }
  const uint nrows = min(uint(BM), row_end - row0);
  const uint n0 = tg.x * BN;
  device const T* gexp = gate + ulong(e) * p.H * p.D;
  device const T* uexp = up + ulong(e) * p.H * p.D;
  threadgroup float* xs = smem;                // [BM][BK]
  threadgroup float* gs = smem + BM * BK;      // [BN][BK]
  threadgroup float* us = gs + BN * BK;        // [BN][BK]
  const uint sm = (sg / 2) * SM;
  const uint sn = (sg % 2) * SN;

  simdgroup_matrix<float, 8, 8> gacc[TM][TN];
  simdgroup_matrix<float, 8, 8> uacc[TM][TN];
  for (int i = 0; i < TM; ++i) {
    for (int j = 0; j < TN; ++j) {
      gacc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      uacc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
  }

  for (uint k0 = 0; k0 < p.D; k0 += BK) {
    for (uint i = tid; i < BM * BK; i += SWITCH_PREFILL_THREADS) {
      const uint m = i / BK, k = k0 + i % BK;
      float v = 0.0f;
      if (m < nrows && k < p.D) {
        const uint token = order[row0 + m] / p.top_k;
        v = float(x[ulong(token) * p.D + k]);
      }
      xs[i] = v;
    }
    for (uint i = tid; i < BN * BK; i += SWITCH_PREFILL_THREADS) {
      const uint n = n0 + i / BK, k = k0 + i % BK;
      const bool in = n < p.H && k < p.D;
      gs[i] = in ? float(gexp[ulong(n) * p.D + k]) : 0.0f;
      us[i] = in ? float(uexp[ulong(n) * p.D + k]) : 0.0f;
    }
#ifndef SWITCH_GLU_FAULT_PREFILL_NO_STAGE_BARRIER
    threadgroup_barrier(mem_flags::mem_threadgroup);
#endif
    for (uint kk = 0; kk < BK; kk += 8) {
      simdgroup_matrix<float, 8, 8> a[TM];
      simdgroup_matrix<float, 8, 8> bg[TN];
      simdgroup_matrix<float, 8, 8> bu[TN];
      for (int i = 0; i < TM; ++i) {
        simdgroup_load(a[i], xs + (sm + 8 * i) * BK + kk, BK);
      }
      for (int j = 0; j < TN; ++j) {
        simdgroup_load(bg[j], gs + (sn + 8 * j) * BK + kk, BK, ulong2(0, 0), true);
        simdgroup_load(bu[j], us + (sn + 8 * j) * BK + kk, BK, ulong2(0, 0), true);
      }
      for (int i = 0; i < TM; ++i) {
        for (int j = 0; j < TN; ++j) {
          simdgroup_multiply_accumulate(gacc[i][j], a[i], bg[j], gacc[i][j]);
          simdgroup_multiply_accumulate(uacc[i][j], a[i], bu[j], uacc[i][j]);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // before the tiles are overwritten
  }

  threadgroup float* gt = smem;            // [BM][BN]
  threadgroup float* ut = smem + BM * BN;  // [BM][BN]
  for (int i = 0; i < TM; ++i) {
    for (int j = 0; j < TN; ++j) {
      simdgroup_store(gacc[i][j], gt + (sm + 8 * i) * BN + sn + 8 * j, BN);
      simdgroup_store(uacc[i][j], ut + (sm + 8 * i) * BN + sn + 8 * j, BN);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint i = tid; i < nrows * BN; i += SWITCH_PREFILL_THREADS) {
    const uint m = i / BN, n = n0 + i % BN;
    if (n < p.H) {
      const float g = gt[i];
      const float u = ut[i];
      hidden[ulong(row0 + m) * p.H + n] = T(g / (1.0f + exp(-g)) * u);
    }
  }
}

// down prefill. Grid (ceil(D / BN), E, ceil(max rows / BM)). The hidden rows
// of an expert are contiguous in sorted order. Without SCORES the tile's rows
// go to out [T * k, D] at their slots (slot order). With SCORES there is no
// way to sum a token's k slots inside one threadgroup (they belong to
// different experts, i.e. threadgroups), and no float atomics: each sorted
// row is written, scaled by its slot's score, to the float32 scratch
// [T * k, D] at its SLOT (row order[i]), so a token's k rows are adjacent;
// moe_combine_slots then sums them in j order (deterministic).
// threadgroup(0) smem, float: hs [BM][BK] + ws [BN][BK] in the K loop, the
// output tile [BM][BN] after it.
template <typename T, int BM, int BN, bool SCORES>
inline void moe_down_prefill_body(
    device const T* hidden,
    device const T* down,
    device const uint* order,
    device const uint* offsets,
    device const float* scores,
    device T* out,
    device float* scratch,
    constant SwitchGluParams& p,
    threadgroup float* smem,
    uint3 tg,
    uint tid,
    uint sg) {
  constexpr uint BK = SWITCH_PREFILL_BK;
  constexpr int SM = BM / 2, SN = BN / 2;
  constexpr int TM = SM / 8, TN = SN / 8;
  const uint e = tg.y;
  const uint row0 = offsets[e] + tg.z * BM;
  const uint row_end = offsets[e + 1];
  if (row0 >= row_end) {
    return;
  }
  const uint nrows = min(uint(BM), row_end - row0);
  const uint n0 = tg.x * BN;
  device const T* wexp = down + ulong(e) * p.D * p.H;
  threadgroup float* hs = smem;            // [BM][BK]
  threadgroup float* ws = smem + BM * BK;  // [BN][BK]
  const uint sm = (sg / 2) * SM;
  const uint sn = (sg % 2) * SN;

  simdgroup_matrix<float, 8, 8> acc[TM][TN];
  for (int i = 0; i < TM; ++i) {
    for (int j = 0; j < TN; ++j) {
      acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
  }
  for (uint k0 = 0; k0 < p.H; k0 += BK) {
    for (uint i = tid; i < BM * BK; i += SWITCH_PREFILL_THREADS) {
      const uint m = i / BK, k = k0 + i % BK;
      hs[i] = (m < nrows && k < p.H) ? float(hidden[ulong(row0 + m) * p.H + k]) : 0.0f;
    }
    for (uint i = tid; i < BN * BK; i += SWITCH_PREFILL_THREADS) {
      const uint n = n0 + i / BK, k = k0 + i % BK;
      ws[i] = (n < p.D && k < p.H) ? float(wexp[ulong(n) * p.H + k]) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint kk = 0; kk < BK; kk += 8) {
      simdgroup_matrix<float, 8, 8> a[TM];
      simdgroup_matrix<float, 8, 8> b[TN];
      for (int i = 0; i < TM; ++i) {
        simdgroup_load(a[i], hs + (sm + 8 * i) * BK + kk, BK);
      }
      for (int j = 0; j < TN; ++j) {
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
  for (uint i = tid; i < nrows * BN; i += SWITCH_PREFILL_THREADS) {
    const uint m = i / BN, n = n0 + i % BN;
    if (n < p.D) {
      const uint slot = order[row0 + m];
      if (SCORES) {
        scratch[ulong(slot) * p.D + n] = scores[slot] * smem[i];
      } else {
        out[ulong(slot) * p.D + n] = T(smem[i]);
      }
    }
  }
}

// Buffers: 0 hidden, 1 down, 2 order, 3 offsets, 4 out [T * k, D] (slot
// order), 5 params.
template <typename T, int BM, int BN>
[[kernel]] void moe_down_slots_prefill(
    device const T* hidden [[buffer(0)]],
    device const T* down [[buffer(1)]],
    device const uint* order [[buffer(2)]],
    device const uint* offsets [[buffer(3)]],
    device T* out [[buffer(4)]],
    constant SwitchGluParams& p [[buffer(5)]],
    threadgroup float* smem [[threadgroup(0)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  moe_down_prefill_body<T, BM, BN, false>(
      hidden, down, order, offsets, (device const float*)nullptr, out, (device float*)nullptr, p, smem,
      tg, tid, sg);
}

// Buffers: 0 hidden, 1 down, 2 order, 3 offsets, 4 scratch (float32
// [T * k, D], slot order, scaled by the scores), 5 params, 6 scores
// (float32 [T * k]). Then moe_combine_slots.
template <typename T, int BM, int BN>
[[kernel]] void moe_down_scaled_prefill(
    device const T* hidden [[buffer(0)]],
    device const T* down [[buffer(1)]],
    device const uint* order [[buffer(2)]],
    device const uint* offsets [[buffer(3)]],
    device float* scratch [[buffer(4)]],
    constant SwitchGluParams& p [[buffer(5)]],
    device const float* scores [[buffer(6)]],
    threadgroup float* smem [[threadgroup(0)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  moe_down_prefill_body<T, BM, BN, true>(
      hidden, down, order, offsets, scores, (device T*)nullptr, scratch, p, smem, tg, tid, sg);
}

// out[t, n] = sum_j scratch[t * k + j, n] (float, j order), rounded once to T.
// Buffers: 0 scratch (float32 [T * k, D]), 1 out [T, D], 2 params.
// Grid (ceil(T * D / 256), 1, 1), 256 threads: one output element per thread.
template <typename T>
[[kernel]] void moe_combine_slots(
    device const float* scratch [[buffer(0)]],
    device T* out [[buffer(1)]],
    constant SwitchGluParams& p [[buffer(2)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint ntid [[threads_per_threadgroup]]) {
  const uint i = tg.x * ntid + tid;
  if (i >= p.tokens * p.D) {
    return;
  }
  const uint t = i / p.D, n = i - t * p.D;
  float s = 0.0f;
  for (uint j = 0; j < p.top_k; ++j) {
    s += scratch[(ulong(t) * p.top_k + j) * p.D + n];
  }
  out[i] = T(s);
}

// -------------------------------------------------------- instantiations
// Names: moe_{gate_up_swiglu,down_combine,down_slots}_decode_{type}_bm{BM}
// (plan_switch_glu builds the same names).
#define instantiate_switch_glu_kernel(name, tname, T, bm) \
  template [[host_name(#name "_" #tname "_bm" #bm)]] [[kernel]] \
  decltype(name<T, bm>) name<T, bm>;

#define instantiate_switch_glu(tname, T, bm)                            \
  instantiate_switch_glu_kernel(moe_gate_up_swiglu_decode, tname, T, bm) \
  instantiate_switch_glu_kernel(moe_down_combine_decode, tname, T, bm)   \
  instantiate_switch_glu_kernel(moe_down_slots_decode, tname, T, bm)

#define instantiate_switch_glu_type(tname, T) \
  instantiate_switch_glu(tname, T, 1)         \
  instantiate_switch_glu(tname, T, 2)         \
  instantiate_switch_glu(tname, T, 4)         \
  instantiate_switch_glu(tname, T, 8)

instantiate_switch_glu_type(float, float)
instantiate_switch_glu_type(half, half)
instantiate_switch_glu_type(bfloat, bfloat)

// Prefill (plan_switch_glu builds the same names; one literal each).
#define instantiate_switch_glu_prefill(tname, T)                                              \
  template [[host_name("moe_gate_up_swiglu_prefill_" tname "_bm32_bn32")]] [[kernel]]        \
  decltype(moe_gate_up_swiglu_prefill<T, 32, 32>) moe_gate_up_swiglu_prefill<T, 32, 32>;     \
  template [[host_name("moe_down_slots_prefill_" tname "_bm32_bn32")]] [[kernel]]            \
  decltype(moe_down_slots_prefill<T, 32, 32>) moe_down_slots_prefill<T, 32, 32>;             \
  template [[host_name("moe_down_scaled_prefill_" tname "_bm32_bn32")]] [[kernel]]           \
  decltype(moe_down_scaled_prefill<T, 32, 32>) moe_down_scaled_prefill<T, 32, 32>;           \
  template [[host_name("moe_combine_slots_" tname)]] [[kernel]]                               \
  decltype(moe_combine_slots<T>) moe_combine_slots<T>;

instantiate_switch_glu_prefill("float", float)
instantiate_switch_glu_prefill("half", half)
instantiate_switch_glu_prefill("bfloat", bfloat)
