#include "ops.h"

#include <numeric>
#include <sstream>
#include <stdexcept>

#include "metal/gather_mm_plan.h"
#include "metal/gather_qmm_plan.h"
#include "metal/route_plan.h"
#include "metal/switch_glu_plan.h"
#include "metal/switch_glu_quantized_plan.h"
#include "primitives.h"
#include <functional>
#include <limits>
#include <string>
#include <tuple>

namespace mlx_moe {

mx::array row_contiguous(const mx::array& a, const mx::Stream& stream) {
  if (a.is_available() && a.flags().row_contiguous) {
    return a;
  }
  return mx::contiguous(a, false, stream);
}

bool has_kernels_for(const mx::Stream& stream) {
  return stream.device == mx::Device::cpu;
}

namespace {

// Whether this build has the Metal kernels at all.
constexpr bool metal_builds() {
#ifdef MLX_MOE_METAL
  return true;
#else
  return false;
#endif
}

// Whether this build runs the fused float SwitchGLU on `stream` with our
// Metal kernels: Metal builds only, and only shapes the launch plans accept,
// checked here at graph-build time so evaluation cannot fail on them (E over
// the routing kernel's 512, sizes past 32-bit offsets, other dtypes: MLX's
// own ops instead).
bool metal_switch_glu(
    const mx::Stream& stream,
    int64_t tokens,
    int64_t top_k,
    int64_t model_dims,
    int64_t hidden_dims,
    int64_t num_experts,
    mx::Dtype dtype,
    bool scores) {
  if (!metal_builds() || stream.device != mx::Device::gpu) {
    return false;
  }
  try {
    metal::plan_route(tokens * top_k, num_experts);
    metal::plan_switch_glu(
        tokens, top_k, metal::switch_glu_row_bound(tokens, top_k), model_dims, hidden_dims,
        num_experts, dtype, scores);
    return true;
  } catch (const std::invalid_argument&) {
    return false;
  }
}

// Whether gather_mm runs on `stream` with our Metal kernels: a GPU stream
// of a Metal build, non-empty matrices (M, K >= 1), 1..512 matrices in b
// (the routing kernel's limit) and sizes the plan accepts for the worst
// case of all entries on one matrix. a [..., M, K], b [..., K, N], lhs the
// broadcast indices.
bool metal_gather_mm(const mx::Stream& stream, const mx::array& a, const mx::array& b, const mx::array& lhs, mx::Dtype dtype) {
  if (!metal_builds() || stream.device != mx::Device::gpu) {
    return false;
  }
  const int64_t M = a.shape(-2), K = a.shape(-1), N = b.shape(-1);
  if (M < 1 || K < 1) {
    return false;
  }
  const int64_t lhs_batches = static_cast<int64_t>(a.size()) / (M * K);
  const int64_t num_experts = N > 0 ? static_cast<int64_t>(b.size()) / (K * N) : 0;
  const int64_t rows = static_cast<int64_t>(lhs.size()) * M;
  if (lhs_batches < 1 || num_experts < 1) {
    return false;
  }
  try {
    metal::plan_route(static_cast<int64_t>(lhs.size()), num_experts);
    metal::plan_gather_mm(rows, rows, N, K, num_experts, dtype, M, lhs_batches);
    return true;
  } catch (const std::invalid_argument&) {
    return false;
  }
}

// Whether gather_qmm runs on `stream` with our Metal kernels: as
// metal_gather_mm, plus transpose=True (w [..., N, K * bits / 32]) and a
// format the kernels have (affine 2-6/8 bits, mxfp4).
bool metal_gather_qmm(
    const mx::Stream& stream,
    const mx::array& x,
    const mx::array& w,
    const mx::array& lhs,
    const QuantizationFormat& f,
    bool transpose,
    int64_t N,
    mx::Dtype dtype) {
  if (!metal_builds() || stream.device != mx::Device::gpu || !transpose) {
    return false;
  }
  const int64_t M = x.shape(-2), K = x.shape(-1);
  if (M < 1 || K < 1 || N < 1) {
    return false;
  }
  const int64_t lhs_batches = static_cast<int64_t>(x.size()) / (M * K);
  const int64_t num_experts = static_cast<int64_t>(w.size()) / (N * w.shape(-1));
  const int64_t rows = static_cast<int64_t>(lhs.size()) * M;
  if (lhs_batches < 1 || num_experts < 1) {
    return false;
  }
  try {
    metal::plan_route(static_cast<int64_t>(lhs.size()), num_experts);
    metal::plan_gather_qmm(rows, rows, N, K, num_experts, f.group_size, f.bits, f.mode, dtype, M, lhs_batches);
    return true;
  } catch (const std::invalid_argument&) {
    return false;
  }
}

// Whether the quantized SwitchGLU runs fused on `stream` with our Metal
// kernels: a decode-sized call (at most kSwitchGluQuantizedFusedMaxSlots
// slots) in a format they have; larger calls compose our gather_qmm (its
// prefill kernel reuses weight tiles across rows).
bool metal_switch_glu_quantized(
    const mx::Stream& stream,
    int64_t tokens,
    int64_t top_k,
    int64_t model_dims,
    int64_t hidden_dims,
    int64_t num_experts,
    const QuantizationFormat& f,
    mx::Dtype dtype,
    bool scores) {
  if (!metal_builds() || stream.device != mx::Device::gpu ||
      tokens * top_k > metal::kSwitchGluQuantizedFusedMaxSlots) {
    return false;
  }
  try {
    metal::plan_route(tokens * top_k, num_experts);
    metal::plan_switch_glu_quantized(
        tokens, top_k, metal::switch_glu_row_bound(tokens, top_k), model_dims, hidden_dims, num_experts,
        f.group_size, f.bits, f.mode, dtype, scores);
    return true;
  } catch (const std::invalid_argument&) {
    return false;
  }
}

// The MoeRoute outputs (order, offsets, sorted_experts, status) of ids [T, k].
std::vector<mx::array> make_routing(const mx::array& ids, int num_experts, const char* op, const mx::Stream& stream) {
  const int slots = static_cast<int>(ids.size());
  return mx::array::make_arrays(
      {{slots}, {num_experts + 1}, {slots}, {1}},
      {mx::uint32, mx::uint32, mx::uint32, mx::uint32},
      std::make_shared<MoeRoute>(stream, num_experts, op),
      {ids});
}

// An out-of-range expert id known only when the graph runs cannot raise:
// a GPU evaluates asynchronously, and on the CPU an exception thrown from a
// task (MLX's only error channel there) leaks MLX's in-flight task count,
// so that after some repeats `eval` hangs. The routing is then empty and its
// status 1: make the outputs NaN rather than plausible numbers. (Ids
// already evaluated at the call raise there.)
mx::array poison_on_bad_routing(const mx::array& out, const mx::array& status, const mx::Stream& stream) {
  auto ok = mx::equal(status, mx::array(0u, mx::uint32), stream);
  return mx::where(ok, out, mx::array(std::numeric_limits<float>::quiet_NaN(), out.dtype()), stream);
}

template <typename T>
void check_index_values(const mx::array& indices, int64_t bound, const char* op, const char* name) {
  const T* data = indices.data<T>();
  const auto& shape = indices.shape();
  const auto& strides = indices.strides();
  const int ndim = indices.ndim();
  for (size_t i = 0; i < indices.size(); ++i) {
    int64_t offset = 0;
    int64_t rest = static_cast<int64_t>(i);
    for (int d = ndim - 1; d >= 0 && rest > 0; --d) {
      offset += (rest % shape[d]) * strides[d];
      rest /= shape[d];
    }
    const int64_t value = static_cast<int64_t>(data[offset]);
    if (value < 0 || value >= bound) {
      std::ostringstream msg;
      msg << "[" << op << "] " << name << " holds " << value << ", outside [0, " << bound
          << ").";
      throw std::out_of_range(msg.str());
    }
  }
}

// When an index array already holds values (not a lazy graph node), check
// its range on the host now, so the error points at the call. Lazy indices
// are checked by the kernel when it runs.
void check_evaluated_indices(
    const mx::array& indices,
    int64_t bound,
    const char* op,
    const char* name) {
  if (indices.size() == 0 || !indices.is_available()) {
    return;
  }
  switch (indices.dtype()) {
    case mx::uint8: return check_index_values<uint8_t>(indices, bound, op, name);
    case mx::uint16: return check_index_values<uint16_t>(indices, bound, op, name);
    case mx::uint32: return check_index_values<uint32_t>(indices, bound, op, name);
    case mx::uint64: return check_index_values<uint64_t>(indices, bound, op, name);
    case mx::int8: return check_index_values<int8_t>(indices, bound, op, name);
    case mx::int16: return check_index_values<int16_t>(indices, bound, op, name);
    case mx::int32: return check_index_values<int32_t>(indices, bound, op, name);
    case mx::int64: return check_index_values<int64_t>(indices, bound, op, name);
    default: return;
  }
}

// Integer indices as the primitives take them: uint32. Values already
// computed are range-checked now; lazy 64-bit values that would wrap into
// range when narrowed are mapped to 0xFFFFFFFF, which the kernels reject.
mx::array checked_uint32_indices(
    const mx::array& indices,
    int64_t bound,
    const char* op,
    const char* name,
    const mx::Stream& s) {
  if (!mx::issubdtype(indices.dtype(), mx::integer)) {
    std::ostringstream msg;
    msg << "[" << op << "] Got " << name << " with invalid dtype " << indices.dtype()
        << ". Indices must be integral.";
    throw std::invalid_argument(msg.str());
  }
  check_evaluated_indices(indices, bound, op, name);
  mx::array values = indices;
  if (values.dtype().size() == 8) {
    auto outside = mx::logical_or(
        mx::less(values, mx::array(0, values.dtype()), s),
        mx::greater_equal(values, mx::array(bound, values.dtype()), s),
        s);
    values = mx::where(
        outside, mx::array(0xFFFFFFFFu, mx::uint32), mx::astype(values, mx::uint32, s), s);
  }
  return mx::astype(values, mx::uint32, s);
}

// Indices as the primitive takes them: uint32, or the default arange over
// the batch when not given (as mx.gather_mm does).
mx::array indices_or_default(
    const std::optional<mx::array>& indices,
    const mx::array& x,
    const char* name,
    const mx::Stream& s,
    const char* op = "gather_mm") {
  if (x.ndim() < 2) {
    std::ostringstream msg;
    msg << "[" << op << "] Input must have at least two dimensions but got input with shape "
        << x.shape() << ".";
    throw std::invalid_argument(msg.str());
  }
  int64_t batch = std::accumulate(
      x.shape().begin(), x.shape().end() - 2, int64_t{1}, std::multiplies<int64_t>());
  if (indices.has_value()) {
    return checked_uint32_indices(*indices, batch, op, name, s);
  }
  mx::Shape shape(x.shape().begin(), x.shape().end() - 2);
  return mx::reshape(mx::arange(static_cast<double>(batch), mx::uint32, s), shape, s);
}

} // namespace

mx::array gather_mm(
    mx::array a,
    mx::array b,
    std::optional<mx::array> lhs_indices_in,
    std::optional<mx::array> rhs_indices_in,
    bool sorted_indices,
    mx::StreamOrDevice s) {
  if (!lhs_indices_in && !rhs_indices_in) {
    return mx::matmul(a, b, s);
  }
  auto stream = mx::to_stream(s);
  if (!has_kernels_for(stream) && !metal_builds()) {
    return mx::gather_mm(a, b, lhs_indices_in, rhs_indices_in, sorted_indices, stream);
  }
  const mx::array a_in = a, b_in = b;

  const int in_a_ndim = a.ndim();
  const int in_b_ndim = b.ndim();
  if (a.ndim() == 0 || b.ndim() == 0) {
    throw std::invalid_argument(
        "[gather_mm] Got 0 dimension input. Inputs must have at least one dimension.");
  }
  if (a.ndim() == 1) {
    a = mx::expand_dims(a, 0, stream);
  }
  if (b.ndim() == 1) {
    b = mx::expand_dims(b, 1, stream);
  }
  if (a.shape(-1) != b.shape(-2)) {
    std::ostringstream msg;
    msg << "[gather_mm] Last dimension of first input with shape " << a.shape()
        << " must match second to last dimension of second input with shape " << b.shape()
        << ".";
    throw std::invalid_argument(msg.str());
  }

  auto out_type = mx::promote_types(a.dtype(), b.dtype());
  if (!mx::issubdtype(out_type, mx::floating)) {
    std::ostringstream msg;
    msg << "[gather_mm] Only real floating point types are supported but " << a.dtype()
        << " and " << b.dtype() << " were provided which results in " << out_type
        << ", which is not a real floating point type.";
    throw std::invalid_argument(msg.str());
  }
  if (out_type != mx::float32 && out_type != mx::float16 && out_type != mx::bfloat16) {
    std::ostringstream msg;
    msg << "[gather_mm] Supports float32, float16 and bfloat16 but " << a.dtype() << " and "
        << b.dtype() << " result in " << out_type << ".";
    throw std::invalid_argument(msg.str());
  }
  a = mx::astype(a, out_type, stream);
  b = mx::astype(b, out_type, stream);

  mx::array lhs = indices_or_default(lhs_indices_in, a, "lhs_indices", stream);
  mx::array rhs = indices_or_default(rhs_indices_in, b, "rhs_indices", stream);
  auto broadcast = mx::broadcast_arrays({lhs, rhs}, stream);
  const bool lhs_is_identity = !lhs_indices_in && broadcast[0].shape() == lhs.shape();
  lhs = broadcast[0];
  rhs = broadcast[1];
  if (!has_kernels_for(stream) && !metal_gather_mm(stream, a, b, lhs, out_type)) {
    return mx::gather_mm(a_in, b_in, lhs_indices_in, rhs_indices_in, sorted_indices, stream);
  }

  auto out_shape = lhs.shape();
  out_shape.push_back(a.shape(-2));
  out_shape.push_back(b.shape(-1));
  auto out = mx::array(
      std::move(out_shape),
      out_type,
      std::make_shared<GatherMM>(stream, sorted_indices, lhs_is_identity),
      {std::move(a), std::move(b), std::move(lhs), std::move(rhs)});

  std::vector<int> axes;
  if (in_a_ndim == 1) {
    axes.push_back(out.ndim() - 2);
  }
  if (in_b_ndim == 1) {
    axes.push_back(out.ndim() - 1);
  }
  return axes.empty() ? out : mx::squeeze(out, axes, stream);
}

} // namespace mlx_moe

namespace mlx_moe {

namespace {

[[noreturn]] void quantized_error(const std::string& message) {
  throw std::invalid_argument("[gather_qmm] " + message);
}

} // namespace

std::string shape_text(const mx::Shape& shape) {
  std::ostringstream out;
  out << shape;
  return out.str();
}

QuantizationFormat quantization_format(
    std::optional<int> group_size,
    std::optional<int> bits,
    const std::string& mode,
    const char* op) {
  const std::string where = std::string("[") + op + "] ";
  QuantizationFormat f;
  f.mode = mode;
  if (mode == "affine") {
    f.group_size = group_size.value_or(64);
    f.bits = bits.value_or(4);
    if (f.bits < 1 || f.bits > 8 || f.bits == 7) {
      throw std::invalid_argument(
          where + "affine quantization supports bits 1, 2, 3, 4, 5, 6 and 8, got " +
          std::to_string(f.bits) + ".");
    }
    if (f.group_size != 32 && f.group_size != 64 && f.group_size != 128) {
      throw std::invalid_argument(
          where + "affine quantization supports group_size 32, 64 and 128, got " +
          std::to_string(f.group_size) + ".");
    }
  } else if (mode == "mxfp4") {
    f.group_size = group_size.value_or(32);
    f.bits = bits.value_or(4);
    if (f.group_size != 32 || f.bits != 4) {
      throw std::invalid_argument(
          where + "mxfp4 quantization has group_size 32 and bits 4, got group_size " +
          std::to_string(f.group_size) + " and bits " + std::to_string(f.bits) + ".");
    }
  } else {
    throw std::invalid_argument(
        where + "quantization mode '" + mode +
        "' is not supported (supported: 'affine', 'mxfp4').");
  }
  return f;
}

mx::Dtype quantized_compute_type(
    const mx::array& x,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const QuantizationFormat& format,
    const char* op) {
  auto type = x.dtype();
  if (format.mode == "affine") {
    type = mx::promote_types(type, mx::promote_types(scales.dtype(), biases->dtype()));
  }
  if (type != mx::float32 && type != mx::float16 && type != mx::bfloat16) {
    std::ostringstream m;
    m << "[" << op << "] Supports float32, float16 and bfloat16 activations but x (" << x.dtype()
      << ") and the scales promote to " << type << ".";
    throw std::invalid_argument(m.str());
  }
  return type;
}

std::vector<mx::array> quantized_kernel_inputs(
    const mx::array& w,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const QuantizationFormat& format,
    mx::Dtype type,
    const mx::Stream& stream) {
  std::vector<mx::array> in{row_contiguous(w, stream)};
  if (format.mode == "affine") {
    in.push_back(row_contiguous(mx::astype(scales, type, stream), stream));
    in.push_back(row_contiguous(mx::astype(*biases, type, stream), stream));
  } else {
    in.push_back(row_contiguous(scales, stream));
  }
  return in;
}

void check_quantized_weight(
    const mx::array& w,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const QuantizationFormat& f,
    const char* op,
    const std::string& name) {
  const std::string where = std::string("[") + op + "] ";
  if (w.dtype() != mx::uint32) {
    std::ostringstream m;
    m << where << name << " must be the uint32 packed weight of mx.quantize, got dtype " << w.dtype()
      << ".";
    throw std::invalid_argument(m.str());
  }
  if (w.ndim() < 2) {
    throw std::invalid_argument(
        where + name + " must have at least two dimensions, got shape " + shape_text(w.shape()) + ".");
  }
  const int64_t packed = w.shape(-1);
  if ((packed * 32) % f.bits != 0) {
    throw std::invalid_argument(
        where + name + "'s last dimension " + std::to_string(packed) + " is not a whole number of " +
        std::to_string(f.bits) + "-bit elements.");
  }
  const int64_t length = packed * 32 / f.bits;
  if (length % f.group_size != 0) {
    throw std::invalid_argument(
        where + name + " holds rows of " + std::to_string(length) +
        " elements, not a multiple of group_size " + std::to_string(f.group_size) + ".");
  }
  mx::Shape expected = w.shape();
  expected.back() = static_cast<int>(length / f.group_size);
  if (scales.shape() != expected) {
    throw std::invalid_argument(
        where + "scales of " + name + " must have shape " + shape_text(expected) + " for " +
        name + " " + shape_text(w.shape()) + " (" + std::to_string(f.bits) + " bits, group_size " +
        std::to_string(f.group_size) + "), got " + shape_text(scales.shape()) + ".");
  }
  if (f.mode == "affine") {
    if (!mx::issubdtype(scales.dtype(), mx::floating)) {
      throw std::invalid_argument(where + "affine scales of " + name + " must be floating point.");
    }
    if (!biases) {
      throw std::invalid_argument(where + "affine quantization needs the biases of " + name + ".");
    }
    if (biases->shape() != expected || !mx::issubdtype(biases->dtype(), mx::floating)) {
      throw std::invalid_argument(
          where + "biases of " + name + " must be floating point with shape " + shape_text(expected) +
          ", got " + shape_text(biases->shape()) + ".");
    }
  } else {
    if (scales.dtype() != mx::uint8) {
      throw std::invalid_argument(where + "mxfp4 scales of " + name + " must be uint8 (E8M0).");
    }
    if (biases) {
      throw std::invalid_argument(where + "mxfp4 quantization has no biases (" + name + ").");
    }
  }
}

mx::array gather_qmm(
    mx::array x,
    mx::array w,
    mx::array scales,
    std::optional<mx::array> biases,
    std::optional<mx::array> lhs_indices_in,
    std::optional<mx::array> rhs_indices_in,
    bool transpose,
    std::optional<int> group_size,
    std::optional<int> bits,
    const std::string& mode,
    bool sorted_indices,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  const QuantizationFormat f = quantization_format(group_size, bits, mode, "gather_qmm");
  auto mlx_gather_qmm = [&, x_in = x, w_in = w, scales_in = scales, biases_in = biases]() {
    return mx::gather_qmm(
        x_in, w_in, scales_in, biases_in, lhs_indices_in, rhs_indices_in, transpose, f.group_size, f.bits,
        f.mode, std::nullopt, sorted_indices, stream);
  };
  if (!has_kernels_for(stream) && !metal_builds()) {
    return mlx_gather_qmm();
  }
  check_quantized_weight(w, scales, biases, f, "gather_qmm", "w");
  if (x.ndim() < 2) {
    quantized_error("x must have at least two dimensions, got shape " + shape_text(x.shape()) + ".");
  }
  const int length = static_cast<int>(static_cast<int64_t>(w.shape(-1)) * 32 / f.bits);
  const int K = transpose ? length : w.shape(-2);
  const int N = transpose ? w.shape(-2) : length;
  if (x.shape(-1) != K) {
    quantized_error(
        "x's last dimension " + std::to_string(x.shape(-1)) + " does not match the " +
        std::to_string(K) + " input features of w " + shape_text(w.shape()) +
        (transpose ? " (transpose=True: w is [..., N, K])" : " (transpose=False: w is [..., K, N])") + ".");
  }
  const auto out_type = quantized_compute_type(x, scales, biases, f, "gather_qmm");
  x = mx::astype(x, out_type, stream);
  std::vector<mx::array> weight = quantized_kernel_inputs(w, scales, biases, f, out_type, stream);
  w = weight[0];

  mx::array lhs = indices_or_default(lhs_indices_in, x, "lhs_indices", stream, "gather_qmm");
  mx::array rhs = indices_or_default(rhs_indices_in, w, "rhs_indices", stream, "gather_qmm");
  auto broadcast = mx::broadcast_arrays({lhs, rhs}, stream);
  const bool lhs_is_identity = !lhs_indices_in && broadcast[0].shape() == lhs.shape();
  lhs = broadcast[0];
  rhs = broadcast[1];
  if (!has_kernels_for(stream) && !metal_gather_qmm(stream, x, w, lhs, f, transpose, N, out_type)) {
    return mlx_gather_qmm();
  }

  auto out_shape = lhs.shape();
  out_shape.push_back(x.shape(-2));
  out_shape.push_back(N);
  std::vector<mx::array> inputs{std::move(x)};
  inputs.insert(inputs.end(), weight.begin(), weight.end());
  inputs.push_back(std::move(lhs));
  inputs.push_back(std::move(rhs));
  return mx::array(
      std::move(out_shape),
      out_type,
      std::make_shared<GatherQMM>(
          stream, f.group_size, f.bits, f.mode, transpose, sorted_indices, lhs_is_identity),
      std::move(inputs));
}

} // namespace mlx_moe

namespace mlx_moe {

namespace {

// The SwitchGLU as a composition of MLX's gather matmuls and ops, mlx-lm's
// formula: the fallback on devices without our kernels.
// x [T, D], gate/up [E, H, D], down [E, D, H], indices [T, k] uint32,
// scores [T, k] or none. Returns [T, D] with scores, else [T, k, D].
mx::array switch_glu_composed(
    const mx::array& x,
    const mx::array& gate,
    const mx::array& up,
    const mx::array& down,
    const mx::array& indices,
    const std::optional<mx::array>& scores,
    const mx::Stream& s) {
  const int tokens = x.shape(0);
  const int top_k = indices.shape(1);
  auto matmul = [&](const mx::array& a,
                    const mx::array& weight,
                    std::optional<mx::array> lhs) {
    auto b = mx::swapaxes(weight, -1, -2, s);
    return mx::gather_mm(a, b, lhs, indices, false, s);
  };
  auto rows = mx::expand_dims(x, 1, s); // [T, 1, D]
  auto token_of_slot = mx::broadcast_to(
      mx::reshape(mx::arange(tokens, mx::uint32, s), {tokens, 1}, s), {tokens, top_k}, s);
  auto g = matmul(rows, gate, token_of_slot); // [T, k, 1, H]
  auto u = matmul(rows, up, token_of_slot);
  auto h = mx::multiply(mx::multiply(g, mx::sigmoid(g, s), s), u, s);
  auto y = mx::squeeze(matmul(h, down, std::nullopt), 2, s); // [T, k, D]
  if (scores) {
    y = mx::sum(mx::multiply(y, mx::expand_dims(mx::astype(*scores, y.dtype(), s), -1, s), s), 1, false, s);
  }
  return y;
}

void require(bool condition, const std::function<std::string()>& message) {
  if (!condition) {
    throw std::invalid_argument("[switch_glu] " + message());
  }
}

// Expert parallelism: the weights hold experts [first, first + E) of a
// larger set. A slot's expert id becomes its local index, and a slot routed
// to another rank's experts goes to bucket E: the routing then has E + 1
// buckets, and the kernels, which walk the weights' E experts, never touch
// bucket E (no reads of absent experts, no rows computed for them).
struct LocalSlots {
  mx::array ids; // uint32 [tokens, k], in [0, E]
  mx::array here; // bool [tokens, k]: the slot's expert is in this rank's range
};

LocalSlots local_slots(const mx::array& indices, int first, int num_experts, int tokens, int top_k,
                       const mx::Stream& stream) {
  require(mx::issubdtype(indices.dtype(), mx::integer), [&] {
    std::ostringstream m;
    m << "indices must be integers, got " << indices.dtype() << ".";
    return m.str();
  });
  require(first >= 0, [&] { return "first_expert must be >= 0, got " + std::to_string(first) + "."; });
  auto local = mx::subtract(mx::astype(indices, mx::int64, stream), mx::array(int64_t{first}), stream);
  auto here = mx::logical_and(
      mx::greater_equal(local, mx::array(int64_t{0}), stream),
      mx::less(local, mx::array(int64_t{num_experts}), stream), stream);
  auto ids = mx::astype(mx::where(here, local, mx::array(int64_t{num_experts}), stream), mx::uint32, stream);
  return {mx::reshape(ids, {tokens, top_k}, stream), mx::reshape(here, {tokens, top_k}, stream)};
}

// The output rows [tokens * k, D] of slots routed to other ranks set to
// zero (the kernels never write them).
mx::array zero_other_ranks_rows(const mx::array& out, const mx::array& here, const mx::Stream& stream) {
  auto mask = mx::reshape(here, {-1, 1}, stream);
  return mx::where(mask, out, mx::zeros({1}, out.dtype(), stream), stream);
}

// The score-weighted sum of per-slot rows [tokens * k, D] -> [tokens, D].
mx::array weighted_slot_sum(const mx::array& rows, const mx::array& scores, int tokens, int top_k,
                            const mx::Stream& stream) {
  auto per_token = mx::reshape(rows, {tokens, top_k, rows.shape(1)}, stream);
  auto weights = mx::expand_dims(mx::astype(scores, rows.dtype(), stream), -1, stream);
  return mx::sum(mx::multiply(per_token, weights, stream), 1, false, stream);
}

} // namespace

std::pair<mx::array, mx::array> route(mx::array indices, int num_experts, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (num_experts <= 0) {
    throw std::invalid_argument("[route] num_experts must be positive.");
  }
  // Always on the CPU: a sort of T * k integers (the GPU's routing kernel
  // runs inside switch_glu only). Apple silicon's unified memory (and
  // CUDA's managed memory) needs no copies for it.
  if (stream.device != mx::Device::cpu) {
    stream = mx::default_stream(mx::Device::cpu);
  }
  auto idx = checked_uint32_indices(indices, num_experts, "route", "indices", stream);
  idx = mx::flatten(idx, stream);
  auto outputs = make_routing(idx, num_experts, "route", stream);
  // A lazily computed id out of range cannot raise during evaluation (see
  // poison_on_bad_routing): every offset is then 0xFFFFFFFF, a range no
  // caller can mistake for a routing.
  auto ok = mx::equal(outputs[3], mx::array(0u, mx::uint32), stream);
  auto offsets = mx::where(ok, outputs[1], mx::array(0xFFFFFFFFu, mx::uint32), stream);
  return {outputs[0], offsets};
}

mx::array switch_glu(
    mx::array x,
    std::optional<mx::array> gate_weight,
    mx::array up_weight,
    mx::array down_weight,
    mx::array indices,
    std::optional<mx::array> scores,
    std::optional<int> first_expert,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  const bool fused = !gate_weight.has_value();
  require(x.ndim() >= 1, [&] { return std::string("x must have at least one dimension."); });
  require(down_weight.ndim() == 3, [&] {
    return "down_weight must be [E, D, H] but has shape " + shape_text(down_weight.shape()) + ".";
  });
  const int num_experts = down_weight.shape(0);
  const int model_dims = down_weight.shape(1);
  const int hidden_dims = down_weight.shape(2);
  require(x.shape(-1) == model_dims, [&] {
    return "x's last dimension " + std::to_string(x.shape(-1)) +
        " does not match down_weight [E, D, H] = " + shape_text(down_weight.shape()) + ".";
  });
  const mx::Shape projection{num_experts, (fused ? 2 : 1) * hidden_dims, model_dims};
  require(up_weight.shape() == projection, [&] {
    return std::string(fused ? "the fused gate_up weight (passed as up_weight with gate_weight=None)"
                             : "up_weight") +
        " must have shape " + shape_text(projection) + " to match down_weight " +
        shape_text(down_weight.shape()) + ", but has shape " + shape_text(up_weight.shape()) + ".";
  });
  if (!fused) {
    require(gate_weight->shape() == projection, [&] {
      return "gate_weight must have shape " + shape_text(projection) + " but has shape " +
          shape_text(gate_weight->shape()) + ".";
    });
  }
  require(indices.ndim() == x.ndim(), [&] {
    return "indices must be [..., k] with the leading dimensions of x " + shape_text(x.shape()) +
        ", but has shape " + shape_text(indices.shape()) + ".";
  });
  for (int d = 0; d + 1 < static_cast<int>(x.ndim()); ++d) {
    require(indices.shape(d) == x.shape(d), [&] {
      return "indices " + shape_text(indices.shape()) +
          " must have the leading dimensions of x " + shape_text(x.shape()) + ".";
    });
  }
  const int top_k = indices.shape(-1);
  require(top_k >= 1, [&] { return std::string("indices must select at least one expert per token (k >= 1)."); });
  require(top_k <= num_experts || first_expert, [&] {
    return "indices selects k=" + std::to_string(top_k) + " experts per token but there are only " +
        std::to_string(num_experts) + " experts.";
  });
  if (scores) {
    require(scores->shape() == indices.shape(), [&] {
      return "scores must have the shape of indices " + shape_text(indices.shape()) + " but has shape " +
          shape_text(scores->shape()) + ".";
    });
    require(mx::issubdtype(scores->dtype(), mx::floating), [&] {
      std::ostringstream m;
      m << "scores must be floating point, got " << scores->dtype() << ".";
      return m.str();
    });
  }

  // dtype: promoted over x and the weights, as mlx-lm's matmuls would.
  auto dtype = mx::promote_types(x.dtype(), mx::promote_types(up_weight.dtype(), down_weight.dtype()));
  if (!fused) {
    dtype = mx::promote_types(dtype, gate_weight->dtype());
  }
  if (dtype != mx::float32 && dtype != mx::float16 && dtype != mx::bfloat16) {
    std::ostringstream m;
    m << "[switch_glu] Supports float32, float16 and bfloat16 inputs but they promote to " << dtype << ".";
    throw std::invalid_argument(m.str());
  }
  const auto out_dtype = scores ? mx::promote_types(dtype, scores->dtype()) : dtype;

  mx::Shape lead(x.shape().begin(), x.shape().end() - 1);
  const int tokens = std::accumulate(lead.begin(), lead.end(), 1, std::multiplies<int>());
  auto x2 = mx::reshape(mx::astype(x, dtype, stream), {tokens, model_dims}, stream);
  std::optional<LocalSlots> local;
  if (first_expert) {
    local = local_slots(indices, *first_expert, num_experts, tokens, top_k, stream);
  }
  auto idx = local ? local->ids
                   : mx::reshape(
                         checked_uint32_indices(indices, num_experts, "switch_glu", "indices", stream),
                         {tokens, top_k}, stream);
  std::optional<mx::array> scores2;
  if (scores) {
    scores2 = mx::reshape(mx::astype(*scores, mx::float32, stream), {tokens, top_k}, stream);
  }
  auto cast = [&](const mx::array& w) { return mx::astype(w, dtype, stream); };

  auto finish = [&](mx::array out) {
    mx::Shape shape = lead;
    if (!scores) {
      shape.push_back(top_k);
    }
    shape.push_back(model_dims);
    return mx::astype(mx::reshape(out, shape, stream), out_dtype, stream);
  };

  // Inputs of the fused graph: x, gate (or gate_up), [up], down, indices,
  // [scores]. gate and up are views of gate_up when fused (no copy).
  std::vector<mx::array> inputs{mx::contiguous(x2, false, stream)};
  if (fused) {
    inputs.push_back(row_contiguous(cast(up_weight), stream));
  } else {
    inputs.push_back(row_contiguous(cast(*gate_weight), stream));
    inputs.push_back(row_contiguous(cast(up_weight), stream));
  }
  inputs.push_back(row_contiguous(cast(down_weight), stream));
  inputs.push_back(mx::contiguous(idx, false, stream));
  if (scores2) {
    inputs.push_back(mx::contiguous(*scores2, false, stream));
  }
  const bool has_scores = scores.has_value();
  // Unpacks the input list: (x, gate, up, down, indices, scores).
  auto unpack = [fused, has_scores, hidden_dims, stream](const std::vector<mx::array>& in) {
    int i = 0;
    mx::array xs = in[i++];
    mx::array gate = in[i];
    mx::array up = in[i];
    if (fused) {
      const auto& gu = in[i++];
      const int E = gu.shape(0), D = gu.shape(2);
      gate = mx::slice(gu, {0, 0, 0}, {E, hidden_dims, D}, stream);
      up = mx::slice(gu, {0, hidden_dims, 0}, {E, 2 * hidden_dims, D}, stream);
    } else {
      gate = in[i++];
      up = in[i++];
    }
    mx::array down = in[i++];
    mx::array ids = in[i++];
    std::optional<mx::array> sc;
    if (has_scores) {
      sc = in[i++];
    }
    return std::make_tuple(xs, gate, up, down, ids, sc);
  };

  if (local && (num_experts == 0 || tokens == 0)) {
    // No local experts (or no tokens): nothing is routed here.
    return finish(mx::zeros(has_scores ? mx::Shape{tokens, model_dims} : mx::Shape{tokens * top_k, model_dims},
                            dtype, stream));
  }
  if (!has_kernels_for(stream) &&
      !metal_switch_glu(stream, tokens, top_k, model_dims, hidden_dims, num_experts, dtype, has_scores)) {
    auto [xs, gate, up, down, ids, sc] = unpack(inputs);
    if (local) {
      // The composition reads expert 0 for other ranks' slots and weights
      // them by zero (a fallback path: correct, not lean).
      ids = mx::where(local->here, ids, mx::array(0u, mx::uint32), stream);
      if (sc) {
        sc = mx::multiply(*sc, mx::astype(local->here, mx::float32, stream), stream);
      }
    }
    auto out = switch_glu_composed(xs, gate, up, down, ids, sc, stream);
    if (local && !sc) {
      out = mx::reshape(
          zero_other_ranks_rows(mx::reshape(out, {tokens * top_k, model_dims}, stream), local->here, stream),
          out.shape(), stream);
    }
    return finish(out);
  }

  // Route once; both fused kernels read the same routing. Each primitive
  // carries its own vjp (primitives.cpp), so the graph also works under
  // mx.compile(shapeless=True).
  auto [xs, gate, up, down, ids, sc] = unpack(inputs);
  auto routed = make_routing(ids, num_experts + (local ? 1 : 0), "switch_glu", stream);
  auto hidden = mx::array(
      {tokens * top_k, hidden_dims},
      dtype,
      std::make_shared<MoeGateUpSwiGLU>(stream, top_k),
      {xs, gate, up, routed[0], routed[1], routed[2]});
  std::vector<mx::array> down_inputs{hidden, down, routed[0], routed[1], routed[2]};
  // Expert parallelism on a GPU: Metal's prompt-size combine sums a scratch
  // row per slot, and another rank's slot has none (the simulator showed
  // NaN), so there the kernels write per-slot rows and MLX's ops combine.
  const bool combine_in_kernel = has_scores && !(local && !has_kernels_for(stream));
  if (combine_in_kernel) {
    down_inputs.push_back(*sc);
  }
  mx::Shape out_shape =
      combine_in_kernel ? mx::Shape{tokens, model_dims} : mx::Shape{tokens * top_k, model_dims};
  auto out = mx::array(
      std::move(out_shape), dtype, std::make_shared<MoeDownCombine>(stream, top_k), std::move(down_inputs));
  if (local) {
    // Every id is in [0, E]: the routing cannot fail.
    if (combine_in_kernel) {
      return finish(out);
    }
    out = zero_other_ranks_rows(out, local->here, stream);
    return finish(has_scores ? weighted_slot_sum(out, *sc, tokens, top_k, stream) : out);
  }
  return finish(poison_on_bad_routing(out, routed[3], stream));
}


mx::array switch_glu_quantized(
    mx::array x,
    const QuantizedWeight& gate,
    const QuantizedWeight& up,
    const QuantizedWeight& down,
    mx::array indices,
    std::optional<mx::array> scores,
    std::optional<int> group_size,
    std::optional<int> bits,
    const std::string& mode,
    std::optional<int> first_expert,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  const QuantizationFormat f = quantization_format(group_size, bits, mode, "switch_glu");
  check_quantized_weight(down.weight, down.scales, down.biases, f, "switch_glu", "down_weight");
  check_quantized_weight(gate.weight, gate.scales, gate.biases, f, "switch_glu", "gate_weight");
  check_quantized_weight(up.weight, up.scales, up.biases, f, "switch_glu", "up_weight");
  require(down.weight.ndim() == 3, [&] {
    return "the quantized down_weight must be [E, D, H * bits / 32] but has shape " +
        shape_text(down.weight.shape()) + ".";
  });
  const int num_experts = down.weight.shape(0);
  const int model_dims = down.weight.shape(1);
  const int hidden_dims = static_cast<int>(int64_t{down.weight.shape(2)} * 32 / f.bits);
  const mx::Shape projection{num_experts, hidden_dims, static_cast<int>(int64_t{model_dims} * f.bits / 32)};
  for (const auto* named : {&gate, &up}) {
    require(named->weight.shape() == projection, [&] {
      return std::string(named == &gate ? "gate_weight" : "up_weight") + " must have shape " +
          shape_text(projection) + " ([E, H, D * bits / 32]) to match down_weight " +
          shape_text(down.weight.shape()) + ", but has shape " + shape_text(named->weight.shape()) + ".";
    });
  }
  require(x.ndim() >= 1 && x.shape(-1) == model_dims, [&] {
    return "x's last dimension must be D = " + std::to_string(model_dims) +
        " (from down_weight " + shape_text(down.weight.shape()) + "), got x with shape " +
        shape_text(x.shape()) + ".";
  });
  require(indices.ndim() == x.ndim(), [&] {
    return "indices must be [..., k] with the leading dimensions of x " + shape_text(x.shape()) +
        ", but has shape " + shape_text(indices.shape()) + ".";
  });
  for (int d = 0; d + 1 < static_cast<int>(x.ndim()); ++d) {
    require(indices.shape(d) == x.shape(d), [&] {
      return "indices " + shape_text(indices.shape()) + " must have the leading dimensions of x " +
          shape_text(x.shape()) + ".";
    });
  }
  const int top_k = indices.shape(-1);
  require(top_k >= 1 && (top_k <= num_experts || first_expert), [&] {
    return "indices must select between 1 and E = " + std::to_string(num_experts) +
        " experts per token, got k = " + std::to_string(top_k) + ".";
  });
  if (scores) {
    require(scores->shape() == indices.shape(), [&] {
      return "scores must have the shape of indices " + shape_text(indices.shape()) +
          " but has shape " + shape_text(scores->shape()) + ".";
    });
    require(mx::issubdtype(scores->dtype(), mx::floating), [] { return std::string("scores must be floating point."); });
  }
  auto dtype = x.dtype();
  if (f.mode == "affine") {
    for (const auto* w : {&gate, &up, &down}) {
      dtype = mx::promote_types(dtype, mx::promote_types(w->scales.dtype(), w->biases->dtype()));
    }
  }
  if (dtype != mx::float32 && dtype != mx::float16 && dtype != mx::bfloat16) {
    std::ostringstream m;
    m << "[switch_glu] Supports float32, float16 and bfloat16 activations but x and the scales promote to "
      << dtype << ".";
    throw std::invalid_argument(m.str());
  }
  const auto out_dtype = scores ? mx::promote_types(dtype, scores->dtype()) : dtype;

  mx::Shape lead(x.shape().begin(), x.shape().end() - 1);
  const int tokens = std::accumulate(lead.begin(), lead.end(), 1, std::multiplies<int>());
  auto x2 = mx::contiguous(mx::reshape(mx::astype(x, dtype, stream), {tokens, model_dims}, stream), false, stream);
  std::optional<LocalSlots> local;
  if (first_expert) {
    local = local_slots(indices, *first_expert, num_experts, tokens, top_k, stream);
  }
  auto idx = mx::contiguous(
      local ? local->ids
            : mx::reshape(
                  checked_uint32_indices(indices, num_experts, "switch_glu", "indices", stream), {tokens, top_k},
                  stream),
      false, stream);
  std::optional<mx::array> scores2;
  if (scores) {
    scores2 = mx::contiguous(
        mx::reshape(mx::astype(*scores, mx::float32, stream), {tokens, top_k}, stream), false, stream);
  }
  // Each weight's inputs: codes, scales (and biases), row contiguous, the
  // scales and biases in the compute dtype (affine).
  auto weight_inputs = [&](const QuantizedWeight& w) {
    return quantized_kernel_inputs(w.weight, w.scales, w.biases, f, dtype, stream);
  };
  auto finish = [&](mx::array out) {
    mx::Shape shape = lead;
    if (!scores) {
      shape.push_back(top_k);
    }
    shape.push_back(model_dims);
    return mx::astype(mx::reshape(out, shape, stream), out_dtype, stream);
  };

  if (local && (num_experts == 0 || tokens == 0)) {
    return finish(mx::zeros(scores ? mx::Shape{tokens, model_dims} : mx::Shape{tokens * top_k, model_dims},
                            dtype, stream));
  }
  if (!has_kernels_for(stream) &&
      !metal_switch_glu_quantized(stream, tokens, top_k, model_dims, hidden_dims, num_experts, f, dtype,
                                  scores.has_value())) {
    if (local) {
      // As the float composition: expert 0 read for other ranks' slots,
      // weighted by zero.
      idx = mx::where(local->here, idx, mx::array(0u, mx::uint32), stream);
      if (scores2) {
        scores2 = mx::multiply(*scores2, mx::astype(local->here, mx::float32, stream), stream);
      }
    }
    // mlx-lm's composition (on our gather_qmm: MLX's gather_qmm except on
    // Metal GPUs, where our kernels run it).
    auto project = [&](const mx::array& a, const QuantizedWeight& w, std::optional<mx::array> lhs) {
      auto in = weight_inputs(w);
      std::optional<mx::array> biases;
      if (in.size() == 3) {
        biases = in[2];
      }
      // Our op: on a Metal GPU our kernels, elsewhere MLX's gather_qmm.
      return gather_qmm(a, in[0], in[1], biases, lhs, idx, true, f.group_size, f.bits, f.mode, false, stream);
    };
    auto rows = mx::expand_dims(x2, 1, stream);
    auto token_of_slot = mx::broadcast_to(
        mx::reshape(mx::arange(tokens, mx::uint32, stream), {tokens, 1}, stream), {tokens, top_k}, stream);
    auto g = project(rows, gate, token_of_slot);
    auto u = project(rows, up, token_of_slot);
    auto h = mx::multiply(mx::multiply(g, mx::sigmoid(g, stream), stream), u, stream);
    auto y = mx::squeeze(project(h, down, std::nullopt), 2, stream);
    if (scores2) {
      y = mx::sum(mx::multiply(y, mx::expand_dims(mx::astype(*scores2, y.dtype(), stream), -1, stream), stream), 1, false, stream);
    } else if (local) {
      y = mx::reshape(
          zero_other_ranks_rows(mx::reshape(y, {tokens * top_k, model_dims}, stream), local->here, stream),
          y.shape(), stream);
    }
    return finish(y);
  }

  const WeightQuantization quantization{f.group_size, f.bits, f.mode, f.mode == "affine"};
  auto routed = make_routing(idx, num_experts + (local ? 1 : 0), "switch_glu", stream);
  const mx::array status = routed.back();
  routed.pop_back();  // the kernels take order, offsets, sorted_experts
  std::vector<mx::array> gate_up_inputs{x2};
  for (const auto* w : {&gate, &up}) {
    auto in = weight_inputs(*w);
    gate_up_inputs.insert(gate_up_inputs.end(), in.begin(), in.end());
  }
  gate_up_inputs.insert(gate_up_inputs.end(), routed.begin(), routed.end());
  auto hidden = mx::array(
      {tokens * top_k, hidden_dims}, dtype,
      std::make_shared<MoeGateUpSwiGLU>(stream, top_k, quantization), std::move(gate_up_inputs));
  std::vector<mx::array> down_inputs{hidden};
  auto down_in = weight_inputs(down);
  down_inputs.insert(down_inputs.end(), down_in.begin(), down_in.end());
  down_inputs.insert(down_inputs.end(), routed.begin(), routed.end());
  // As the float op: on a GPU, expert parallelism combines with MLX's ops.
  const bool combine_in_kernel = scores2.has_value() && !(local && !has_kernels_for(stream));
  if (combine_in_kernel) {
    down_inputs.push_back(*scores2);
  }
  mx::Shape out_shape =
      combine_in_kernel ? mx::Shape{tokens, model_dims} : mx::Shape{tokens * top_k, model_dims};
  auto out = mx::array(
      std::move(out_shape), dtype, std::make_shared<MoeDownCombine>(stream, top_k, quantization),
      std::move(down_inputs));
  if (local) {
    // Every id is in [0, E]: the routing cannot fail.
    if (combine_in_kernel) {
      return finish(out);
    }
    out = zero_other_ranks_rows(out, local->here, stream);
    return finish(scores2 ? weighted_slot_sum(out, *scores2, tokens, top_k, stream) : out);
  }
  return finish(poison_on_bad_routing(out, status, stream));
}

} // namespace mlx_moe
