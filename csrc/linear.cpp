// The dense projections of a model, x @ W^T with W stored as nn.Linear /
// nn.QuantizedLinear store it ([N, K], or its mx.quantize triple).
//
// A dense projection is a gather matmul over a single matrix: every row of
// x goes to matrix 0. On the CPU both ops therefore build the GatherMM /
// GatherQMM primitives over one matrix and run the same kernels as the
// experts: a few rows (decode) stream W once over all cores, many rows
// (prefill) run the register-tiled or blocked dequantizing paths. Elsewhere
// (GPU streams) MLX's own matmul / quantized_matmul is already tuned, so it
// is used unchanged.
#include <sstream>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace mlx_moe {

namespace {

// x's leading dimensions flattened into one row axis behind a batch of
// one: [..., K] -> [1, rows, K] (a view when x is row-contiguous).
mx::array as_single_batch(const mx::array& x, const mx::Stream& stream) {
  int rows = 1;
  for (int d = 0; d + 1 < static_cast<int>(x.ndim()); ++d) {
    rows *= x.shape(d);
  }
  return mx::reshape(x, {1, rows, x.shape(-1)}, stream);
}

// [1, rows, N] -> x's leading dimensions + [N].
mx::array restore_leading(const mx::array& out, const mx::array& x, int N, const mx::Stream& stream) {
  mx::Shape shape(x.shape().begin(), x.shape().end() - 1);
  shape.push_back(N);
  return mx::reshape(out, std::move(shape), stream);
}

mx::array matrix_zero(const mx::Stream& stream) {
  return mx::zeros({1}, mx::uint32, stream);
}

} // namespace

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
  const int N = weight.shape(0);
  // W^T as a [1, K, N] view: K contiguous, the layout the dot kernels
  // stream row by row.
  auto b = mx::expand_dims(mx::transpose(weight, stream), 0, stream);
  auto out = mlx_moe::gather_mm(as_single_batch(x, stream), b, std::nullopt, matrix_zero(stream), true, stream);
  return restore_leading(out, x, N, stream);
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
  const int N = w.shape(0);
  std::optional<mx::array> batched_biases;
  if (biases) {
    batched_biases = mx::expand_dims(*biases, 0, stream);
  }
  auto out = mlx_moe::gather_qmm(
      as_single_batch(x, stream),
      mx::expand_dims(w, 0, stream),
      mx::expand_dims(scales, 0, stream),
      batched_biases,
      std::nullopt,
      matrix_zero(stream),
      true,
      f.group_size,
      f.bits,
      f.mode,
      true,
      stream);
  return restore_leading(out, x, N, stream);
}

} // namespace mlx_moe
