// MoeRoute::eval_gpu: the counting sort of route.metal, one threadgroup,
// launched as plan_route says (the same plan the simulator tests run).
#include <mlx/allocator.h>
#include <mlx/backend/metal/device.h>

#include "metal/dispatch.h"
#include "metal/route_plan.h"
#include "primitives.h"

namespace mlx_moe {

void MoeRoute::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  // indices: uint32, row-contiguous (ops.cpp makes it so), T * k entries.
  const mx::array& indices = inputs[0];
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  auto& s = stream();
  auto& device = mx::metal::device(s.device);
  auto& encoder = mx::metal::get_command_encoder(s);
  auto* kernel = metal::pipeline(device, "moe_route");
  const auto plan = metal::plan_route(
      static_cast<int64_t>(indices.size()), num_experts_,
      static_cast<int64_t>(kernel->maxTotalThreadsPerThreadgroup()));
  metal::use_pipeline(encoder, kernel, plan.kernel, plan.threads);
  // Buffers as route.metal: 0 indices, 1 order, 2 offsets, 3 sorted_experts,
  // 4 error (our status output: 1 if an id is >= E), 5 params. With no slots
  // the kernel still writes offsets (all 0) and the status; the empty slot
  // buffers get a one-word placeholder (Metal buffers cannot be empty).
  if (indices.size() == 0) {
    mx::array placeholder({1}, mx::uint32, nullptr, {});
    placeholder.set_data(mx::allocator::malloc(placeholder.nbytes()));
    encoder.add_temporary(placeholder);
    encoder.set_input_array(placeholder, 0);
    encoder.set_output_array(placeholder, 1);
    encoder.set_output_array(outputs[1], 2);
    encoder.set_output_array(placeholder, 3);
  } else {
    encoder.set_input_array(indices, 0);
    encoder.set_output_array(outputs[0], 1);
    encoder.set_output_array(outputs[1], 2);
    encoder.set_output_array(outputs[2], 3);
  }
  encoder.set_output_array(outputs[3], 4);
  encoder.set_bytes(plan.params, 5);
  metal::dispatch(encoder, plan.grid, plan.threads);
}

}  // namespace mlx_moe
