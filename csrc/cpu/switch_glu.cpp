// eval_cpu of the fused SwitchGLU primitives: MoeRoute (counting sort of the
// slots by expert), MoeGateUpSwiGLU and MoeDownCombine (tasks on the thread
// pool, kernels from the best instruction-set build).
#include <algorithm>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

#include "cpu/element_type.h"
#include "cpu/gather_mm_problem.h"
#include "cpu/indices.h"
#include "cpu/kernels.h"
#include "cpu/quantized_arrays.h"
#include "cpu/routing.h"
#include "cpu/switch_glu_problem.h"
#include "cpu/thread_pool.h"
#include "primitives.h"

namespace mlx_moe {

namespace {

// The ops hand the kernels weights whose last axis is contiguous (they make
// them so with mx::contiguous); a violation is a bug, not bad user input.
void require_unit_last_stride(const mx::array& a, const char* what) {
  if (a.ndim() > 0 && a.shape(-1) > 1 && a.strides().back() != 1) {
    throw std::logic_error(std::string("[switch_glu] internal: ") + what +
                           " must be contiguous along its last axis.");
  }
}

// Columns per task: a multiple of every dot tile width (1, 2, 3, 4, 6, 8) so
// that only a matrix's last block has a ragged edge, and enough tasks for
// every thread to get several.
constexpr int64_t kColumnQuantum = 48;
constexpr int64_t kTasksPerThread = 8;
// The combined down projection splits only the output columns: finer
// blocks balance the two threads better (15 blocks on 2 threads idle one
// for a fifteenth of the time).
constexpr int64_t kDownTasksPerThread = 16;

int64_t block_width(int64_t columns, int64_t blocks) {
  int64_t width = (columns + blocks - 1) / std::max<int64_t>(blocks, 1);
  width = (width + kColumnQuantum - 1) / kColumnQuantum * kColumnQuantum;
  return std::max<int64_t>(width, kColumnQuantum);
}

} // namespace

void MoeRoute::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const mx::array& indices = inputs[0];
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(indices);
  for (auto& out : outputs) {
    encoder.set_output_array(out);
  }
  encoder.dispatch([data = indices.data<uint32_t>(),
                    shape = indices.shape(),
                    strides = indices.strides(),
                    count = static_cast<int64_t>(indices.size()),
                    num_experts = num_experts_,
                    order = outputs[0].data<uint32_t>(),
                    offsets = outputs[1].data<uint32_t>(),
                    sorted_experts = outputs[2].data<uint32_t>(),
                    status = outputs[3].data<uint32_t>()]() {
    std::vector<int64_t> bad_slots;
    std::vector<uint32_t> experts = read_indices(data, shape, strides, count, num_experts, bad_slots);
    *status = bad_slots.empty() ? 0 : 1;
    if (!bad_slots.empty()) {
      // An id out of range: an empty routing (no expert has rows, so the
      // kernels read nothing) and status 1, which the op turns into NaN
      // outputs (ops.cpp, poison_on_bad_routing).
      std::fill(offsets, offsets + num_experts + 1, 0u);
      std::fill(order, order + count, 0u);
      std::fill(sorted_experts, sorted_experts + count, 0u);
      return;
    }
    cpu::sort_by_expert(experts.data(), count, num_experts, order, offsets);
    for (int e = 0; e < num_experts; ++e) {
      std::fill(sorted_experts + offsets[e], sorted_experts + offsets[e + 1], static_cast<uint32_t>(e));
    }
  });
}

void MoeGateUpSwiGLU::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const int weight_inputs = quantization_ ? quantization_->inputs_per_weight() : 1;
  const mx::array& x = inputs[0];
  const mx::array& gate = inputs[1];
  const mx::array& up = inputs[1 + weight_inputs];
  const mx::array& order = inputs[1 + 2 * weight_inputs];
  const mx::array& offsets = inputs[2 + 2 * weight_inputs];
  require_unit_last_stride(x, "x");
  if (!quantization_) {
    require_unit_last_stride(gate, "gate weight");
    require_unit_last_stride(up, "up weight");
    if (gate.strides() != up.strides()) {
      throw std::logic_error("[switch_glu] internal: gate and up weights must share strides.");
    }
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));

  cpu::SwitchGluProblem p;
  p.dtype = cpu::element_type(out.dtype(), "switch_glu");
  p.tokens = x.shape(0);
  p.top_k = top_k_;
  p.model_dims = x.shape(1);
  p.hidden_dims = gate.shape(1);
  p.num_experts = gate.shape(0);
  p.x = x.data<void>();
  p.x_row_stride = x.strides()[0];
  if (quantization_) {
    const auto& q = *quantization_;
    p.quantized = true;
    p.gate_quantized = quantized_matrices(
        gate, inputs[2], q.has_biases ? &inputs[3] : nullptr, q.group_size, q.bits, q.mode);
    p.up_quantized = quantized_matrices(
        up, inputs[2 + weight_inputs], q.has_biases ? &inputs[3 + weight_inputs] : nullptr,
        q.group_size, q.bits, q.mode);
  } else {
    p.gate = gate.data<void>();
    p.up = up.data<void>();
    p.gate_up_expert_stride = gate.strides()[0];
    p.gate_up_row_stride = gate.strides()[1];
  }
  p.order = order.data<uint32_t>();
  p.offsets = offsets.data<uint32_t>();
  p.hidden = out.data<void>();

  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  encoder.set_output_array(out);
  encoder.dispatch([p]() {
    if (p.tokens == 0 || p.hidden_dims == 0) {
      return;
    }
    // Tasks: (expert, hidden column block), largest experts first.
    std::vector<int64_t> experts;
    for (int64_t e = 0; e < p.num_experts; ++e) {
      if (p.expert_rows(e) > 0) {
        experts.push_back(e);
      }
    }
    std::stable_sort(experts.begin(), experts.end(), [&](int64_t a, int64_t b) {
      return p.expert_rows(a) > p.expert_rows(b);
    });
    cpu::ThreadPool& pool = cpu::ThreadPool::instance();
    const int64_t target = kTasksPerThread * pool.num_threads();
    const int64_t blocks = std::max<int64_t>(
        1, (target + static_cast<int64_t>(experts.size()) - 1) /
            std::max<int64_t>(1, static_cast<int64_t>(experts.size())));
    const int64_t width = block_width(p.hidden_dims, blocks);
    std::vector<cpu::GateUpTask> tasks;
    for (int64_t e : experts) {
      for (int64_t h = 0; h < p.hidden_dims; h += width) {
        tasks.push_back({e, h, std::min(p.hidden_dims, h + width)});
      }
    }
    const auto kernel = cpu::cpu_kernels().gate_up_task;
    pool.parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i, int) {
      kernel(p, tasks[i]);
    });
  });
}

void MoeDownCombine::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const int weight_inputs = quantization_ ? quantization_->inputs_per_weight() : 1;
  const mx::array& hidden = inputs[0];
  const mx::array& down = inputs[1];
  const mx::array& order = inputs[1 + weight_inputs];
  const mx::array& offsets = inputs[2 + weight_inputs];
  const size_t scores_input = 4 + weight_inputs;
  const bool combine = inputs.size() > scores_input;
  require_unit_last_stride(hidden, "hidden");
  if (!quantization_) {
    require_unit_last_stride(down, "down weight");
  }
  if (hidden.strides()[0] != hidden.shape(1) && hidden.shape(0) > 1) {
    throw std::logic_error("[switch_glu] internal: hidden rows must be contiguous.");
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));

  cpu::SwitchGluProblem p;
  p.dtype = cpu::element_type(out.dtype(), "switch_glu");
  p.top_k = top_k_;
  p.tokens = hidden.shape(0) / top_k_;
  p.model_dims = down.shape(1);
  p.hidden_dims = hidden.shape(1);
  p.num_experts = down.shape(0);
  if (quantization_) {
    const auto& q = *quantization_;
    p.quantized = true;
    p.down_quantized = quantized_matrices(
        down, inputs[2], q.has_biases ? &inputs[3] : nullptr, q.group_size, q.bits, q.mode);
  } else {
    p.down = down.data<void>();
    p.down_expert_stride = down.strides()[0];
    p.down_row_stride = down.strides()[1];
  }
  p.order = order.data<uint32_t>();
  p.offsets = offsets.data<uint32_t>();
  p.hidden = const_cast<void*>(hidden.data<void>());
  if (combine) {
    const mx::array& scores = inputs[scores_input];
    if (!scores.flags().row_contiguous || scores.dtype() != mx::float32) {
      throw std::logic_error("[switch_glu] internal: scores must be contiguous float32.");
    }
    p.scores = scores.data<float>();
  }
  p.out = out.data<void>();

  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  encoder.set_output_array(out);
  encoder.dispatch([p]() {
    if (p.tokens == 0 || p.model_dims == 0) {
      return;
    }
    cpu::ThreadPool& pool = cpu::ThreadPool::instance();
    const int64_t target = kTasksPerThread * pool.num_threads();
    std::vector<cpu::DownTask> tasks;
    if (p.scores != nullptr) {
      // Every task covers all experts for its output columns, so a token's
      // k slots are summed by one thread, in its accumulator.
      const int64_t width = block_width(p.model_dims, kDownTasksPerThread * pool.num_threads());
      for (int64_t d = 0; d < p.model_dims; d += width) {
        tasks.push_back({0, p.num_experts, d, std::min(p.model_dims, d + width)});
      }
    } else {
      // Every slot row is written once: (expert, column block) tasks.
      int64_t used = 0;
      for (int64_t e = 0; e < p.num_experts; ++e) {
        used += p.expert_rows(e) > 0;
      }
      const int64_t width =
          block_width(p.model_dims, (target + std::max<int64_t>(used, 1) - 1) / std::max<int64_t>(used, 1));
      for (int64_t e = 0; e < p.num_experts; ++e) {
        if (p.expert_rows(e) == 0) {
          continue;
        }
        for (int64_t d = 0; d < p.model_dims; d += width) {
          tasks.push_back({e, e + 1, d, std::min(p.model_dims, d + width)});
        }
      }
    }
    const auto kernel = cpu::cpu_kernels().down_task;
    pool.parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i, int) {
      kernel(p, tasks[i]);
    });
  });
}

} // namespace mlx_moe
