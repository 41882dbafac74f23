// The fused SwitchGLU's CPU tasks, written once on the dot engine
// (dot_kernels.h) and compiled once per instruction set.
//
// gate_up task: one expert's slots x a block of hidden columns. The gate and
// up weight rows of each hidden column are handed to the dot engine
// interleaved (gate h, up h, gate h+1, ...), so both projections accumulate
// in the same pass over K, from the same loaded activation vectors; the
// epilogue applies silu(gate) * up in float32 and writes only the H-wide
// hidden rows, rounded once.
//
// down task: a block of output columns. Each expert's hidden rows (contiguous
// in sorted order) meet that expert's down rows in the dot engine; the
// epilogue multiplies by the slot's routing score and adds into the token's
// float32 output row, so the k slots of a token are summed without ever
// writing [tokens, k, D].
//
// Quantized experts: each task first dequantizes the weight rows it needs
// (one expert's block of columns) into a per-thread buffer in the compute
// dtype, then runs the same dot engine on it (see gather_qmm_kernels.h).
#pragma once

#include <cmath>
#include <vector>

#include "cpu/dot_kernels.h"
#include "cpu/gather_qmm_kernels.h"
#include "cpu/quantized.h"
#include "cpu/switch_glu_problem.h"

namespace mlx_moe::cpu {
namespace {

struct SwitchGluScratch {
  std::vector<const void*> x_rows;
  std::vector<const void*> w_rows;
  std::vector<float> products; // [rows, columns] of one expert
  std::vector<float> out;      // [tokens, columns] of a down task
  std::vector<uint8_t> dequantized; // quantized weight rows in the compute dtype
  std::vector<QuantizedRowRef> refs; // quantized weight rows, for the direct kernel
  std::vector<QuantizedRowRef> following_refs; // the next expert's first rows
};

// Rows [row_begin, row_begin + count) of expert `expert` of a quantized
// weight, each `length` long, dequantized into s.dequantized; w_rows[i *
// spacing + slot] points at row i (spacing 2 interleaves gate and up).
template <typename T>
void dequantize_expert_rows(const QuantizedMatrices& q, int64_t expert, int64_t row_begin,
                            int64_t count, int64_t length, int spacing, int slot,
                            SwitchGluScratch& s, T* buffer) {
  for (int64_t i = 0; i < count; ++i) {
    T* row = buffer + (i * spacing + slot) * length;
    dequantize_row<T>(q, expert, row_begin + i, 0, length, row);
    s.w_rows[i * spacing + slot] = row;
  }
}

template <typename T>
T* dequantized_buffer(SwitchGluScratch& s, int64_t elements) {
  s.dequantized.resize(elements * sizeof(T));
  return reinterpret_cast<T*>(s.dequantized.data());
}

inline SwitchGluScratch& switch_glu_scratch() {
  thread_local SwitchGluScratch s;
  return s;
}

inline float silu(float x) {
  return x / (1.0f + std::exp(-x));
}

template <typename T>
void gate_up_task_typed(const SwitchGluProblem& p, const GateUpTask& task) {
  SwitchGluScratch& s = switch_glu_scratch();
  const int64_t begin = p.offsets[task.expert];
  const int64_t rows = p.offsets[task.expert + 1] - begin;
  const int64_t columns = task.h_end - task.h_begin;
  if (rows == 0 || columns == 0) {
    return;
  }
  const T* x = static_cast<const T*>(p.x);
  s.x_rows.resize(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = p.order[begin + r] / p.top_k;
    s.x_rows[r] = x + token * p.x_row_stride;
  }
  s.w_rows.resize(2 * columns);
  s.products.assign(rows * 2 * columns, 0.0f);
  const T* const* x_rows = reinterpret_cast<const T* const*>(s.x_rows.data());
  bool done = false;
  if (p.quantized) {
    s.refs.resize(2 * columns);
    for (int64_t c = 0; c < columns; ++c) {
      s.refs[2 * c] = quantized_row<T>(p.gate_quantized, task.expert, task.h_begin + c);
      s.refs[2 * c + 1] = quantized_row<T>(p.up_quantized, task.expert, task.h_begin + c);
    }
    done = direct_quantized_dot<T>(
        p.gate_quantized, s.refs.data(), 2 * columns, x_rows, 1, rows, p.model_dims,
        s.products.data(), 2 * columns);
    if (!done) {
      T* buffer = dequantized_buffer<T>(s, 2 * columns * p.model_dims);
      dequantize_expert_rows<T>(p.gate_quantized, task.expert, task.h_begin, columns, p.model_dims, 2, 0, s, buffer);
      dequantize_expert_rows<T>(p.up_quantized, task.expert, task.h_begin, columns, p.model_dims, 2, 1, s, buffer);
    }
  } else {
    const T* gate = static_cast<const T*>(p.gate) + task.expert * p.gate_up_expert_stride;
    const T* up = static_cast<const T*>(p.up) + task.expert * p.gate_up_expert_stride;
    for (int64_t c = 0; c < columns; ++c) {
      s.w_rows[2 * c] = gate + (task.h_begin + c) * p.gate_up_row_stride;
      s.w_rows[2 * c + 1] = up + (task.h_begin + c) * p.gate_up_row_stride;
    }
  }
  if (!done) {
    dot_rows<T>(
        reinterpret_cast<const T* const*>(s.w_rows.data()), 2 * columns, x_rows, 1, rows,
        p.model_dims, s.products.data(), 2 * columns);
  }
  T* hidden = static_cast<T*>(p.hidden);
  for (int64_t r = 0; r < rows; ++r) {
    const float* pr = s.products.data() + r * 2 * columns;
    T* h = hidden + (begin + r) * p.hidden_dims + task.h_begin;
    for (int64_t c = 0; c < columns; ++c) {
      h[c] = from_float<T>(silu(pr[2 * c]) * pr[2 * c + 1]);
    }
  }
}

template <typename T>
void down_task_typed(const SwitchGluProblem& p, const DownTask& task) {
  SwitchGluScratch& s = switch_glu_scratch();
  const int64_t columns = task.d_end - task.d_begin;
  if (columns == 0) {
    return;
  }
  const T* hidden = static_cast<const T*>(p.hidden);
  T* out = static_cast<T*>(p.out);
  const bool combine = p.scores != nullptr;
  if (combine) {
    s.out.assign(p.tokens * columns, 0.0f);
  }
  s.w_rows.resize(columns);
  // The first weight rows of the next expert with slots, prefetched while
  // the current one finishes (each expert's block is short at decode).
  const T* following[kMaxTileColumns];
  auto next_expert = [&](int64_t e) {
    while (e < task.expert_end && p.expert_rows(e) == 0) {
      ++e;
    }
    return e;
  };
  for (int64_t e = next_expert(task.expert_begin); e < task.expert_end;) {
    const int64_t begin = p.offsets[e];
    const int64_t rows = p.offsets[e + 1] - begin;
    const int64_t after = next_expert(e + 1);
    const bool prefetch_next = !p.quantized && after < task.expert_end && columns >= kMaxTileColumns;
    if (prefetch_next) {
      const T* next_down = static_cast<const T*>(p.down) + after * p.down_expert_stride;
      for (int c = 0; c < kMaxTileColumns; ++c) {
        following[c] = next_down + (task.d_begin + c) * p.down_row_stride;
      }
    }
    s.x_rows.resize(rows);
    for (int64_t r = 0; r < rows; ++r) {
      s.x_rows[r] = hidden + (begin + r) * p.hidden_dims;
    }
    s.products.assign(rows * columns, 0.0f);
    const T* const* x_rows = reinterpret_cast<const T* const*>(s.x_rows.data());
    bool done = false;
    if (p.quantized) {
      s.refs.resize(columns);
      for (int64_t c = 0; c < columns; ++c) {
        s.refs[c] = quantized_row<T>(p.down_quantized, e, task.d_begin + c);
      }
      // The next expert's first rows, prefetched during this one's last
      // tiles (an expert's block is short at decode).
      const int64_t following = after < task.expert_end ? std::min<int64_t>(columns, 4 * kMaxTileColumns) : 0;
      s.following_refs.resize(following);
      for (int64_t c = 0; c < following; ++c) {
        s.following_refs[c] = quantized_row<T>(p.down_quantized, after, task.d_begin + c);
      }
      done = direct_quantized_dot<T>(
          p.down_quantized, s.refs.data(), columns, x_rows, 1, rows, p.hidden_dims,
          s.products.data(), columns, s.following_refs.data(), following);
      if (!done) {
        T* buffer = dequantized_buffer<T>(s, columns * p.hidden_dims);
        dequantize_expert_rows<T>(p.down_quantized, e, task.d_begin, columns, p.hidden_dims, 1, 0, s, buffer);
      }
    } else {
      const T* down = static_cast<const T*>(p.down) + e * p.down_expert_stride;
      for (int64_t c = 0; c < columns; ++c) {
        s.w_rows[c] = down + (task.d_begin + c) * p.down_row_stride;
      }
    }
    if (!done) {
      dot_rows<T>(
          reinterpret_cast<const T* const*>(s.w_rows.data()), columns, x_rows, 1, rows,
          p.hidden_dims, s.products.data(), columns, prefetch_next ? following : nullptr);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t slot = p.order[begin + r];
      const float* pr = s.products.data() + r * columns;
      if (combine) {
        const float score = p.scores[slot];
        float* o = s.out.data() + (slot / p.top_k) * columns;
        for (int64_t c = 0; c < columns; ++c) {
          o[c] += score * pr[c];
        }
      } else {
        T* o = out + slot * p.model_dims + task.d_begin;
        for (int64_t c = 0; c < columns; ++c) {
          o[c] = from_float<T>(pr[c]);
        }
      }
    }
    e = after;
  }
  if (combine) {
    for (int64_t t = 0; t < p.tokens; ++t) {
      const float* o = s.out.data() + t * columns;
      T* dst = out + t * p.model_dims + task.d_begin;
      for (int64_t c = 0; c < columns; ++c) {
        dst[c] = from_float<T>(o[c]);
      }
    }
  }
}

inline void gate_up_task(const SwitchGluProblem& p, const GateUpTask& task) {
  switch (p.dtype) {
    case ElementType::float32:
      return gate_up_task_typed<float>(p, task);
    case ElementType::float16:
      return gate_up_task_typed<Float16Bits>(p, task);
    case ElementType::bfloat16:
      return gate_up_task_typed<BFloat16Bits>(p, task);
  }
}

inline void down_task(const SwitchGluProblem& p, const DownTask& task) {
  switch (p.dtype) {
    case ElementType::float32:
      return down_task_typed<float>(p, task);
    case ElementType::float16:
      return down_task_typed<Float16Bits>(p, task);
    case ElementType::bfloat16:
      return down_task_typed<BFloat16Bits>(p, task);
  }
}

} // namespace
} // namespace mlx_moe::cpu
