// softmax_top_k: the expert choice of a softmax router (Qwen2-MoE,
// Qwen3-MoE): checks, then one SoftmaxTopK node on the CPU, MLX's ops
// elsewhere.
#include <sstream>
#include <stdexcept>

#include "ops.h"
#include "primitives.h"

namespace mlx_moe {

std::pair<mx::array, mx::array> softmax_top_k(mx::array logits, int k, bool normalize, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (logits.ndim() < 1) {
    throw std::invalid_argument("[softmax_top_k] logits must have at least one dimension, got a scalar.");
  }
  if (logits.dtype() != mx::float32 && logits.dtype() != mx::float16 && logits.dtype() != mx::bfloat16) {
    std::ostringstream m;
    m << "[softmax_top_k] logits must be float32, float16 or bfloat16, got " << logits.dtype() << ".";
    throw std::invalid_argument(m.str());
  }
  const int experts = logits.shape(-1);
  if (k < 1 || k > experts) {
    throw std::invalid_argument(
        "[softmax_top_k] k must be in [1, " + std::to_string(experts) + "] (the logits' last dimension), got " +
        std::to_string(k) + ".");
  }
  if (!has_kernels_for(stream)) {
    auto probs = mx::softmax(logits, std::vector<int>{-1}, true, stream);
    // The last k positions of the partition hold the k largest.
    auto start = mx::Shape(logits.ndim(), 0);
    start.back() = experts - k;
    auto indices = mx::stop_gradient(
        mx::slice(mx::argpartition(probs, experts - k, -1, stream), start, logits.shape(), stream), stream);
    auto scores = mx::take_along_axis(probs, indices, -1, stream);
    if (normalize) {
      scores = mx::divide(scores, mx::sum(scores, -1, true, stream), stream);
    }
    return {indices, scores};
  }
  auto shape = logits.shape();
  shape.back() = k;
  auto outputs = mx::array::make_arrays(
      {shape, shape}, {mx::uint32, logits.dtype()}, std::make_shared<SoftmaxTopK>(stream, k, normalize), {logits});
  return {outputs[0], outputs[1]};
}

} // namespace mlx_moe
