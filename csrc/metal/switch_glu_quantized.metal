// The fused SwitchGLU with quantized expert weights on Apple GPUs, decode
// path (a few rows per expert; at most 128 tokens with scores):
//
//   hidden[i] = silu(x[t_i] @ dq(gate[e])^T) * (x[t_i] @ dq(up[e])^T)   (gate_up launch)
//   out[t]    = sum_j scores[t, j] * (hidden[i(t, j)] @ dq(down[e])^T)   (down launch)
//
// The layout and the launches are those of switch_glu.metal's decode
// kernels (routing by order/offsets, hidden in sorted order, the down launch
// owning 32 output columns over all experts so a token's k slots are summed
// in threadgroup memory without atomics), with the weights read as
// gather_qmm.metal's decode kernel reads them (quantized_block.h): each lane
// takes one 32-element block per step and column, decodes the codes in
// registers and applies the group's scale and bias as s * sum(q x) + b *
// sum(x). gate and up are read in the same K loop. Packed gate/up [E, H,
// D * bits / 32], down [E, D, H * bits / 32] uint32; scales/biases in T
// (affine) or E8M0 bytes (mxfp4, no biases). Launches from
// plan_switch_glu_quantized (switch_glu_quantized_plan.cpp); BM is 1 or 8
// (rows past an expert's are skipped, so one 8-row tile serves 2-8 rows);
// an expert with more rows takes several tiles, each a pass over its weights
// (correct for any count, fast while the counts stay small: the plan keeps
// larger calls for the composition on gather_qmm's prefill kernel).
//
// Fault toggles (tests only; each must make the simulator tests fail):
//   SWITCH_GLU_Q_FAULT_NO_X_BARRIER   gate_up: no barrier after staging x
//   SWITCH_GLU_Q_FAULT_NO_H_BARRIER   down: no barrier before the hidden stage is overwritten
//   SWITCH_GLU_Q_FAULT_UP_SCALES      gate_up: up dequantized with gate's scales
//   SWITCH_GLU_Q_FAULT_NO_TILE_BARRIER gate_up: no barrier between row tiles
#include <metal_stdlib>

#include "quantized_block.h"
#include "switch_glu_quantized_params.h"

using namespace metal;

// Scale and bias of scale/bias index g (mxfp4: the E8M0 scale, no bias).
template <typename T, bool FP4>
inline float2 sgq_scale_bias(device const uchar* scales, device const T* biases, ulong g) {
  if (FP4) {
    return float2(qmm_e8m0(scales[g]), 0.0f);
  }
  return float2(float(((device const T*)scales)[g]), float(biases[g]));
}

// One staged row's block (32 elements of threadgroup memory) as floats and their sum.
template <typename T>
inline float sgq_load_x(threadgroup const T* xr, thread float (&xv)[QMM_BLOCK]) {
  float xsum = 0.0f;
  for (uint j = 0; j < QMM_BLOCK; ++j) {
    xv[j] = float(xr[j]);
    xsum += xv[j];
  }
  return xsum;
}

// sum_j w_j x_j over one block, w = s q + b: s * sum(q x) + b * sum(x).
template <int BITS, bool FP4>
inline float sgq_block_dot(thread const uint (&wd)[BITS], thread const float (&xv)[QMM_BLOCK], float xsum, float2 sb) {
  float qdot = 0.0f;
  for (uint j = 0; j < QMM_BLOCK; ++j) {
    const uint q = qmm_code<BITS>(wd, j);
    qdot = fma(FP4 ? QMM_E2M1[q] : float(q), xv[j], qdot);
  }
  return fma(sb.x, qdot, sb.y * xsum);
}

// ------------------------------------------------------------- gate_up
// Grid (ceil(H / 32), E, 1), 256 threads. Buffers: 0 x, 1 gate codes,
// 2 gate scales, 3 gate biases, 4 up codes, 5 up scales, 6 up biases,
// 7 order, 8 offsets, 9 hidden, 10 params; threadgroup(0): xs [BM][d_chunk] of T.
template <typename T, int BM, int BITS, bool FP4>
[[kernel]] void moe_gate_up_swiglu_quantized_decode(
    device const T* x [[buffer(0)]],
    device const uint* gate [[buffer(1)]],
    device const uchar* gate_scales [[buffer(2)]],
    device const T* gate_biases [[buffer(3)]],
    device const uint* up [[buffer(4)]],
    device const uchar* up_scales [[buffer(5)]],
    device const T* up_biases [[buffer(6)]],
    device const uint* order [[buffer(7)]],
    device const uint* offsets [[buffer(8)]],
    device T* hidden [[buffer(9)]],
    constant SwitchGluQuantizedParams& p [[buffer(10)]],
    threadgroup T* xs [[threadgroup(0)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint ntid [[threads_per_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  const uint e = tg.y;
  const uint row_begin = offsets[e];
  const uint row_end = offsets[e + 1];
  if (row_begin >= row_end) {
    return;  // no rows for this expert: the whole threadgroup leaves
  }
  const uint h0 = (tg.x * nsg + sg) * QMM_COLS;  // this simdgroup's first hidden column
  const bool active = h0 < p.H;                  // uniform per simdgroup
  const uint stride = p.d_chunk;
  const uint row_words = p.D / QMM_BLOCK * BITS;
  const uint groups = p.D / p.group_size;

  // Columns past H use row H - 1 (valid memory, never stored).
  device const uint* grow[QMM_COLS];
  device const uint* urow[QMM_COLS];
  ulong srow[QMM_COLS];
  for (uint c = 0; c < QMM_COLS; ++c) {
    const ulong r = ulong(e) * p.H + min(h0 + c, p.H - 1);
    grow[c] = gate + r * row_words;
    urow[c] = up + r * row_words;
    srow[c] = r * groups;
  }

  // One pass over the weights per tile of BM rows (a decode step has one).
  for (uint row0 = row_begin; row0 < row_end; row0 += BM) {
    const uint nrows = min(uint(BM), row_end - row0);
    float ga[BM][QMM_COLS];
    float ua[BM][QMM_COLS];
    for (int m = 0; m < BM; ++m) {
      for (uint c = 0; c < QMM_COLS; ++c) {
        ga[m][c] = 0.0f;
        ua[m][c] = 0.0f;
      }
    }

    for (uint k0 = 0; k0 < p.D; k0 += stride) {
      const uint kc = min(stride, p.D - k0);  // a multiple of 32
      // Stage x[token of sorted row row0 + m, k0 .. k0 + kc) (zeros past the expert's rows).
      for (uint i = tid; i < uint(BM) * kc; i += ntid) {
        const uint m = i / kc;
        const uint k = i - m * kc;
        xs[m * stride + k] = m < nrows ? x[ulong(order[row0 + m] / p.top_k) * p.D + k0 + k] : T(0.0f);
      }
#ifndef SWITCH_GLU_Q_FAULT_NO_X_BARRIER
      threadgroup_barrier(mem_flags::mem_threadgroup);
#endif
      if (active) {
        for (uint k = lane * QMM_BLOCK; k < kc; k += QMM_SIMD_WIDTH * QMM_BLOCK) {
          const uint kg = k0 + k;
          const uint group = kg / p.group_size;
          uint gw[QMM_COLS][BITS];
          uint uw[QMM_COLS][BITS];
          float2 gsb[QMM_COLS];
          float2 usb[QMM_COLS];
          for (uint c = 0; c < QMM_COLS; ++c) {
            qmm_load_block<BITS>(grow[c] + kg / QMM_BLOCK * BITS, gw[c]);
            qmm_load_block<BITS>(urow[c] + kg / QMM_BLOCK * BITS, uw[c]);
            gsb[c] = sgq_scale_bias<T, FP4>(gate_scales, gate_biases, srow[c] + group);
#ifdef SWITCH_GLU_Q_FAULT_UP_SCALES
            usb[c] = sgq_scale_bias<T, FP4>(gate_scales, gate_biases, srow[c] + group);
#else
            usb[c] = sgq_scale_bias<T, FP4>(up_scales, up_biases, srow[c] + group);
#endif
          }
          for (int m = 0; m < BM; ++m) {
            if (uint(m) >= nrows) {
              break;  // uniform: the staged rows past the expert's are zeros
            }
            float xv[QMM_BLOCK];
            const float xsum = sgq_load_x<T>(xs + m * stride + k, xv);
            for (uint c = 0; c < QMM_COLS; ++c) {
              ga[m][c] += sgq_block_dot<BITS, FP4>(gw[c], xv, xsum, gsb[c]);
              ua[m][c] += sgq_block_dot<BITS, FP4>(uw[c], xv, xsum, usb[c]);
            }
          }
        }
      }
      if (k0 + stride < p.D) {
        threadgroup_barrier(mem_flags::mem_threadgroup);  // before xs is overwritten
      }
    }

    if (active) {
      for (int m = 0; m < BM; ++m) {
        if (uint(m) >= nrows) {
          break;
        }
        for (uint c = 0; c < QMM_COLS; ++c) {
          const uint n = h0 + c;
          if (n >= p.H) {
            break;
          }
          const float g = simd_sum(ga[m][c]);
          const float u = simd_sum(ua[m][c]);
          if (lane == (uint(m) * QMM_COLS + c) % QMM_SIMD_WIDTH) {
            hidden[ulong(row0 + m) * p.H + n] = T(g / (1.0f + exp(-g)) * u);
          }
        }
      }
    }
#ifndef SWITCH_GLU_Q_FAULT_NO_TILE_BARRIER
    if (row0 + BM < row_end) {
      threadgroup_barrier(mem_flags::mem_threadgroup);  // before the next tile's x overwrites xs
    }
#endif
  }
}

// ---------------------------------------------------------------- down
// Grid (ceil(D / 32), 1, 1), 256 threads: a threadgroup owns 32 output
// columns for all experts. SCORES: out [T, D], the score-weighted sum of a
// token's slots in tacc [T][32] (float, threadgroup(1)), each column's
// accumulators touched only by the lane that owns the column (no barrier);
// otherwise out [T * k, D] per slot.
template <typename T, int BM, int BITS, bool FP4, bool SCORES>
inline void moe_down_quantized_body(
    device const T* hidden,
    device const uint* down,
    device const uchar* scales,
    device const T* biases,
    device const uint* order,
    device const uint* offsets,
    device const float* scores,
    device T* out,
    constant SwitchGluQuantizedParams& p,
    threadgroup T* hs,
    threadgroup float* tacc,
    uint tgx,
    uint tid,
    uint ntid,
    uint sg,
    uint nsg,
    uint lane) {
  const uint bn = nsg * QMM_COLS;
  const uint n0 = (tgx * nsg + sg) * QMM_COLS;
  const bool active = n0 < p.D;
  const uint stride = p.h_chunk;
  const uint row_words = p.H / QMM_BLOCK * BITS;
  const uint groups = p.H / p.group_size;
  const bool owner = lane < QMM_COLS && n0 + lane < p.D;
  const uint tcol = sg * QMM_COLS + lane;

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
      device const uint* drow[QMM_COLS];
      ulong srow[QMM_COLS];
      for (uint c = 0; c < QMM_COLS; ++c) {
        const ulong r = ulong(e) * p.D + min(n0 + c, p.D - 1);
        drow[c] = down + r * row_words;
        srow[c] = r * groups;
      }
      float acc[BM][QMM_COLS];
      for (int m = 0; m < BM; ++m) {
        for (uint c = 0; c < QMM_COLS; ++c) {
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
        if (active) {
          for (uint k = lane * QMM_BLOCK; k < kc; k += QMM_SIMD_WIDTH * QMM_BLOCK) {
            const uint kg = k0 + k;
            const uint group = kg / p.group_size;
            uint dw[QMM_COLS][BITS];
            float2 sb[QMM_COLS];
            for (uint c = 0; c < QMM_COLS; ++c) {
              qmm_load_block<BITS>(drow[c] + kg / QMM_BLOCK * BITS, dw[c]);
              sb[c] = sgq_scale_bias<T, FP4>(scales, biases, srow[c] + group);
            }
            for (int m = 0; m < BM; ++m) {
              if (uint(m) >= nrows) {
                break;  // uniform
              }
              float xv[QMM_BLOCK];
              const float xsum = sgq_load_x<T>(hs + m * stride + k, xv);
              for (uint c = 0; c < QMM_COLS; ++c) {
                acc[m][c] += sgq_block_dot<BITS, FP4>(dw[c], xv, xsum, sb[c]);
              }
            }
          }
        }
#ifndef SWITCH_GLU_Q_FAULT_NO_H_BARRIER
        threadgroup_barrier(mem_flags::mem_threadgroup);  // before hs is overwritten
#endif
      }
      if (active) {
        for (int m = 0; m < BM; ++m) {
          if (uint(m) >= nrows) {
            break;
          }
          const uint slot = order[r0 + m];
          for (uint c = 0; c < QMM_COLS; ++c) {
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

// Buffers: 0 hidden, 1 down codes, 2 scales, 3 biases, 4 order, 5 offsets,
// 6 out [T, D], 7 params, 8 scores (float32 [T * k]); threadgroup(0):
// hs [BM][h_chunk] of T, threadgroup(1): tacc [T][32] float.
template <typename T, int BM, int BITS, bool FP4>
[[kernel]] void moe_down_combine_quantized_decode(
    device const T* hidden [[buffer(0)]],
    device const uint* down [[buffer(1)]],
    device const uchar* scales [[buffer(2)]],
    device const T* biases [[buffer(3)]],
    device const uint* order [[buffer(4)]],
    device const uint* offsets [[buffer(5)]],
    device T* out [[buffer(6)]],
    constant SwitchGluQuantizedParams& p [[buffer(7)]],
    device const float* scores [[buffer(8)]],
    threadgroup T* hs [[threadgroup(0)]],
    threadgroup float* tacc [[threadgroup(1)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint ntid [[threads_per_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  moe_down_quantized_body<T, BM, BITS, FP4, true>(
      hidden, down, scales, biases, order, offsets, scores, out, p, hs, tacc, tg.x, tid, ntid, sg, nsg, lane);
}

// Buffers: 0 hidden, 1 down codes, 2 scales, 3 biases, 4 order, 5 offsets,
// 6 out [T * k, D] (slot order), 7 params; threadgroup(0): hs [BM][h_chunk] of T.
template <typename T, int BM, int BITS, bool FP4>
[[kernel]] void moe_down_slots_quantized_decode(
    device const T* hidden [[buffer(0)]],
    device const uint* down [[buffer(1)]],
    device const uchar* scales [[buffer(2)]],
    device const T* biases [[buffer(3)]],
    device const uint* order [[buffer(4)]],
    device const uint* offsets [[buffer(5)]],
    device T* out [[buffer(6)]],
    constant SwitchGluQuantizedParams& p [[buffer(7)]],
    threadgroup T* hs [[threadgroup(0)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint ntid [[threads_per_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  moe_down_quantized_body<T, BM, BITS, FP4, false>(
      hidden, down, scales, biases, order, offsets, (device const float*)nullptr, out, p, hs,
      (threadgroup float*)nullptr, tg.x, tid, ntid, sg, nsg, lane);
}

// -------------------------------------------------------- instantiations
// {moe_gate_up_swiglu,moe_down_combine,moe_down_slots}_quantized_decode_{type}_{b2..b8,mxfp4}_bm{1,8}
// (plan_switch_glu_quantized builds the same names). Each name is one
// literal (the simulator's pre-pass reads host_name("...") as one string).
// Tests may build one variant only: SWITCH_GLU_Q_ONLY_VARIANT = the affine
// width, or 1 for mxfp4.
#define instantiate_sgq(fn, host, T, bm, bits, fp4) \
  template [[host_name(host)]] [[kernel]] decltype(fn<T, bm, bits, fp4>) fn<T, bm, bits, fp4>;
#if !defined(SWITCH_GLU_Q_ONLY_VARIANT) || SWITCH_GLU_Q_ONLY_VARIANT == 2
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_float_b2_bm1", float, 1, 2, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_float_b2_bm1", float, 1, 2, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_float_b2_bm1", float, 1, 2, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_float_b2_bm8", float, 8, 2, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_float_b2_bm8", float, 8, 2, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_float_b2_bm8", float, 8, 2, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_half_b2_bm1", half, 1, 2, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_half_b2_bm1", half, 1, 2, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_half_b2_bm1", half, 1, 2, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_half_b2_bm8", half, 8, 2, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_half_b2_bm8", half, 8, 2, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_half_b2_bm8", half, 8, 2, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_bfloat_b2_bm1", bfloat, 1, 2, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_bfloat_b2_bm1", bfloat, 1, 2, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_bfloat_b2_bm1", bfloat, 1, 2, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_bfloat_b2_bm8", bfloat, 8, 2, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_bfloat_b2_bm8", bfloat, 8, 2, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_bfloat_b2_bm8", bfloat, 8, 2, false)
#endif
#if !defined(SWITCH_GLU_Q_ONLY_VARIANT) || SWITCH_GLU_Q_ONLY_VARIANT == 3
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_float_b3_bm1", float, 1, 3, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_float_b3_bm1", float, 1, 3, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_float_b3_bm1", float, 1, 3, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_float_b3_bm8", float, 8, 3, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_float_b3_bm8", float, 8, 3, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_float_b3_bm8", float, 8, 3, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_half_b3_bm1", half, 1, 3, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_half_b3_bm1", half, 1, 3, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_half_b3_bm1", half, 1, 3, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_half_b3_bm8", half, 8, 3, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_half_b3_bm8", half, 8, 3, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_half_b3_bm8", half, 8, 3, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_bfloat_b3_bm1", bfloat, 1, 3, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_bfloat_b3_bm1", bfloat, 1, 3, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_bfloat_b3_bm1", bfloat, 1, 3, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_bfloat_b3_bm8", bfloat, 8, 3, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_bfloat_b3_bm8", bfloat, 8, 3, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_bfloat_b3_bm8", bfloat, 8, 3, false)
#endif
#if !defined(SWITCH_GLU_Q_ONLY_VARIANT) || SWITCH_GLU_Q_ONLY_VARIANT == 4
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_float_b4_bm1", float, 1, 4, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_float_b4_bm1", float, 1, 4, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_float_b4_bm1", float, 1, 4, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_float_b4_bm8", float, 8, 4, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_float_b4_bm8", float, 8, 4, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_float_b4_bm8", float, 8, 4, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_half_b4_bm1", half, 1, 4, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_half_b4_bm1", half, 1, 4, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_half_b4_bm1", half, 1, 4, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_half_b4_bm8", half, 8, 4, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_half_b4_bm8", half, 8, 4, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_half_b4_bm8", half, 8, 4, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_bfloat_b4_bm1", bfloat, 1, 4, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_bfloat_b4_bm1", bfloat, 1, 4, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_bfloat_b4_bm1", bfloat, 1, 4, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_bfloat_b4_bm8", bfloat, 8, 4, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_bfloat_b4_bm8", bfloat, 8, 4, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_bfloat_b4_bm8", bfloat, 8, 4, false)
#endif
#if !defined(SWITCH_GLU_Q_ONLY_VARIANT) || SWITCH_GLU_Q_ONLY_VARIANT == 5
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_float_b5_bm1", float, 1, 5, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_float_b5_bm1", float, 1, 5, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_float_b5_bm1", float, 1, 5, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_float_b5_bm8", float, 8, 5, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_float_b5_bm8", float, 8, 5, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_float_b5_bm8", float, 8, 5, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_half_b5_bm1", half, 1, 5, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_half_b5_bm1", half, 1, 5, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_half_b5_bm1", half, 1, 5, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_half_b5_bm8", half, 8, 5, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_half_b5_bm8", half, 8, 5, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_half_b5_bm8", half, 8, 5, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_bfloat_b5_bm1", bfloat, 1, 5, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_bfloat_b5_bm1", bfloat, 1, 5, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_bfloat_b5_bm1", bfloat, 1, 5, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_bfloat_b5_bm8", bfloat, 8, 5, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_bfloat_b5_bm8", bfloat, 8, 5, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_bfloat_b5_bm8", bfloat, 8, 5, false)
#endif
#if !defined(SWITCH_GLU_Q_ONLY_VARIANT) || SWITCH_GLU_Q_ONLY_VARIANT == 6
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_float_b6_bm1", float, 1, 6, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_float_b6_bm1", float, 1, 6, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_float_b6_bm1", float, 1, 6, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_float_b6_bm8", float, 8, 6, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_float_b6_bm8", float, 8, 6, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_float_b6_bm8", float, 8, 6, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_half_b6_bm1", half, 1, 6, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_half_b6_bm1", half, 1, 6, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_half_b6_bm1", half, 1, 6, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_half_b6_bm8", half, 8, 6, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_half_b6_bm8", half, 8, 6, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_half_b6_bm8", half, 8, 6, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_bfloat_b6_bm1", bfloat, 1, 6, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_bfloat_b6_bm1", bfloat, 1, 6, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_bfloat_b6_bm1", bfloat, 1, 6, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_bfloat_b6_bm8", bfloat, 8, 6, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_bfloat_b6_bm8", bfloat, 8, 6, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_bfloat_b6_bm8", bfloat, 8, 6, false)
#endif
#if !defined(SWITCH_GLU_Q_ONLY_VARIANT) || SWITCH_GLU_Q_ONLY_VARIANT == 8
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_float_b8_bm1", float, 1, 8, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_float_b8_bm1", float, 1, 8, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_float_b8_bm1", float, 1, 8, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_float_b8_bm8", float, 8, 8, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_float_b8_bm8", float, 8, 8, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_float_b8_bm8", float, 8, 8, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_half_b8_bm1", half, 1, 8, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_half_b8_bm1", half, 1, 8, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_half_b8_bm1", half, 1, 8, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_half_b8_bm8", half, 8, 8, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_half_b8_bm8", half, 8, 8, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_half_b8_bm8", half, 8, 8, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_bfloat_b8_bm1", bfloat, 1, 8, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_bfloat_b8_bm1", bfloat, 1, 8, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_bfloat_b8_bm1", bfloat, 1, 8, false)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_bfloat_b8_bm8", bfloat, 8, 8, false)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_bfloat_b8_bm8", bfloat, 8, 8, false)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_bfloat_b8_bm8", bfloat, 8, 8, false)
#endif
#if !defined(SWITCH_GLU_Q_ONLY_VARIANT) || SWITCH_GLU_Q_ONLY_VARIANT == 1
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_float_mxfp4_bm1", float, 1, 4, true)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_float_mxfp4_bm1", float, 1, 4, true)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_float_mxfp4_bm1", float, 1, 4, true)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_float_mxfp4_bm8", float, 8, 4, true)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_float_mxfp4_bm8", float, 8, 4, true)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_float_mxfp4_bm8", float, 8, 4, true)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_half_mxfp4_bm1", half, 1, 4, true)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_half_mxfp4_bm1", half, 1, 4, true)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_half_mxfp4_bm1", half, 1, 4, true)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_half_mxfp4_bm8", half, 8, 4, true)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_half_mxfp4_bm8", half, 8, 4, true)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_half_mxfp4_bm8", half, 8, 4, true)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_bfloat_mxfp4_bm1", bfloat, 1, 4, true)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_bfloat_mxfp4_bm1", bfloat, 1, 4, true)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_bfloat_mxfp4_bm1", bfloat, 1, 4, true)
instantiate_sgq(moe_gate_up_swiglu_quantized_decode, "moe_gate_up_swiglu_quantized_decode_bfloat_mxfp4_bm8", bfloat, 8, 4, true)
instantiate_sgq(moe_down_combine_quantized_decode, "moe_down_combine_quantized_decode_bfloat_mxfp4_bm8", bfloat, 8, 4, true)
instantiate_sgq(moe_down_slots_quantized_decode, "moe_down_slots_quantized_decode_bfloat_mxfp4_bm8", bfloat, 8, 4, true)
#endif
