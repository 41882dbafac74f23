// Quantized weights in the Metal kernels: mx.quantize's packing read one
// 32-element block at a time (gather_qmm.metal, switch_glu_quantized.metal).
// A weight row is a little-endian bit stream of BITS-bit codes; a block of
// 32 codes is BITS uint32 words and never spans two groups (group_size is a
// multiple of 32). Affine: w = scale * q + bias; mxfp4: w = e2m1(q) *
// 2^(scale - 127), scales E8M0 bytes. MSL only (included by .metal files).
#pragma once

#include <metal_stdlib>

using namespace metal;

constant constexpr uint QMM_SIMD_WIDTH = 32;
constant constexpr uint QMM_COLS = 4;    // output columns per simdgroup
constant constexpr uint QMM_BLOCK = 32;  // elements of K per lane per step

// The 16 values of a 4-bit e2m1 float (mxfp4). constexpr: this header is
// included by several .metal files linked into one metallib, so its
// program-scope constants must not be exported symbols.
constant constexpr float QMM_E2M1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// 2^(s - 127) for an E8M0 scale byte (255 is NaN).
inline float qmm_e8m0(uchar s) {
  if (s == 255) {
    return as_type<float>(0x7FC00000u);
  }
  return as_type<float>(s == 0 ? 0x00400000u : uint(s) << 23);
}

// The BITS words of one 32-element block, with the widest aligned loads:
// a block starts at a multiple of BITS words of the packed buffer.
template <int BITS>
inline void qmm_load_block(device const uint* p, thread uint (&wd)[BITS]) {
  if (BITS % 4 == 0) {
    for (int i = 0; i < BITS / 4; ++i) {
      const uint4 v = ((device const uint4*)p)[i];
      wd[4 * i] = v.x;
      wd[4 * i + 1] = v.y;
      wd[4 * i + 2] = v.z;
      wd[4 * i + 3] = v.w;
    }
  } else if (BITS % 2 == 0) {
    for (int i = 0; i < BITS / 2; ++i) {
      const uint2 v = ((device const uint2*)p)[i];
      wd[2 * i] = v.x;
      wd[2 * i + 1] = v.y;
    }
  } else {
    for (int i = 0; i < BITS; ++i) {
      wd[i] = p[i];
    }
  }
}

// Code j (0..31) of a block: bits [j * BITS, (j + 1) * BITS) of the words
// (j is a constant after unrolling, so this is a shift and a mask).
template <int BITS>
inline uint qmm_code(thread const uint (&wd)[BITS], int j) {
  const int bit = j * BITS;
  const int wi = bit >> 5;
  const int off = bit & 31;
  uint v = wd[wi] >> off;
  if (off + BITS > 32) {
    v |= wd[wi + 1] << (32 - off);
  }
  return v & ((1u << BITS) - 1u);
}
