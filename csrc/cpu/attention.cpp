// Attention::eval_cpu: describes q, k, v and the output as an
// AttentionProblem, splits it into (batch, key/value head, query block)
// tasks and runs them on the thread pool with the best kernel build.
#include <algorithm>
#include <cstring>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

#include "cpu/attention_problem.h"
#include "cpu/element_type.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "primitives.h"

namespace mlx_moe {

namespace {

// Query rows per task (query heads of one group x positions): enough rows
// to reuse each loaded key row from registers, few enough that a prompt
// still splits into several tasks per thread.
constexpr int64_t kQueryRowsPerTask = 64;

// A copy of `a` with a contiguous last axis when it has none (a rare
// layout: the model's q, k, v and KV-cache slices all have one), else
// nothing. Returns the pointer and the strides of the first three axes.
struct Operand {
  const void* data;
  int64_t strides[3];
  std::vector<char> copy; // the contiguous copy, when one was made
};

Operand operand(const mx::array& a) {
  if (a.strides(3) == 1 || a.shape(3) <= 1) {
    return {a.data<void>(), {a.strides(0), a.strides(1), a.strides(2)}, {}};
  }
  Operand result;
  const size_t item = a.itemsize();
  result.copy.resize(a.size() * item);
  const char* src = static_cast<const char*>(a.data<void>());
  char* dst = result.copy.data();
  int64_t n = 0;
  for (int i0 = 0; i0 < a.shape(0); ++i0) {
    for (int i1 = 0; i1 < a.shape(1); ++i1) {
      for (int i2 = 0; i2 < a.shape(2); ++i2) {
        for (int i3 = 0; i3 < a.shape(3); ++i3, ++n) {
          const int64_t offset = i0 * a.strides(0) + i1 * a.strides(1) + i2 * a.strides(2) + i3 * a.strides(3);
          std::memcpy(dst + n * item, src + offset * item, item);
        }
      }
    }
  }
  const int64_t d = a.shape(3);
  result.data = result.copy.data();
  result.strides[0] = a.shape(1) * a.shape(2) * d;
  result.strides[1] = a.shape(2) * d;
  result.strides[2] = d;
  return result;
}

std::vector<cpu::AttentionTask> attention_tasks(const cpu::AttentionProblem& p) {
  const int64_t positions = std::max<int64_t>(1, kQueryRowsPerTask / p.group_size());
  std::vector<cpu::AttentionTask> tasks;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.kv_heads; ++h) {
      for (int64_t i = 0; i < p.q_len; i += positions) {
        tasks.push_back({b, h, i, std::min(p.q_len, i + positions)});
      }
    }
  }
  // Causal: later positions attend to more keys; run them first so the
  // dynamic schedule ends with short tasks.
  std::stable_sort(tasks.begin(), tasks.end(), [](const auto& x, const auto& y) {
    return x.q_begin > y.q_begin;
  });
  return tasks;
}

} // namespace

void Attention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  encoder.set_output_array(out);
  encoder.dispatch([q = inputs[0], k = inputs[1], v = inputs[2], out_data = out.data<void>(), out_dtype = out.dtype(),
                    scale = scale_, causal = causal_]() {
    cpu::AttentionProblem p;
    p.dtype = cpu::element_type(out_dtype, "scaled_dot_product_attention");
    p.batch = q.shape(0);
    p.q_heads = q.shape(1);
    p.kv_heads = k.shape(1);
    p.q_len = q.shape(2);
    p.kv_len = k.shape(2);
    p.head_dim = q.shape(3);
    p.value_dim = v.shape(3);
    p.scale = scale;
    p.causal = causal;
    if (p.batch == 0 || p.q_heads == 0 || p.q_len == 0 || p.value_dim == 0) {
      return;
    }
    Operand qo = operand(q), ko = operand(k), vo = operand(v);
    p.q = qo.data;
    p.k = ko.data;
    p.v = vo.data;
    std::copy(qo.strides, qo.strides + 3, p.q_strides);
    std::copy(ko.strides, ko.strides + 3, p.k_strides);
    std::copy(vo.strides, vo.strides + 3, p.v_strides);
    p.out = out_data;
    std::vector<cpu::AttentionTask> tasks = attention_tasks(p);
    const auto kernel = cpu::cpu_kernels().attention_task;
    cpu::ThreadPool::instance().parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i, int) {
      kernel(p, tasks[i]);
    });
  });
}

} // namespace mlx_moe
