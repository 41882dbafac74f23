// Scaled dot-product attention as the CPU kernels see it: plain pointers and
// element strides, no MLX types (shared by the per-instruction-set kernels
// and the dispatch in attention.cpp).
#pragma once

#include <cstdint>

#include "cpu/gather_mm_problem.h"

namespace mlx_moe::cpu {

// out[b, h, i] = softmax_j(scale * q[b, h, i] . k[b, h / G, j]) v[b, h / G, j]
// over keys j < kv_len (causal: j <= kv_len - q_len + i, the mask aligned to
// the last key, as MLX's "causal"), G = q_heads / kv_heads query heads per
// key/value head (grouped-query attention). q [B, Hq, L, d], k [B, Hkv, S,
// d], v [B, Hkv, S, dv] with any strides except that the last axis of each
// is contiguous; out contiguous [B, Hq, L, dv].
struct AttentionProblem {
  ElementType dtype = ElementType::float32;
  int64_t batch = 0;
  int64_t q_heads = 0;
  int64_t kv_heads = 0;
  int64_t q_len = 0;
  int64_t kv_len = 0;
  int64_t head_dim = 0;
  int64_t value_dim = 0;
  float scale = 1.0f;
  bool causal = false;

  const void* q = nullptr;
  int64_t q_strides[3] = {0, 0, 0}; // batch, head, position (elements)
  const void* k = nullptr;
  int64_t k_strides[3] = {0, 0, 0};
  const void* v = nullptr;
  int64_t v_strides[3] = {0, 0, 0};
  void* out = nullptr;

  int64_t group_size() const {
    return q_heads / kv_heads;
  }
  // Keys query position i may attend to: [0, keys_for(i)).
  int64_t keys_for(int64_t i) const {
    if (!causal) {
      return kv_len;
    }
    const int64_t last = kv_len - q_len + i + 1;
    return last < 0 ? 0 : (last > kv_len ? kv_len : last);
  }
};

// One unit of parallel work: query positions [q_begin, q_end) of every
// query head that shares key/value head `kv_head` of batch entry `batch`,
// so that each key and value row is read once for all of them.
struct AttentionTask {
  int64_t batch;
  int64_t kv_head;
  int64_t q_begin;
  int64_t q_end;
};

} // namespace mlx_moe::cpu
