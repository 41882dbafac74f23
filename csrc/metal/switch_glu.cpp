// eval_gpu of the fused SwitchGLU primitives (MoeGateUpSwiGLU,
// MoeDownCombine): the kernels of switch_glu.metal launched exactly as
// plan_switch_glu says, the plan the simulator tests run. Float weights only:
// ops.cpp sends quantized SwitchGLUs on GPU streams to MLX's gather_qmm.
#include <stdexcept>

#include <mlx/allocator.h>
#include <mlx/backend/metal/device.h>

#include "metal/dispatch.h"
#include "metal/switch_glu_plan.h"
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

void set_threadgroup_memory(mx::metal::CommandEncoder& encoder, const metal::SwitchGluLaunch& launch) {
  for (size_t i = 0; i < launch.threadgroup_memory.size(); ++i) {
    encoder.set_threadgroup_memory_length(launch.threadgroup_memory[i], static_cast<int>(i));
  }
}

[[noreturn]] void no_quantized_kernels() {
  throw std::logic_error(
      "[switch_glu] the quantized SwitchGLU has no Metal dispatch; ops.cpp should have used "
      "MLX's gather_qmm on this stream");
}

}  // namespace

void MoeGateUpSwiGLU::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  if (quantization_) {
    no_quantized_kernels();
  }
  auto& s = stream();
  auto& device = mx::metal::device(s.device);
  auto& encoder = mx::metal::get_command_encoder(s);
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
  metal::use_pipeline(encoder, metal::pipeline(device, launch.kernel), launch.kernel, launch.threads);
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
  if (quantization_) {
    no_quantized_kernels();
  }
  auto& s = stream();
  auto& device = mx::metal::device(s.device);
  auto& encoder = mx::metal::get_command_encoder(s);
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
  metal::use_pipeline(encoder, metal::pipeline(device, launch.kernel), launch.kernel, launch.threads);
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
    metal::use_pipeline(encoder, metal::pipeline(device, combine.kernel), combine.kernel, combine.threads);
    // Buffers: 0 scratch, 1 out [T, D], 2 params.
    encoder.set_input_array(*scratch, 0);
    encoder.set_output_array(out, 1);
    encoder.set_bytes(plan.params, 2);
    set_threadgroup_memory(encoder, combine);
    metal::dispatch(encoder, combine.grid, combine.threads);
  }
}

}  // namespace mlx_moe
