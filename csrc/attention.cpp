// The ops around the attention of a decoder layer: scaled_dot_product_attention
// (argument checks, the fallback to MLX's own where we have no kernel, and
// the plain-MLX composition that is its gradient), rope and rms_norm.
#include <sstream>
#include <stdexcept>

#include "mlx/fast.h"

#include "ops.h"
#include "primitives.h"

namespace mlx_moe {

namespace {

[[noreturn]] void attention_error(const std::string& message) {
  throw std::invalid_argument("[scaled_dot_product_attention] " + message);
}

} // namespace

mx::array attention_reference(
    const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal, mx::StreamOrDevice s) {
  const int B = q.shape(0), Hq = q.shape(1), L = q.shape(2);
  const int Hkv = k.shape(1), S = k.shape(2);
  const int G = Hq / Hkv;
  auto repeat_heads = [&](const mx::array& a) {
    if (G == 1) {
      return a;
    }
    auto shape = a.shape();
    auto wide = mx::broadcast_to(mx::expand_dims(a, 2, s), {B, Hkv, G, S, shape[3]}, s);
    return mx::reshape(wide, {B, Hq, S, shape[3]}, s);
  };
  auto keys = mx::astype(repeat_heads(k), mx::float32, s);
  auto values = mx::astype(repeat_heads(v), mx::float32, s);
  auto scores = mx::multiply(
      mx::matmul(mx::astype(q, mx::float32, s), mx::swapaxes(keys, -1, -2, s), s), mx::array(scale), s);
  if (causal) {
    auto rows = mx::add(mx::reshape(mx::arange(L, mx::int32, s), {L, 1}, s), mx::array(S - L), s);
    auto cols = mx::reshape(mx::arange(S, mx::int32, s), {1, S}, s);
    scores = mx::where(
        mx::greater_equal(rows, cols, s), scores, mx::array(-std::numeric_limits<float>::infinity()), s);
  }
  auto weights = mx::softmax(scores, std::vector<int>{-1}, true, s);
  return mx::astype(mx::matmul(weights, values, s), q.dtype(), s);
}

mx::array scaled_dot_product_attention(
    mx::array q, mx::array k, mx::array v, float scale, const std::string& mask, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (mask != "" && mask != "causal") {
    attention_error("mask must be None or \"causal\", got \"" + mask + "\".");
  }
  for (const auto* a : {&q, &k, &v}) {
    if (a->ndim() != 4) {
      const char* name = a == &q ? "q" : (a == &k ? "k" : "v");
      attention_error(std::string(name) + " must be 4-d [batch, heads, length, dim], got shape " + shape_text(a->shape()) + ".");
    }
  }
  if (q.dtype() != k.dtype() || q.dtype() != v.dtype()) {
    std::ostringstream m;
    m << "q, k and v must have one dtype, got " << q.dtype() << ", " << k.dtype() << " and " << v.dtype() << ".";
    attention_error(m.str());
  }
  if (q.dtype() != mx::float32 && q.dtype() != mx::float16 && q.dtype() != mx::bfloat16) {
    std::ostringstream m;
    m << "Supports float32, float16 and bfloat16, got " << q.dtype() << ".";
    attention_error(m.str());
  }
  if (k.shape(0) != q.shape(0) || v.shape(0) != q.shape(0)) {
    attention_error("q " + shape_text(q.shape()) + ", k " + shape_text(k.shape()) + " and v " + shape_text(v.shape()) + " have different batch sizes.");
  }
  if (k.shape(1) != v.shape(1) || k.shape(2) != v.shape(2)) {
    attention_error("k " + shape_text(k.shape()) + " and v " + shape_text(v.shape()) + " must have the same heads and length.");
  }
  if (k.shape(3) != q.shape(3)) {
    attention_error("q " + shape_text(q.shape()) + " and k " + shape_text(k.shape()) + " must have the same head dimension.");
  }
  if (k.shape(1) == 0 || q.shape(1) % k.shape(1) != 0) {
    attention_error(
        "the " + std::to_string(q.shape(1)) + " query heads must be a multiple of the " +
        std::to_string(k.shape(1)) + " key/value heads.");
  }
  if (!has_kernels_for(stream)) {
    return mx::fast::scaled_dot_product_attention(q, k, v, scale, mask, {}, {}, false, stream);
  }
  auto shape = q.shape();
  shape.back() = v.shape(3);
  const auto dtype = q.dtype(); // (read before q is moved into the inputs)
  return mx::array(
      std::move(shape), dtype, std::make_shared<Attention>(stream, scale, mask == "causal"),
      {std::move(q), std::move(k), std::move(v)});
}

mx::array rope(
    mx::array x, int dims, bool traditional, float base, float scale, int offset, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (x.ndim() < 2) {
    throw std::invalid_argument("[rope] x must have at least 2 dimensions (positions, features), got shape " + shape_text(x.shape()) + ".");
  }
  if (dims <= 0 || dims % 2 != 0 || dims > x.shape(-1)) {
    throw std::invalid_argument(
        "[rope] dims must be even, positive and at most x's last dimension " + std::to_string(x.shape(-1)) +
        ", got " + std::to_string(dims) + ".");
  }
  if (x.dtype() != mx::float32 && x.dtype() != mx::float16 && x.dtype() != mx::bfloat16) {
    std::ostringstream m;
    m << "[rope] Supports float32, float16 and bfloat16, got " << x.dtype() << ".";
    throw std::invalid_argument(m.str());
  }
  if (!has_kernels_for(stream)) {
    return mx::fast::rope(x, dims, traditional, base, scale, offset, std::nullopt, stream);
  }
  const auto shape = x.shape();
  const auto dtype = x.dtype();
  return mx::array(
      shape, dtype, std::make_shared<Rope>(stream, dims, traditional, base, scale, offset, false), {std::move(x)});
}

mx::array rms_norm(mx::array x, std::optional<mx::array> weight, float eps, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (x.ndim() < 1) {
    throw std::invalid_argument("[rms_norm] x must have at least one dimension.");
  }
  if (x.dtype() != mx::float32 && x.dtype() != mx::float16 && x.dtype() != mx::bfloat16) {
    std::ostringstream m;
    m << "[rms_norm] Supports float32, float16 and bfloat16, got " << x.dtype() << ".";
    throw std::invalid_argument(m.str());
  }
  if (weight && (weight->ndim() != 1 || weight->shape(0) != x.shape(-1))) {
    throw std::invalid_argument(
        "[rms_norm] weight must be 1-d with x's last dimension " + std::to_string(x.shape(-1)) + ", got shape " +
        shape_text(weight->shape()) + ".");
  }
  if (!has_kernels_for(stream)) {
    return mx::fast::rms_norm(x, weight, eps, stream);
  }
  const auto shape = x.shape();
  // MLX's output dtype: x's promoted with the weight's.
  const auto dtype = weight ? mx::promote_types(x.dtype(), weight->dtype()) : x.dtype();
  std::vector<mx::array> inputs{mx::astype(x, dtype, stream)};
  if (weight) {
    inputs.push_back(mx::astype(*weight, dtype, stream));
  }
  return mx::array(shape, dtype, std::make_shared<RmsNorm>(stream, eps), std::move(inputs));
}

} // namespace mlx_moe
