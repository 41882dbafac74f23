// The attention CPU task, written once against simd.h / dot_kernels.h and
// compiled once per instruction set (kernels_*.cpp).
//
// A task is every query head sharing one key/value head (grouped-query
// attention) times a block of query positions: its query rows go through
// the keys a block at a time (flash-attention's online softmax), so each
// key and value row is read once per task and scores never leave a
// [rows, kKeyBlock] float32 buffer. Scores are dot products of query rows
// with key rows - the dot engine of the gather kernels, with key rows in
// place of weight rows (bfloat16 on VDPBF16PS where the CPU has it); the
// value rows are accumulated into float32 output rows with 32-lane register
// tiles. The output is rounded to the dtype once, at the end.
#pragma once

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu/attention_problem.h"
#include "cpu/dot_kernels.h"
#include "cpu/fast_exp.h"
#include "cpu/simd.h"

namespace mlx_moe::cpu {
namespace {

// Keys per block: the block's scores ([rows, kKeyBlock] floats) and its
// value rows (kKeyBlock x value_dim) stay in L2 while the block is used.
constexpr int64_t kKeyBlock = 128;

struct AttentionScratch {
  std::vector<const void*> q_rows;
  std::vector<const void*> k_rows;
  std::vector<const void*> v_rows;
  std::vector<int64_t> keys;  // per query row: the keys it may attend to
  std::vector<float> scores;  // [rows, kKeyBlock]
  std::vector<float> row_max; // running maximum of each row's scores
  std::vector<float> row_sum; // running sum of exp(score - row_max)
  std::vector<float> acc;     // [rows, value_dim] unnormalised outputs
};

inline AttentionScratch& attention_scratch() {
  thread_local AttentionScratch s;
  return s;
}

// acc[0, dv) += sum_{c < n} weights[c] * v_rows[c][0, dv).
template <typename T>
inline void accumulate_values(const float* weights, const T* const* v_rows, int64_t n, int64_t dv, float* acc) {
  int64_t j = 0;
  for (; j + 32 <= dv; j += 32) {
    Vec8 a0 = load(acc + j), a1 = load(acc + j + 8), a2 = load(acc + j + 16), a3 = load(acc + j + 24);
    for (int64_t c = 0; c < n; ++c) {
      const Vec8 w = broadcast(weights[c]);
      const T* v = v_rows[c] + j;
      a0 = fma(w, load(v), a0);
      a1 = fma(w, load(v + 8), a1);
      a2 = fma(w, load(v + 16), a2);
      a3 = fma(w, load(v + 24), a3);
    }
    store(acc + j, a0);
    store(acc + j + 8, a1);
    store(acc + j + 16, a2);
    store(acc + j + 24, a3);
  }
  for (; j + 8 <= dv; j += 8) {
    Vec8 a = load(acc + j);
    for (int64_t c = 0; c < n; ++c) {
      a = fma(broadcast(weights[c]), load(v_rows[c] + j), a);
    }
    store(acc + j, a);
  }
  for (; j < dv; ++j) {
    float a = acc[j];
    for (int64_t c = 0; c < n; ++c) {
      a += weights[c] * to_float(v_rows[c][j]);
    }
    acc[j] = a;
  }
}

// One row's scores of a key block -> softmax weights, with the online
// rescaling of what the row accumulated so far.
inline void online_softmax_row(
    float* scores, int64_t n, float scale, float& row_max, float& row_sum, float* acc, int64_t dv) {
  float block_max = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < n; ++c) {
    scores[c] *= scale;
    block_max = std::max(block_max, scores[c]);
  }
  const float new_max = std::max(row_max, block_max);
  const float correction = exp_approx(row_max - new_max);
  float sum = 0.0f;
  for (int64_t c = 0; c < n; ++c) {
    scores[c] = exp_approx(scores[c] - new_max);
    sum += scores[c];
  }
  row_sum = row_sum * correction + sum;
  row_max = new_max;
  if (correction != 1.0f) {
    for (int64_t j = 0; j < dv; ++j) {
      acc[j] *= correction;
    }
  }
}

template <typename T>
void attention_task_typed(const AttentionProblem& p, const AttentionTask& t) {
  AttentionScratch& s = attention_scratch();
  const int64_t G = p.group_size();
  const int64_t positions = t.q_end - t.q_begin;
  const int64_t rows = G * positions;
  const int64_t d = p.head_dim;
  const int64_t dv = p.value_dim;
  if (rows == 0 || dv == 0) {
    return;
  }
  s.q_rows.resize(rows);
  s.keys.resize(rows);
  s.k_rows.resize(kKeyBlock);
  s.v_rows.resize(kKeyBlock);
  s.scores.resize(rows * kKeyBlock);
  s.row_max.assign(rows, -std::numeric_limits<float>::infinity());
  s.row_sum.assign(rows, 0.0f);
  s.acc.assign(rows * dv, 0.0f);

  // Row r = g * positions + (i - q_begin): query head kv_head * G + g at
  // position i.
  const T* q = static_cast<const T*>(p.q);
  int64_t max_keys = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t head = t.kv_head * G + g;
    for (int64_t i = t.q_begin; i < t.q_end; ++i) {
      const int64_t r = g * positions + (i - t.q_begin);
      s.q_rows[r] = q + t.batch * p.q_strides[0] + head * p.q_strides[1] + i * p.q_strides[2];
      s.keys[r] = p.keys_for(i);
      max_keys = std::max(max_keys, s.keys[r]);
    }
  }
  const T* k = static_cast<const T*>(p.k) + t.batch * p.k_strides[0] + t.kv_head * p.k_strides[1];
  const T* v = static_cast<const T*>(p.v) + t.batch * p.v_strides[0] + t.kv_head * p.v_strides[1];
  const T* const* q_rows = reinterpret_cast<const T* const*>(s.q_rows.data());
  const T* const* k_rows = reinterpret_cast<const T* const*>(s.k_rows.data());
  const T* const* v_rows = reinterpret_cast<const T* const*>(s.v_rows.data());

  for (int64_t j0 = 0; j0 < max_keys; j0 += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, max_keys - j0);
    for (int64_t c = 0; c < n; ++c) {
      s.k_rows[c] = k + (j0 + c) * p.k_strides[2];
      s.v_rows[c] = v + (j0 + c) * p.v_strides[2];
    }
    std::fill(s.scores.begin(), s.scores.end(), 0.0f);
    if (d > 0) {
      dot_rows<T>(k_rows, n, q_rows, 1, rows, d, s.scores.data(), kKeyBlock);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t limit = std::min(n, s.keys[r] - j0);
      if (limit <= 0) {
        continue; // causal: this block lies past the row's position
      }
      float* acc = s.acc.data() + r * dv;
      float* weights = s.scores.data() + r * kKeyBlock;
      online_softmax_row(weights, limit, p.scale, s.row_max[r], s.row_sum[r], acc, dv);
      accumulate_values<T>(weights, v_rows, limit, dv, acc);
    }
  }

  // Normalise and round once. A row with no key to attend to divides 0 by
  // 0: NaN, as a softmax over nothing gives in MLX.
  T* out = static_cast<T*>(p.out);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t head = t.kv_head * G + g;
    for (int64_t i = t.q_begin; i < t.q_end; ++i) {
      const int64_t r = g * positions + (i - t.q_begin);
      const float* acc = s.acc.data() + r * dv;
      const float sum = s.row_sum[r];
      T* dst = out + ((t.batch * p.q_heads + head) * p.q_len + i) * dv;
      for (int64_t j = 0; j < dv; ++j) {
        dst[j] = from_float<T>(acc[j] / sum);
      }
    }
  }
}

inline void attention_task(const AttentionProblem& p, const AttentionTask& t) {
  switch (p.dtype) {
    case ElementType::float32:
      return attention_task_typed<float>(p, t);
    case ElementType::float16:
      return attention_task_typed<Float16Bits>(p, t);
    case ElementType::bfloat16:
      return attention_task_typed<BFloat16Bits>(p, t);
  }
}

} // namespace
} // namespace mlx_moe::cpu
