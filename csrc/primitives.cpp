#include "primitives.h"

#include <stdexcept>
#include <string>

#include "ops.h"

namespace mlx_moe {

std::vector<mx::Shape> GatherMM::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[2].shape();
  shape.push_back(inputs[0].shape(-2));
  shape.push_back(inputs[1].shape(-1));
  return {shape};
}

bool GatherMM::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const GatherMM&>(other);
  return sorted_indices_ == o.sorted_indices_ && lhs_is_identity_ == o.lhs_is_identity_;
}

// Gradients, in MLX ops (and our gather_mm for the big product):
//   d a[lhs[i]] += d out[i] @ b[rhs[i]]^T  (a gather matmul, then a
//                   scatter-add over lhs unless lhs is the identity);
//   d b[j]      = sum over i with rhs[i] = j of a[lhs[i]]^T @ d out[i]
//                 (the rows sorted by j, then one segmented matmul, so no
//                 [pairs, K, N] intermediate is ever built).
std::vector<mx::array> GatherMM::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  const auto s = stream();
  const auto& a = primals[0];
  const auto& b = primals[1];
  const auto& lhs = primals[2];
  const auto& rhs = primals[3];
  const auto& cotangent = cotangents[0];
  const int M = a.shape(-2);
  const int K = a.shape(-1);
  const int N = b.shape(-1);
  const int num_pairs = static_cast<int>(lhs.size());

  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      auto g = mlx_moe::gather_mm(cotangent, mx::swapaxes(b, -1, -2, s), std::nullopt, rhs, sorted_indices_, s);
      if (lhs_is_identity_) {
        grads.push_back(mx::reshape(g, a.shape(), s));
      } else {
        int num_a_matrices = 1;
        for (int d = 0; d < a.ndim() - 2; ++d) {
          num_a_matrices *= a.shape(d);
        }
        auto flat = mx::zeros({num_a_matrices, M, K}, a.dtype(), s);
        grads.push_back(mx::reshape(
            mx::scatter_add(flat, lhs, mx::expand_dims(g, -3, s), 0, s), a.shape(), s));
      }
    } else if (arg == 1) {
      mx::Shape batch_shape(b.shape().begin(), b.shape().end() - 2);
      int num_matrices = 1;
      for (int d : batch_shape) {
        num_matrices *= d;
      }
      auto flat_lhs = mx::flatten(lhs, s);
      auto flat_rhs = mx::flatten(rhs, s);
      auto rows = lhs_is_identity_
          ? mx::reshape(a, {num_pairs, M, K}, s)
          : mx::take(mx::reshape(a, {-1, M, K}, s), flat_lhs, 0, s);
      auto dy = mx::reshape(cotangent, {num_pairs, M, N}, s);
      // Always sort (a small index array): trusting sorted_indices here
      // would turn a wrong promise into silently wrong gradients.
      auto order = mx::argsort(flat_rhs, 0, s);
      rows = mx::take(rows, order, 0, s);
      dy = mx::take(dy, order, 0, s);
      flat_rhs = mx::take(flat_rhs, order, 0, s);
      // Segment j: the sorted rows [start_j, end_j) that used matrix j.
      auto counts = mx::scatter_add_axis(
          mx::zeros({num_matrices}, mx::uint32, s),
          flat_rhs,
          mx::full({num_pairs}, M, mx::uint32, s),
          0,
          s);
      auto ends = mx::cumsum(counts, 0, false, true, s);
      auto segments = mx::stack({mx::subtract(ends, counts, s), ends}, -1, s);
      auto dw = mx::segmented_mm(
          mx::transpose(mx::reshape(dy, {num_pairs * M, N}, s), {1, 0}, s),
          mx::reshape(rows, {num_pairs * M, K}, s),
          segments,
          s); // [matrices, N, K]
      auto shape = batch_shape;
      shape.push_back(K);
      shape.push_back(N);
      grads.push_back(mx::reshape(mx::swapaxes(dw, -1, -2, s), shape, s));
    } else {
      throw std::invalid_argument(
          "[gather_mm] Cannot calculate VJP with respect to indices. Use "
          "stop_gradient on indices to stop gradients from being computed.");
    }
  }
  return grads;
}

std::vector<mx::Shape> MoeRoute::output_shapes(const std::vector<mx::array>& inputs) {
  return {{static_cast<int>(inputs[0].size())}, {num_experts_ + 1}};
}

bool MoeRoute::is_equivalent(const mx::Primitive& other) const {
  return num_experts_ == static_cast<const MoeRoute&>(other).num_experts_;
}

std::vector<mx::Shape> MoeGateUpSwiGLU::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0) * top_k_, inputs[1].shape(1)}};
}

bool MoeGateUpSwiGLU::is_equivalent(const mx::Primitive& other) const {
  return top_k_ == static_cast<const MoeGateUpSwiGLU&>(other).top_k_;
}

std::vector<mx::Shape> MoeDownCombine::output_shapes(const std::vector<mx::array>& inputs) {
  const int slots = inputs[0].shape(0);
  const int model_dims = inputs[1].shape(1);
  if (inputs.size() > 4) {
    return {{slots / top_k_, model_dims}};
  }
  return {{slots, model_dims}};
}

bool MoeDownCombine::is_equivalent(const mx::Primitive& other) const {
  return top_k_ == static_cast<const MoeDownCombine&>(other).top_k_;
}

// No GPU kernels in this build yet: the ops fall back to MLX's own
// operations on GPU streams (ops.cpp, has_kernels_for), so these primitives
// never run there.
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

} // namespace mlx_moe
