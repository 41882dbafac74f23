// eval_gpu of the primitives that have no GPU kernel in any build: their ops
// send GPU streams to MLX's own operations (mx.fast attention, MLX's
// matmuls), so these are never reached.
#include <stdexcept>

#include "primitives.h"

namespace mlx_moe {

void Attention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[scaled_dot_product_attention] no GPU kernel: the op should have used "
      "mx.fast.scaled_dot_product_attention on this stream.");
}

void Rope::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[rope] no GPU kernel: the op should have used mx.fast.rope on this stream.");
}

void Linear::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[linear] no GPU kernel: the op should have used mx.matmul on this stream.");
}

void QuantizedLinear::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[quantized_linear] no GPU kernel: the op should have used mx.quantized_matmul on this stream.");
}

void SoftmaxTopK::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[softmax_top_k] no GPU kernel: the op should have used MLX's ops on this stream.");
}

void RmsNorm::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[rms_norm] no GPU kernel: the op should have used mx.fast.rms_norm on this stream.");
}

} // namespace mlx_moe
