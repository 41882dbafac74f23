// MoeRoute::eval_gpu: the counting sort of route.metal, one threadgroup,
// launched as plan_route says (the same plan the simulator tests run).
#include <mlx/allocator.h>
#include <mlx/backend/metal/device.h>

#include "metal/dispatch.h"
#include "primitives.h"

namespace mlx_moe {

void MoeRoute::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  // indices: uint32, row-contiguous (ops.cpp makes it so), T * k entries.
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  auto& s = stream();
  auto& encoder = mx::metal::get_command_encoder(s);
  metal::encode_route(
      mx::metal::device(s.device), encoder, metal::row_contiguous(inputs[0], encoder, s), num_experts_,
      outputs[0], outputs[1], outputs[2], outputs[3]);
}

}  // namespace mlx_moe
