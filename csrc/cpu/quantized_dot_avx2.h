// The direct quantized dot product for AVX2 CPUs (no AVX-512 BF16): 4-bit
// and 8-bit affine codes times half-precision (bfloat16 / float16)
// activations, for few activation rows (decoding).
//
// The generic kernel (quantized_dot.h) widens every code to a float lane
// and spends ~6 instructions per 8 weights: on AVX2 it is compute bound at
// a third of the memory's speed. Here the codes stay 16-bit integers and
// VPMADDWD multiplies 16 of them with 16-bit integer activations per
// instruction, summing pairs into exact int32 lanes:
//   - each activation row is rounded once per call to int16 per weight
//     group, x_k ~= d_g * i_k with d_g = max_k |x_k| / 32767 over the group
//     (error <= d_g / 2: 2^-16 of the group's largest magnitude, ~100x
//     finer than the bfloat16 rounding the activations already carry);
//   - per group, sum_k q_k i_k accumulates exactly in int32 (at most
//     128 * 255 * 32767 < 2^31), and
//     sum_k (s q_k + b) x_k ~= s * d_g * sum_k q_k i_k + b * X_g
//     with X_g = d_g * sum_k i_k, the sum of the rounded activations: the
//     result is then the exact product of the weights with the rounded
//     activations, error <= sum_k |w_k| d_g / 2. (With the float sum of
//     the activations instead, the error would be s * sum_k q_k e_k with
//     codes all >= 0: same-signed rounding errors, as a group's small
//     values next to an outlier make, would add up without cancelling.)
// 4-bit codes: 16 bytes hold 32 codes (byte j: elements 2j and 2j + 1 in
// its low and high nibble); widened to 16 int16 lanes, the even elements
// are `v & 15` and the odd ones `v >> 4`, so the activations are stored
// per 32-element block as [16 even | 16 odd] to match.
#pragma once

#if defined(MLX_MOE_SIMD_AVX2)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/quantized.h"
#include "cpu/simd.h"

namespace mlx_moe::cpu {
namespace {

inline bool int16_direct_supports(const QuantizedMatrices& q) {
  return q.mode == QuantizationMode::affine && (q.bits == 4 || q.bits == 8) && q.group_size % 32 == 0 &&
      q.group_size <= 128;
}

struct Int16Activations {
  std::vector<int16_t> values; // [rows, K]; interleaved: [even | odd] per 32
  std::vector<float> scales;   // [rows, groups]: d_g
  std::vector<float> sums;     // [rows, groups]: X_g = d_g * sum_k i_k
  // What was rounded: the raw rows and the format. A fused layer calls the
  // kernel once per (expert, column block) task with the same token rows;
  // comparing the bytes (a few KB) costs far less than rounding again.
  std::vector<char> source;
  int64_t rows = -1;
  int64_t K = -1;
  int group_size = -1;
  bool interleaved = false;
  size_t itemsize = 0;
};

// A thread's few most recent activation roundings. The combined down
// projection walks all experts of a call in every task, each expert with
// its own hidden row: with one remembered rounding, every task re-rounded
// every expert's row (32 tasks x 8 experts per layer at decode).
template <typename Rounding, int N = 16>
struct RecentRoundings {
  Rounding entries[N];
  int next = 0;

  // The first entry `matches` accepts, else null.
  template <typename Match>
  const Rounding* find(Match matches) const {
    for (const Rounding& entry : entries) {
      if (matches(entry)) {
        return &entry;
      }
    }
    return nullptr;
  }

  // The entry to overwrite next (the oldest).
  Rounding& take() {
    Rounding& entry = entries[next];
    next = (next + 1) % N;
    return entry;
  }
};

// Whether `source` holds these rows' bytes.
template <typename T>
inline bool same_rows(const std::vector<char>& source, const T* const* x_rows, int64_t rows, int64_t K) {
  const size_t row_bytes = static_cast<size_t>(K) * sizeof(T);
  if (source.size() < rows * row_bytes) {
    return false;
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (std::memcmp(source.data() + r * row_bytes, x_rows[r], row_bytes) != 0) {
      return false;
    }
  }
  return true;
}

// Roundings of at most kRecentRoundingRows rows (the direct kernels' calls)
// are kept in a RecentRoundings; larger ones (prompt blocks, megabytes
// each) in one entry of their own, so the memory kept per thread stays
// small.
constexpr int64_t kRecentRoundingRows = 16;

inline RecentRoundings<Int16Activations>& int16_roundings() {
  thread_local RecentRoundings<Int16Activations> recent;
  return recent;
}

inline RecentRoundings<Int16Activations, 1>& int16_large_rounding() {
  thread_local RecentRoundings<Int16Activations, 1> recent;
  return recent;
}

inline float horizontal_sum8(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  return _mm_cvtss_f32(half);
}

// 8 activations as float32 lanes.
template <typename T>
inline __m256 load8_as_float(const T* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same_v<T, Float16Bits>) {
    return _mm256_cvtph_ps(bits);
  } else {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
}

// One weight group of a contiguous activation row as float32 in `group`
// (32-byte aligned), with its largest magnitude and whether every value is
// finite (max_ps drops NaN lanes, so finiteness is judged on the sum, which
// every NaN or infinity reaches). Shared by the int16 and int8 rounding.
struct GroupPeak {
  float peak;
  bool finite;
};

template <typename T>
inline GroupPeak load_group(const T* x, int group_size, float* group) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 largest = _mm256_setzero_ps(), total = _mm256_setzero_ps();
  for (int j = 0; j < group_size; j += 8) {
    const __m256 v = load8_as_float(x + j);
    _mm256_store_ps(group + j, v);
    largest = _mm256_max_ps(largest, _mm256_and_ps(v, magnitude));
    total = _mm256_add_ps(total, v);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, largest);
  float peak = 0.0f;
  for (float lane : lanes) {
    peak = std::max(peak, lane);
  }
  return {peak, std::isfinite(horizontal_sum8(total)) && std::isfinite(peak)};
}

// The sum of 8 int32 lanes, in int64.
inline int64_t lane_sum(__m256i v) {
  int32_t lanes[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), v);
  int64_t sum = 0;
  for (int32_t lane : lanes) {
    sum += lane;
  }
  return sum;
}

// Within each 32-element block, [16 even elements | 16 odd elements] (the
// order of a 4-bit row's low and high nibbles), from two registers holding
// elements 0-15 and 16-31 in natural order.
inline void split_even_odd(__m256i& low, __m256i& high) {
  // Per 128-bit lane: the 4 even int16 into the low 8 bytes, the odd ones
  // into the high 8; then the lanes' halves regrouped.
  const __m256i gather = _mm256_setr_epi8(
      0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
      0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  const __m256i a = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(low, gather), 0xD8);
  const __m256i b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(high, gather), 0xD8);
  low = _mm256_permute2x128_si256(a, b, 0x20);  // evens of 0-15, evens of 16-31
  high = _mm256_permute2x128_si256(a, b, 0x31); // odds
}

// One contiguous row, 8 lanes at a time; INTERLEAVED: the 4-bit order
// (split_even_odd) instead of the natural one.
template <typename T, bool INTERLEAVED>
void round_row(const T* x, int64_t K, int group_size, int16_t* values, float* scales, float* sums) {
  alignas(32) float group[128];
  for (int64_t g = 0; g < K / group_size; ++g) {
    const GroupPeak range = load_group(x + g * group_size, group_size, group);
    const float inverse = (range.finite && range.peak > 0.0f) ? 32767.0f / range.peak : 0.0f;
    const float scale = range.finite ? range.peak / 32767.0f : std::numeric_limits<float>::quiet_NaN();
    scales[g] = scale;
    const __m256 factor = _mm256_set1_ps(inverse);
    __m256i rounded_total = _mm256_setzero_si256();
    __m256i packed[2];
    for (int j = 0; j < group_size; j += 16) {
      const __m256i low = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(group + j), factor));
      const __m256i high = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(group + j + 8), factor));
      rounded_total = _mm256_add_epi32(rounded_total, _mm256_add_epi32(low, high));
      // packs works per 128-bit half: restore the element order.
      packed[(j / 16) % 2] = _mm256_permute4x64_epi64(_mm256_packs_epi32(low, high), 0xD8);
      if (j % 32 == 16) {
        if constexpr (INTERLEAVED) {
          split_even_odd(packed[0], packed[1]);
        }
        int16_t* dst = values + g * group_size + j - 16;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), packed[0]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16), packed[1]);
      }
    }
    sums[g] = scale * static_cast<float>(lane_sum(rounded_total));
  }
}

template <typename T>
void round_activations(
    const T* const* x_rows, int64_t x_col_stride, int64_t rows, int64_t K, int group_size, bool interleaved,
    Int16Activations& s) {
  const int64_t groups = K / group_size;
  s.values.resize(rows * K);
  s.scales.resize(rows * groups);
  s.sums.resize(rows * groups);
  float group[128];
  for (int64_t r = 0; r < rows; ++r) {
    if (x_col_stride == 1) {
      auto* round = interleaved ? round_row<T, true> : round_row<T, false>;
      round(x_rows[r], K, group_size, s.values.data() + r * K, s.scales.data() + r * groups,
            s.sums.data() + r * groups);
      continue;
    }
    for (int64_t g = 0; g < groups; ++g) {
      float largest = 0.0f, sum = 0.0f;
      for (int j = 0; j < group_size; ++j) {
        group[j] = to_float(x_rows[r][(g * group_size + j) * x_col_stride]);
        largest = std::max(largest, std::fabs(group[j]));
        sum += group[j];
      }
      const bool finite = std::isfinite(sum) && std::isfinite(largest);
      const float inverse = (finite && largest > 0.0f) ? 32767.0f / largest : 0.0f;
      // A NaN or infinite activation makes the group's scale NaN, so the
      // output is NaN as an exact product would be.
      const float scale = finite ? largest / 32767.0f : std::numeric_limits<float>::quiet_NaN();
      s.scales[r * groups + g] = scale;
      int16_t* dst = s.values.data() + r * K + g * group_size;
      int64_t rounded_sum = 0;
      for (int b = 0; b < group_size; b += 32) {
        for (int i = 0; i < 32; ++i) {
          const int source = interleaved ? b + (i < 16 ? 2 * i : 2 * (i - 16) + 1) : b + i;
          dst[b + i] = static_cast<int16_t>(std::lrintf(group[source] * inverse));
          rounded_sum += dst[b + i];
        }
      }
      s.sums[r * groups + g] = scale * static_cast<float>(rounded_sum);
    }
  }
}

// The rows rounded as above, reusing the previous call's rounding on this
// thread when the rows and the format are the same.
template <typename T>
const Int16Activations& prepared_int16_activations(
    const T* const* x_rows, int64_t x_col_stride, int64_t rows, int64_t K, int group_size, bool interleaved) {
  const size_t row_bytes = static_cast<size_t>(K) * sizeof(T);
  auto matches = [&](const Int16Activations& x) {
    return x.rows == rows && x.K == K && x.group_size == group_size && x.interleaved == interleaved &&
        x.itemsize == sizeof(T) && same_rows(x.source, x_rows, rows, K);
  };
  const bool small = rows <= kRecentRoundingRows;
  if (x_col_stride == 1) {
    const Int16Activations* found = small ? int16_roundings().find(matches) : int16_large_rounding().find(matches);
    if (found) {
      return *found;
    }
  }
  Int16Activations& x = small ? int16_roundings().take() : int16_large_rounding().take();
  round_activations<T>(x_rows, x_col_stride, rows, K, group_size, interleaved, x);
  if (x_col_stride == 1) {
    x.source.resize(rows * row_bytes);
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(x.source.data() + r * row_bytes, x_rows[r], row_bytes);
    }
    x.rows = rows;
    x.K = K;
    x.group_size = group_size;
    x.interleaved = interleaved;
    x.itemsize = sizeof(T);
  } else {
    x.rows = -1;
  }
  return x;
}

// One tile: COLUMNS weight rows x ROWS activation rows.
template <int BITS, typename T, int COLUMNS, int ROWS>
inline void int16_direct_tile(
    const QuantizedRowRef* w,
    const Int16Activations& x,
    int64_t row0,
    int64_t K,
    int group_size,
    float* out,
    int64_t ldo,
    const QuantizedRowRef* next) {
  const int64_t groups = K / group_size;
  const __m256i low_nibble = _mm256_set1_epi16(0x0F);
  __m256 acc[COLUMNS][ROWS];
  float bias_terms[COLUMNS][ROWS] = {};
  for (int c = 0; c < COLUMNS; ++c) {
    for (int r = 0; r < ROWS; ++r) {
      acc[c][r] = _mm256_setzero_ps();
    }
  }
  const int16_t* xv[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    xv[r] = x.values.data() + (row0 + r) * K;
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m256i dots[COLUMNS][ROWS];
    for (int c = 0; c < COLUMNS; ++c) {
      for (int r = 0; r < ROWS; ++r) {
        dots[c][r] = _mm256_setzero_si256();
      }
    }
    for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 32) {
      if (next && k % 128 == 0) {
        for (int c = 0; c < COLUMNS; ++c) {
          prefetch(next[c].codes + k * BITS / 8);
        }
      }
      if constexpr (BITS == 4) {
        for (int c = 0; c < COLUMNS; ++c) {
          const __m256i bytes = _mm256_cvtepu8_epi16(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[c].codes + k / 2)));
          const __m256i even = _mm256_and_si256(bytes, low_nibble);
          const __m256i odd = _mm256_srli_epi16(bytes, 4);
          for (int r = 0; r < ROWS; ++r) {
            const __m256i x_even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xv[r] + k));
            const __m256i x_odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xv[r] + k + 16));
            dots[c][r] = _mm256_add_epi32(dots[c][r], _mm256_madd_epi16(even, x_even));
            dots[c][r] = _mm256_add_epi32(dots[c][r], _mm256_madd_epi16(odd, x_odd));
          }
        }
      } else {
        for (int half = 0; half < 32; half += 16) {
          for (int c = 0; c < COLUMNS; ++c) {
            const __m256i codes = _mm256_cvtepu8_epi16(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[c].codes + k + half)));
            for (int r = 0; r < ROWS; ++r) {
              const __m256i xs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xv[r] + k + half));
              dots[c][r] = _mm256_add_epi32(dots[c][r], _mm256_madd_epi16(codes, xs));
            }
          }
        }
      }
    }
    for (int c = 0; c < COLUMNS; ++c) {
      const float scale = to_float(static_cast<const T*>(w[c].scales)[g]);
      const float bias = to_float(static_cast<const T*>(w[c].biases)[g]);
      for (int r = 0; r < ROWS; ++r) {
        const int64_t at = (row0 + r) * groups + g;
        acc[c][r] = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(dots[c][r]), _mm256_set1_ps(scale * x.scales[at]), acc[c][r]);
        bias_terms[c][r] += bias * x.sums[at];
      }
    }
  }
  for (int c = 0; c < COLUMNS; ++c) {
    for (int r = 0; r < ROWS; ++r) {
      out[r * ldo + c] += horizontal_sum8(acc[c][r]) + bias_terms[c][r];
    }
  }
}

// Four consecutive values of the scales/biases dtype T as float lanes.
template <typename T>
inline __m128 load4_as_float(const T* p) {
  const __m128i bits = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same_v<T, Float16Bits>) {
    return _mm_cvtph_ps(bits);
  } else {
    return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(bits), 16));
  }
}

// The exact int32 dot of group g's codes with the activations (8 lanes).
template <int BITS, int GROUP>
inline __m256i group_dot(const uint8_t* codes, const int16_t* x, int64_t begin) {
  const __m256i low_nibble = _mm256_set1_epi16(0x0F);
  __m256i dot = _mm256_setzero_si256();
#pragma GCC unroll 4
  for (int64_t k = begin; k < begin + GROUP; k += 32) {
    if constexpr (BITS == 4) {
      const __m256i bytes =
          _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k / 2)));
      const __m256i x_even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
      const __m256i x_odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k + 16));
      dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_and_si256(bytes, low_nibble), x_even));
      dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_srli_epi16(bytes, 4), x_odd));
    } else {
      const __m256i low = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k)));
      const __m256i high =
          _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k + 16)));
      dot = _mm256_add_epi32(
          dot, _mm256_madd_epi16(low, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k))));
      dot = _mm256_add_epi32(
          dot, _mm256_madd_epi16(high, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k + 16))));
    }
  }
  return dot;
}

// One weight row times one activation row (decode), for any integer
// activation format: `group_dot(begin)` is the exact int32 dot (8 lanes) of
// the group starting at element `begin`. Four groups at a time: their int32
// dots are reduced together (3 horizontal adds for 4 groups), converted
// once and scaled by the 4 (weight scale x activation scale) products in
// one multiply-add; the bias terms are one dot product of the row's biases
// with the activations' group sums at the end. (Scaling each group on its
// own costs about as much as its dot product.) GROUP_BYTES: code bytes per
// group, for the prefetch of the row streaming next.
template <int GROUP, int GROUP_BYTES, typename T, typename GroupDot>
inline float integer_direct_single(
    const QuantizedRowRef& w, const float* x_scales, const float* x_sums, int64_t K,
    const uint8_t* prefetch_codes, GroupDot group_dot) {
  const int64_t groups = K / GROUP;
  const T* scales = static_cast<const T*>(w.scales);
  const T* biases = static_cast<const T*>(w.biases);
  const int64_t row_bytes = groups * GROUP_BYTES;
  __m128 acc = _mm_setzero_ps();
  __m128 bias_acc = _mm_setzero_ps();
  int64_t g = 0;
  for (; g + 4 <= groups; g += 4) {
    if (prefetch_codes) {
      const int64_t at = g * GROUP_BYTES;
      for (int64_t line = 0; line < 4 * GROUP_BYTES; line += 64) {
        if (at + line < row_bytes) {
          prefetch(prefetch_codes + at + line);
        }
      }
    }
    const __m256i d0 = group_dot((g + 0) * GROUP);
    const __m256i d1 = group_dot((g + 1) * GROUP);
    const __m256i d2 = group_dot((g + 2) * GROUP);
    const __m256i d3 = group_dot((g + 3) * GROUP);
    const __m256i pairs = _mm256_hadd_epi32(_mm256_hadd_epi32(d0, d1), _mm256_hadd_epi32(d2, d3));
    const __m128i sums = _mm_add_epi32(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
    const __m128 factors = _mm_mul_ps(load4_as_float(scales + g), _mm_loadu_ps(x_scales + g));
    acc = _mm_fmadd_ps(_mm_cvtepi32_ps(sums), factors, acc);
    bias_acc = _mm_fmadd_ps(load4_as_float(biases + g), _mm_loadu_ps(x_sums + g), bias_acc);
  }
  acc = _mm_add_ps(acc, bias_acc);
  acc = _mm_add_ps(acc, _mm_movehl_ps(acc, acc));
  acc = _mm_add_ss(acc, _mm_movehdup_ps(acc));
  float result = _mm_cvtss_f32(acc);
  for (; g < groups; ++g) {
    const __m256i d = group_dot(g * GROUP);
    __m128i half = _mm_add_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1));
    half = _mm_hadd_epi32(half, half);
    half = _mm_hadd_epi32(half, half);
    result += static_cast<float>(_mm_cvtsi128_si32(half)) * to_float(scales[g]) * x_scales[g] +
        to_float(biases[g]) * x_sums[g];
  }
  return result;
}

template <int BITS, int GROUP, typename T>
inline float int16_direct_single(
    const QuantizedRowRef& w, const Int16Activations& x, int64_t row, int64_t K,
    const uint8_t* prefetch_codes) {
  const int64_t groups = K / GROUP;
  const int16_t* xv = x.values.data() + row * K;
  return integer_direct_single<GROUP, GROUP * BITS / 8, T>(
      w, x.scales.data() + row * groups, x.sums.data() + row * groups, K, prefetch_codes,
      [&](int64_t begin) { return group_dot<BITS, GROUP>(w.codes, xv, begin); });
}

// One weight row at a time for one activation row (decode: the memory
// stream), 2 x 2 tiles when rows share the codes.
template <int BITS, typename T>
void int16_direct_format(
    const QuantizedRowRef* w, int64_t columns, const Int16Activations& x, int64_t num_rows, int64_t K,
    int group_size, float* acc, int64_t ldacc) {
  for (int64_t r = 0; r < num_rows;) {
    if (num_rows - r >= 2) {
      int64_t c = 0;
      for (; c + 2 <= columns; c += 2) {
        const QuantizedRowRef* next = c + 6 <= columns ? w + c + 4 : nullptr;
        int16_direct_tile<BITS, T, 2, 2>(w + c, x, r, K, group_size, acc + r * ldacc + c, ldacc, next);
      }
      for (; c < columns; ++c) {
        int16_direct_tile<BITS, T, 1, 2>(w + c, x, r, K, group_size, acc + r * ldacc + c, ldacc, nullptr);
      }
      r += 2;
    } else {
      // Weight rows one after another; the row 4 ahead is prefetched as
      // this one streams.
      for (int64_t c = 0; c < columns; ++c) {
        const uint8_t* ahead = c + 4 < columns ? w[c + 4].codes : nullptr;
        float dot;
        switch (group_size) {
          case 32: dot = int16_direct_single<BITS, 32, T>(w[c], x, r, K, ahead); break;
          case 64: dot = int16_direct_single<BITS, 64, T>(w[c], x, r, K, ahead); break;
          default: dot = int16_direct_single<BITS, 128, T>(w[c], x, r, K, ahead); break;
        }
        acc[r * ldacc + c] += dot;
      }
      r += 1;
    }
  }
}

// acc[r * ldacc + c] += x_r . W_c over the given weight rows (see the top of
// this file). T: the activations' and scales' half-precision type.
template <typename T>
void int16_direct_dot(
    const QuantizedMatrices& q,
    const QuantizedRowRef* w,
    int64_t columns,
    const T* const* x_rows,
    int64_t x_col_stride,
    int64_t num_rows,
    int64_t K,
    float* acc,
    int64_t ldacc) {
  static_assert(!std::is_same_v<T, float>, "float32 activations keep the exact float kernel");
  const Int16Activations& x =
      prepared_int16_activations<T>(x_rows, x_col_stride, num_rows, K, q.group_size, q.bits == 4);
  if (q.bits == 4) {
    int16_direct_format<4, T>(w, columns, x, num_rows, K, q.group_size, acc, ldacc);
  } else {
    int16_direct_format<8, T>(w, columns, x, num_rows, K, q.group_size, acc, ldacc);
  }
}

} // namespace
} // namespace mlx_moe::cpu

#endif // MLX_MOE_SIMD_AVX2
