#include "ops.h"

#include <numeric>
#include <sstream>
#include <stdexcept>

#include "primitives.h"

namespace mlx_moe {

bool has_kernels_for(const mx::Stream& stream) {
  return stream.device == mx::Device::cpu;
}

namespace {

template <typename T>
void check_index_values(const mx::array& indices, int64_t bound, const char* name) {
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
      msg << "[gather_mm] " << name << " holds " << value << ", outside [0, " << bound
          << "): the number of matrices it indexes.";
      throw std::out_of_range(msg.str());
    }
  }
}

// When an index array already holds values (not a lazy graph node), check
// its range on the host now, so the error points at the call. Lazy indices
// are checked by the kernel when it runs.
void check_evaluated_indices(const mx::array& indices, int64_t bound, const char* name) {
  if (indices.size() == 0 || !indices.is_available()) {
    return;
  }
  switch (indices.dtype()) {
    case mx::uint8: return check_index_values<uint8_t>(indices, bound, name);
    case mx::uint16: return check_index_values<uint16_t>(indices, bound, name);
    case mx::uint32: return check_index_values<uint32_t>(indices, bound, name);
    case mx::uint64: return check_index_values<uint64_t>(indices, bound, name);
    case mx::int8: return check_index_values<int8_t>(indices, bound, name);
    case mx::int16: return check_index_values<int16_t>(indices, bound, name);
    case mx::int32: return check_index_values<int32_t>(indices, bound, name);
    case mx::int64: return check_index_values<int64_t>(indices, bound, name);
    default: return;
  }
}

// Indices as the primitive takes them: uint32, or the default arange over
// the batch when not given (as mx.gather_mm does).
mx::array indices_or_default(
    const std::optional<mx::array>& indices,
    const mx::array& x,
    const char* name,
    const mx::Stream& s) {
  if (x.ndim() < 2) {
    std::ostringstream msg;
    msg << "[gather_mm] Input must have at least two dimensions but got input with shape "
        << x.shape() << ".";
    throw std::invalid_argument(msg.str());
  }
  int64_t batch = std::accumulate(
      x.shape().begin(), x.shape().end() - 2, int64_t{1}, std::multiplies<int64_t>());
  if (indices.has_value()) {
    if (!mx::issubdtype(indices->dtype(), mx::integer)) {
      std::ostringstream msg;
      msg << "[gather_mm] Got " << name << " with invalid dtype " << indices->dtype()
          << ". Indices must be integral.";
      throw std::invalid_argument(msg.str());
    }
    check_evaluated_indices(*indices, batch, name);
    mx::array values = *indices;
    if (values.dtype().size() == 8) {
      // 64-bit values would wrap into range when narrowed to uint32: map
      // every out-of-range value to 0xFFFFFFFF, which the kernel rejects.
      auto outside = mx::logical_or(
          mx::less(values, mx::array(0, values.dtype()), s),
          mx::greater_equal(values, mx::array(batch, values.dtype()), s),
          s);
      values = mx::where(outside, mx::array(0xFFFFFFFFu, mx::uint32), mx::astype(values, mx::uint32, s), s);
    }
    return mx::astype(values, mx::uint32, s);
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
  if (!has_kernels_for(stream)) {
    return mx::gather_mm(a, b, lhs_indices_in, rhs_indices_in, sorted_indices, stream);
  }

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
