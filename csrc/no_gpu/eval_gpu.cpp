// eval_gpu in builds without our GPU kernels (Linux, and MLX's CUDA
// backend until the CUDA issue): the ops send GPU streams to MLX's own
// operations (ops.cpp, has_kernels_for), so these are never reached.
#include <stdexcept>
#include <string>

#include "primitives.h"

namespace mlx_moe {

namespace {
[[noreturn]] void no_gpu_kernels(const char* op) {
  throw std::runtime_error(
      std::string("[") + op +
      "] This build of mlx_moe_kernels has no GPU kernels; the op should "
      "have used MLX's own operations on this stream.");
}
} // namespace

void GatherMM::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  no_gpu_kernels("gather_mm");
}
void MoeRoute::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  no_gpu_kernels("switch_glu");
}
void MoeGateUpSwiGLU::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  no_gpu_kernels("switch_glu");
}
void MoeDownCombine::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  no_gpu_kernels("switch_glu");
}
void GatherQMM::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  no_gpu_kernels("gather_qmm");
}

} // namespace mlx_moe
