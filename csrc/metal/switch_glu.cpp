// eval_gpu of the fused SwitchGLU primitives (MoeGateUpSwiGLU,
// MoeDownCombine): the kernels of switch_glu.metal launched exactly as
// plan_switch_glu says, the plan the simulator tests run; quantized weights
// with the kernels of switch_glu_quantized.metal (plan_switch_glu_quantized,
// calls of at most 64 slots; ops.cpp composes gather_qmm for larger ones).
#include <stdexcept>
#include <string>

#include <mlx/allocator.h>
#include <mlx/backend/metal/device.h>

#include "metal/dispatch.h"
#include "metal/switch_glu_plan.h"
#include "metal/switch_glu_quantized_plan.h"
#include "primitives.h"

namespace mlx_moe {

namespace {

// The kernels index gate/up [E, H, D] and down [E, D, H] densely, from
// 16-byte aligned rows; gate and up views of one fused gate_up weight are
// neither dense nor (generally) aligned, so they are copied (the layers keep
// separate gate and up weights, which need no copy).
mx::array dense(const mx::array& a, mx::metal::CommandEncoder& encoder, const mx::Stream& s) {
  return metal::aligned_rows(a, encoder, s);
}

// The quantized plan for shapes that may differ from those ops.cpp
// checked: under mx.compile(shapeless=True) the graph (fused kernels or the
// gather_qmm composition) is fixed when traced, so a larger call reaches the
// fused kernels here; they take any row count, but not more than 128 tokens
// with scores.
metal::SwitchGluQuantizedPlan quantized_plan(
    int64_t tokens, int top_k, int64_t D, int64_t H, int64_t E, const WeightQuantization& q, mx::Dtype dtype,
    bool scores) {
  try {
    return metal::plan_switch_glu_quantized(
        tokens, top_k, metal::switch_glu_row_bound(tokens, top_k), D, H, E, q.group_size, q.bits, q.mode, dtype,
        scores);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(
        std::string(e.what()) +
        ". This call was traced (mx.compile(shapeless=True)) with a smaller number of tokens; "
        "compile without shapeless=True to let larger calls take the composed path.");
  }
}

void set_threadgroup_memory(mx::metal::CommandEncoder& encoder, const metal::SwitchGluLaunch& launch) {
  for (size_t i = 0; i < launch.threadgroup_memory.size(); ++i) {
    encoder.set_threadgroup_memory_length(launch.threadgroup_memory[i], static_cast<int>(i));
  }
}

// One quantized weight of a primitive's inputs, from index `first`: packed
// codes (16-byte aligned for the block loads), scales and biases (mxfp4 has
// none: its scales are bound in the unused slot).
struct PackedWeight {
  mx::array codes;
  mx::array scales;
  mx::array biases;
};

PackedWeight packed_weight(
    const std::vector<mx::array>& inputs,
    size_t first,
    const WeightQuantization& q,
    mx::metal::CommandEncoder& encoder,
    const mx::Stream& s) {
  mx::array codes = metal::aligned_rows(inputs[first], encoder, s);
  mx::array scales = metal::row_contiguous(inputs[first + 1], encoder, s);
  mx::array biases = q.has_biases ? metal::row_contiguous(inputs[first + 2], encoder, s) : scales;
  return {codes, scales, biases};
}

void bind(mx::metal::CommandEncoder& encoder, const PackedWeight& w, int first) {
  encoder.set_input_array(w.codes, first);
  encoder.set_input_array(w.scales, first + 1);
  encoder.set_input_array(w.biases, first + 2);
}

}  // namespace

void MoeGateUpSwiGLU::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& s = stream();
  auto& device = mx::metal::device(s.device);
  auto& encoder = mx::metal::get_command_encoder(s);
  if (quantization_) {
    // Inputs: x [T, D], gate and up (codes [E, H, D * bits / 32], scales,
    // [biases]), order, offsets, sorted_experts. ops.cpp checked the plan
    // accepts the shapes (calls of more than 64 slots compose gather_qmm).
    const auto& q = *quantization_;
    const size_t per_weight = q.inputs_per_weight();
    const mx::array& x = inputs[0];
    const PackedWeight gate = packed_weight(inputs, 1, q, encoder, s);
    const PackedWeight up = packed_weight(inputs, 1 + per_weight, q, encoder, s);
    const mx::array& order = inputs[1 + 2 * per_weight];
    const mx::array& offsets = inputs[2 + 2 * per_weight];
    const int64_t tokens = x.shape(0), D = x.shape(1);
    const int64_t E = gate.codes.shape(0), H = gate.codes.shape(1);
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const auto plan = quantized_plan(tokens, top_k_, D, H, E, q, out.dtype(), false);
    const auto& launch = plan.gate_up;
    if (metal::empty_grid(launch.grid)) {
      return;
    }
    metal::use_kernel(device, encoder, launch.kernel, launch.threads);
    // Buffers as switch_glu_quantized.metal: 0 x, 1-3 gate, 4-6 up, 7 order,
    // 8 offsets, 9 hidden, 10 params.
    encoder.set_input_array(x, 0);
    bind(encoder, gate, 1);
    bind(encoder, up, 4);
    encoder.set_input_array(order, 7);
    encoder.set_input_array(offsets, 8);
    encoder.set_output_array(out, 9);
    encoder.set_bytes(plan.params, 10);
    set_threadgroup_memory(encoder, launch);
    metal::dispatch(encoder, launch.grid, launch.threads);
    return;
  }
  // Inputs: x [T, D], gate [E, H, D], up [E, H, D], order, offsets, sorted_experts.
  const mx::array& x = inputs[0];
  const mx::array gate = dense(inputs[1], encoder, s);
  const mx::array up = dense(inputs[2], encoder, s);
  const mx::array& order = inputs[3];
  const mx::array& offsets = inputs[4];
  const int64_t tokens = x.shape(0), D = x.shape(1);
  const int64_t E = gate.shape(0), H = gate.shape(1);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  // gate_up's kernel choice does not depend on scores: plan without them.
  const auto plan = metal::plan_switch_glu(
      tokens, top_k_, metal::switch_glu_row_bound(tokens, top_k_), D, H, E, out.dtype(), false);
  const auto& launch = plan.gate_up;
  if (metal::empty_grid(launch.grid)) {
    return;  // no tokens or H == 0: hidden is empty
  }
  metal::use_kernel(device, encoder, launch.kernel, launch.threads);
  // Buffers as switch_glu.metal: 0 x, 1 gate, 2 up, 3 order, 4 offsets, 5 hidden, 6 params.
  encoder.set_input_array(x, 0);
  encoder.set_input_array(gate, 1);
  encoder.set_input_array(up, 2);
  encoder.set_input_array(order, 3);
  encoder.set_input_array(offsets, 4);
  encoder.set_output_array(out, 5);
  encoder.set_bytes(plan.params, 6);
  set_threadgroup_memory(encoder, launch);
  metal::dispatch(encoder, launch.grid, launch.threads);
}

void MoeDownCombine::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& s = stream();
  auto& device = mx::metal::device(s.device);
  auto& encoder = mx::metal::get_command_encoder(s);
  if (quantization_) {
    // Inputs: hidden [T * k, H] (sorted order), down (codes [E, D, H * bits /
    // 32], scales, [biases]), order, offsets, sorted_experts, [scores].
    const auto& q = *quantization_;
    const size_t per_weight = q.inputs_per_weight();
    const mx::array& hidden = inputs[0];
    const PackedWeight down = packed_weight(inputs, 1, q, encoder, s);
    const mx::array& order = inputs[1 + per_weight];
    const mx::array& offsets = inputs[2 + per_weight];
    const bool has_scores = inputs.size() > 4 + per_weight;
    const int64_t slots = hidden.shape(0), H = hidden.shape(1);
    const int64_t tokens = slots / top_k_;
    const int64_t E = down.codes.shape(0), D = down.codes.shape(1);
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const auto plan = quantized_plan(tokens, top_k_, D, H, E, q, out.dtype(), has_scores);
    const auto& launch = plan.down;
    if (metal::empty_grid(launch.grid)) {
      return;
    }
    metal::use_kernel(device, encoder, launch.kernel, launch.threads);
    // Buffers as switch_glu_quantized.metal: 0 hidden, 1-3 down, 4 order,
    // 5 offsets, 6 out, 7 params, 8 scores.
    encoder.set_input_array(hidden, 0);
    bind(encoder, down, 1);
    encoder.set_input_array(order, 4);
    encoder.set_input_array(offsets, 5);
    encoder.set_output_array(out, 6);
    encoder.set_bytes(plan.params, 7);
    if (has_scores) {
      encoder.set_input_array(inputs[4 + per_weight], 8);
    }
    set_threadgroup_memory(encoder, launch);
    metal::dispatch(encoder, launch.grid, launch.threads);
    return;
  }
  // Inputs: hidden [T * k, H] (sorted order), down [E, D, H], order, offsets,
  // sorted_experts, [scores [T, k] float32].
  const mx::array& hidden = inputs[0];
  const mx::array down = dense(inputs[1], encoder, s);
  const mx::array& order = inputs[2];
  const mx::array& offsets = inputs[3];
  const bool has_scores = inputs.size() > 5;
  const int64_t slots = hidden.shape(0);
  const int64_t tokens = slots / top_k_;
  const int64_t E = down.shape(0), D = down.shape(1), H = down.shape(2);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const auto plan = metal::plan_switch_glu(
      tokens, top_k_, metal::switch_glu_row_bound(tokens, top_k_), D, H, E, out.dtype(), has_scores);
  const auto& launch = plan.down;
  if (metal::empty_grid(launch.grid)) {
    return;  // no tokens or D == 0: out is empty
  }
  // Prefill with scores: down writes each slot's scaled row to a float32
  // scratch [T * k, D], the combine launch sums a token's k rows (no atomics).
  const bool two_step = !plan.combine.kernel.empty();
  std::optional<mx::array> scratch;
  if (two_step) {
    scratch = metal::temporary(encoder, {static_cast<int>(slots), static_cast<int>(D)}, mx::float32);
  }
  metal::use_kernel(device, encoder, launch.kernel, launch.threads);
  // Buffers as switch_glu.metal: 0 hidden, 1 down, 2 order, 3 offsets,
  // 4 out (or the scratch), 5 params, 6 scores.
  encoder.set_input_array(hidden, 0);
  encoder.set_input_array(down, 1);
  encoder.set_input_array(order, 2);
  encoder.set_input_array(offsets, 3);
  encoder.set_output_array(two_step ? *scratch : out, 4);
  encoder.set_bytes(plan.params, 5);
  if (has_scores) {
    encoder.set_input_array(inputs[5], 6);
  }
  set_threadgroup_memory(encoder, launch);
  metal::dispatch(encoder, launch.grid, launch.threads);
  if (two_step) {
    const auto& combine = plan.combine;
    metal::use_kernel(device, encoder, combine.kernel, combine.threads);
    // Buffers: 0 scratch, 1 out [T, D], 2 params.
    encoder.set_input_array(*scratch, 0);
    encoder.set_output_array(out, 1);
    encoder.set_bytes(plan.params, 2);
    set_threadgroup_memory(encoder, combine);
    metal::dispatch(encoder, combine.grid, combine.threads);
  }
}

}  // namespace mlx_moe
