// The dense projections of a model, x @ W^T with W stored as nn.Linear /
// nn.QuantizedLinear store it ([N, K], or its mx.quantize triple).
//
// On the CPU each is one Linear / QuantizedLinear node (primitives.h),
// whose eval runs the gather kernels over a single matrix (cpu/linear.cpp):
// a few rows (decode) stream W once over all cores, many rows (prefill)
// take the register-tiled or integer paths. Elsewhere (GPU streams) MLX's
// own matmul / quantized_matmul is already tuned and used unchanged.
#include <sstream>
#include <stdexcept>
#include <string>

#include "ops.h"
#include "primitives.h"

namespace mlx_moe {


mx::array linear(mx::array x, mx::array weight, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (weight.ndim() != 2) {
    throw std::invalid_argument(
        "[linear] weight must be a 2-d [out_features, in_features] matrix, got shape " +
        shape_text(weight.shape()) + ".");
  }
  if (x.ndim() == 0) {
    throw std::invalid_argument("[linear] x must have at least one dimension, got a scalar.");
  }
  if (x.shape(-1) != weight.shape(1)) {
    throw std::invalid_argument(
        "[linear] x's last dimension " + std::to_string(x.shape(-1)) + " does not match the " +
        std::to_string(weight.shape(1)) + " input features of weight " + shape_text(weight.shape()) + ".");
  }
  const auto out_type = mx::promote_types(x.dtype(), weight.dtype());
  if (out_type != mx::float32 && out_type != mx::float16 && out_type != mx::bfloat16) {
    std::ostringstream m;
    m << "[linear] Supports float32, float16 and bfloat16 but x (" << x.dtype() << ") and weight ("
      << weight.dtype() << ") promote to " << out_type << ".";
    throw std::invalid_argument(m.str());
  }
  if (!has_kernels_for(stream)) {
    return mx::matmul(x, mx::transpose(weight, stream), stream);
  }
  x = mx::astype(x, out_type, stream);
  weight = mx::astype(weight, out_type, stream);
  auto shape = x.shape();
  shape.back() = weight.shape(0);
  return mx::array(std::move(shape), out_type, std::make_shared<Linear>(stream), {std::move(x), std::move(weight)});
}

mx::array quantized_linear(
    mx::array x,
    mx::array w,
    mx::array scales,
    std::optional<mx::array> biases,
    std::optional<int> group_size,
    std::optional<int> bits,
    const std::string& mode,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  const QuantizationFormat f = quantization_format(group_size, bits, mode, "quantized_linear");
  check_quantized_weight(w, scales, biases, f, "quantized_linear", "w");
  if (w.ndim() != 2) {
    throw std::invalid_argument(
        "[quantized_linear] w must be the 2-d packed [out_features, in_features * bits / 32] weight, got "
        "shape " + shape_text(w.shape()) + ".");
  }
  if (x.ndim() == 0) {
    throw std::invalid_argument("[quantized_linear] x must have at least one dimension, got a scalar.");
  }
  const int K = static_cast<int>(static_cast<int64_t>(w.shape(1)) * 32 / f.bits);
  if (x.shape(-1) != K) {
    throw std::invalid_argument(
        "[quantized_linear] x's last dimension " + std::to_string(x.shape(-1)) + " does not match the " +
        std::to_string(K) + " input features of w " + shape_text(w.shape()) + " (" +
        std::to_string(f.bits) + " bits).");
  }
  if (!has_kernels_for(stream)) {
    return mx::quantized_matmul(x, w, scales, biases, true, f.group_size, f.bits, f.mode, stream);
  }
  const auto out_type = quantized_compute_type(x, scales, biases, f, "quantized_linear");
  std::vector<mx::array> inputs{mx::astype(x, out_type, stream)};
  auto weight = quantized_kernel_inputs(w, scales, biases, f, out_type, stream);
  inputs.insert(inputs.end(), weight.begin(), weight.end());
  auto shape = x.shape();
  shape.back() = w.shape(0);
  return mx::array(
      std::move(shape), out_type, std::make_shared<QuantizedLinear>(stream, f.group_size, f.bits, f.mode),
      std::move(inputs));
}

} // namespace mlx_moe
