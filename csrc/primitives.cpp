#include "primitives.h"

#include <functional>
#include <stdexcept>
#include <string>

#include "mlx/transforms.h"
#include "ops.h"

namespace mlx_moe {

namespace {

// The gradients (for `argnums`) of a plain-MLX composition computing the
// same output as a primitive: the vjp of primitives whose backward pass is
// rare on the CPU (attention, normalisation), exact by construction.
std::vector<mx::array> composition_vjp(
    const std::function<mx::array(const std::vector<mx::array>&)>& composition,
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums) {
  auto as_outputs = [&](const std::vector<mx::array>& in) { return std::vector<mx::array>{composition(in)}; };
  auto grads = mx::vjp(as_outputs, primals, cotangents).second;
  std::vector<mx::array> out;
  for (int arg : argnums) {
    out.push_back(grads[arg]);
  }
  return out;
}

} // namespace

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
        for (int d = 0; d < static_cast<int>(a.ndim()) - 2; ++d) {
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
  const int slots = static_cast<int>(inputs[0].size());
  return {{slots}, {num_experts_ + 1}, {slots}, {1}};
}

bool MoeRoute::is_equivalent(const mx::Primitive& other) const {
  return num_experts_ == static_cast<const MoeRoute&>(other).num_experts_;
}

std::vector<mx::Shape> MoeGateUpSwiGLU::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0) * top_k_, inputs[1].shape(1)}};
}

bool MoeGateUpSwiGLU::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const MoeGateUpSwiGLU&>(other);
  return top_k_ == o.top_k_ && quantization_ == o.quantization_;
}

std::vector<mx::Shape> MoeDownCombine::output_shapes(const std::vector<mx::array>& inputs) {
  const int slots = inputs[0].shape(0);
  const int model_dims = inputs[1].shape(1);
  const size_t weight_inputs = quantization_ ? quantization_->inputs_per_weight() : 1;
  if (inputs.size() > 4 + weight_inputs) {
    return {{slots / top_k_, model_dims}};
  }
  return {{slots, model_dims}};
}

bool MoeDownCombine::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const MoeDownCombine&>(other);
  return top_k_ == o.top_k_ && quantization_ == o.quantization_;
}

namespace {

// Segment e of the expert-sorted rows: [offsets[e], offsets[e + 1]).
mx::array expert_segments(const mx::array& offsets, const mx::Stream& s) {
  const int num_experts = offsets.shape(0) - 1;
  return mx::stack(
      {mx::slice(offsets, {0}, {num_experts}, s), mx::slice(offsets, {1}, {num_experts + 1}, s)},
      -1,
      s);
}

// sum over the rows r of each expert e of left[r]^T right[r]: [E, N, M] for
// left [S, N] and right [S, M] in expert-sorted order.
mx::array per_expert_outer_sum(
    const mx::array& left,
    const mx::array& right,
    const mx::array& offsets,
    const mx::Stream& s) {
  return mx::segmented_mm(
      mx::transpose(left, {1, 0}, s), right, expert_segments(offsets, s), s);
}

// One expert projection of the fused primitives, float or quantized: the
// weight's inputs start at primals[first] (1 array, or codes, scales and
// optional biases). apply(rows [S, 1, in], experts, transpose) is
// rows @ W[e]^T (transpose, W [E, out, in]) or rows @ W[e].
struct Projection {
  const std::vector<mx::array>& primals;
  int first;
  const std::optional<WeightQuantization>& quantization;

  int inputs() const {
    return quantization ? quantization->inputs_per_weight() : 1;
  }
  const mx::array& weight() const {
    return primals[first];
  }
  mx::array apply(const mx::array& rows, const mx::array& experts, bool transpose, const mx::Stream& s) const {
    if (!quantization) {
      const auto& w = primals[first];
      return mlx_moe::gather_mm(
          rows, transpose ? mx::swapaxes(w, -1, -2, s) : w, std::nullopt, experts, true, s);
    }
    std::optional<mx::array> biases;
    if (quantization->has_biases) {
      biases = primals[first + 2];
    }
    return mlx_moe::gather_qmm(
        rows, primals[first], primals[first + 1], biases, std::nullopt, experts, transpose,
        quantization->group_size, quantization->bits, quantization->mode, true, s);
  }
};

[[noreturn]] void no_quantized_weight_gradient() {
  throw std::invalid_argument(
      "[switch_glu] Gradients with quantized experts are defined with respect to x and scores "
      "only, not the quantized weights, scales or biases.");
}

void no_index_gradient(int arg, int first_index_input, const char* op) {
  if (arg >= first_index_input) {
    throw std::invalid_argument(
        std::string("[") + op + "] Cannot calculate VJP with respect to the routing indices.");
  }
}

} // namespace

// Gradients of hidden[i] = silu(g_i) * u_i, g_i = x[t_i] @ gate[e_i]^T,
// u_i = x[t_i] @ up[e_i]^T (i in expert-sorted order), with dh = d hidden:
//   dg = dh * u * silu'(g),  du = dh * silu(g);
//   d x[t]     += dg_i @ gate[e_i] + du_i @ up[e_i]   (scatter-add over t);
//   d gate[e]   = sum_{i in e} dg_i^T x[t_i]          (one segmented matmul);
//   d up[e]     = sum_{i in e} du_i^T x[t_i].
// g and u are recomputed with our gather_mm.
std::vector<mx::array> MoeGateUpSwiGLU::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  const auto s = stream();
  const auto& x = primals[0];
  const Projection gate{primals, 1, quantization_};
  const Projection up{primals, 1 + gate.inputs(), quantization_};
  const int first_index = 1 + 2 * gate.inputs();
  const auto& order = primals[first_index];
  const auto& offsets = primals[first_index + 1];
  const auto& sorted_experts = primals[first_index + 2];
  const int slots = order.shape(0);
  const int hidden_dims = gate.weight().shape(1);
  auto tokens_of = mx::floor_divide(order, mx::array(static_cast<uint32_t>(top_k_)), s);
  auto rows = mx::take(x, tokens_of, 0, s); // [S, D]
  auto rows3 = mx::expand_dims(rows, 1, s);
  auto g = mx::reshape(gate.apply(rows3, sorted_experts, true, s), {slots, hidden_dims}, s);
  auto u = mx::reshape(up.apply(rows3, sorted_experts, true, s), {slots, hidden_dims}, s);
  auto sig = mx::sigmoid(g, s);
  auto silu_g = mx::multiply(g, sig, s);
  // silu'(g) = sig * (1 + g * (1 - sig))
  auto dsilu = mx::multiply(
      sig, mx::add(mx::array(1.0f, g.dtype()), mx::multiply(g, mx::subtract(mx::array(1.0f, g.dtype()), sig, s), s), s), s);
  const auto& dh = cotangents[0];
  auto dg = mx::multiply(mx::multiply(dh, u, s), dsilu, s);
  auto du = mx::multiply(dh, silu_g, s);
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    no_index_gradient(arg, first_index, "switch_glu");
    if (arg == 0) {
      auto back = [&](const mx::array& d, const Projection& w) {
        return w.apply(mx::expand_dims(d, 1, s), sorted_experts, false, s);
      };
      auto dx_rows = mx::add(back(dg, gate), back(du, up), s); // [S, 1, D]
      grads.push_back(mx::scatter_add(mx::zeros_like(x, s), tokens_of, dx_rows, 0, s));
    } else if (quantization_) {
      no_quantized_weight_gradient();
    } else {
      const auto& d = arg == 1 ? dg : du;
      grads.push_back(mx::astype(per_expert_outer_sum(d, rows, offsets, s), primals[arg].dtype(), s));
    }
  }
  return grads;
}

// Gradients of y_i = hidden_i @ down[e_i]^T (i in expert-sorted order) and of
// out[t] = sum_{i of t} score_i * y_i (or out[slot_i] = y_i without scores):
//   dy_i        = score_i * d out[t_i]  (or d out[slot_i]);
//   d hidden_i  = dy_i @ down[e_i];
//   d down[e]   = sum_{i in e} dy_i^T hidden_i;
//   d score_i   = y_i . d out[t_i]  (y recomputed with our gather_mm).
std::vector<mx::array> MoeDownCombine::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  const auto s = stream();
  const auto& hidden = primals[0];
  const Projection down{primals, 1, quantization_};
  const int first_index = 1 + down.inputs();
  const auto& order = primals[first_index];
  const auto& offsets = primals[first_index + 1];
  const auto& sorted_experts = primals[first_index + 2];
  const int scores_input = first_index + 3;
  const bool combine = static_cast<int>(primals.size()) > scores_input;
  const auto& d_out = cotangents[0];
  const int slots = order.shape(0);
  const int model_dims = down.weight().shape(1);
  std::optional<mx::array> d_out_rows; // d out at each sorted position's row
  std::optional<mx::array> scores_sorted;
  mx::array dy = mx::array(0.0f);
  if (combine) {
    auto tokens_of = mx::floor_divide(order, mx::array(static_cast<uint32_t>(top_k_)), s);
    d_out_rows = mx::take(d_out, tokens_of, 0, s); // [S, D]
    scores_sorted = mx::take(mx::flatten(primals[scores_input], s), order, 0, s); // [S]
    dy = mx::astype(
        mx::multiply(*d_out_rows, mx::expand_dims(*scores_sorted, 1, s), s), hidden.dtype(), s);
  } else {
    dy = mx::take(d_out, order, 0, s);
  }
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == scores_input && combine) {
      auto y = mx::reshape(
          down.apply(mx::expand_dims(hidden, 1, s), sorted_experts, true, s), {slots, model_dims}, s);
      auto d_score_sorted = mx::sum(
          mx::multiply(mx::astype(y, mx::float32, s), mx::astype(*d_out_rows, mx::float32, s), s),
          -1, false, s);
      // Back from sorted positions to slots: order is a permutation.
      auto d_scores = mx::scatter(
          mx::zeros({slots}, mx::float32, s), order, mx::expand_dims(d_score_sorted, 1, s), 0, s);
      grads.push_back(mx::reshape(d_scores, primals[scores_input].shape(), s));
      continue;
    }
    no_index_gradient(arg, first_index, "switch_glu");
    if (arg == 0) {
      grads.push_back(mx::reshape(
          down.apply(mx::expand_dims(dy, 1, s), sorted_experts, false, s), hidden.shape(), s));
    } else if (quantization_) {
      no_quantized_weight_gradient();
    } else {
      grads.push_back(mx::astype(per_expert_outer_sum(dy, hidden, offsets, s), down.weight().dtype(), s));
    }
  }
  return grads;
}

std::vector<mx::Shape> GatherQMM::output_shapes(const std::vector<mx::array>& inputs) {
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  auto shape = inputs[inputs.size() - 2].shape();
  shape.push_back(x.shape(-2));
  shape.push_back(transpose_ ? w.shape(-2) : static_cast<int>(int64_t{w.shape(-1)} * 32 / bits_));
  return {shape};
}

bool GatherQMM::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const GatherQMM&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_ && mode_ == o.mode_ &&
      transpose_ == o.transpose_ && sorted_indices_ == o.sorted_indices_ &&
      lhs_is_identity_ == o.lhs_is_identity_;
}

// d x[lhs[i]] += d out[i] @ W[rhs[i]] (transpose) or @ W[rhs[i]]^T: the same
// quantized gather matmul with `transpose` flipped, then a scatter-add over
// lhs unless lhs is the identity. The packed weights, scales and biases get
// no gradient (as MLX's quantized layers, they are frozen).
std::vector<mx::array> GatherQMM::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  const auto s = stream();
  const bool has_biases = primals.size() == 6;
  const auto& x = primals[0];
  const auto& w = primals[1];
  const auto& scales = primals[2];
  std::optional<mx::array> biases;
  if (has_biases) {
    biases = primals[3];
  }
  const auto& lhs = primals[primals.size() - 2];
  const auto& rhs = primals[primals.size() - 1];
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg != 0) {
      throw std::invalid_argument(
          "[gather_qmm] Gradients are defined with respect to x only, not the quantized "
          "weights, scales, biases or indices.");
    }
    auto g = mlx_moe::gather_qmm(
        cotangents[0], w, scales, biases, std::nullopt, rhs, !transpose_, group_size_, bits_,
        mode_, sorted_indices_, s);
    const int M = x.shape(-2);
    const int K = x.shape(-1);
    if (lhs_is_identity_) {
      grads.push_back(mx::reshape(g, x.shape(), s));
    } else {
      int num_x_matrices = 1;
      for (int d = 0; d < static_cast<int>(x.ndim()) - 2; ++d) {
        num_x_matrices *= x.shape(d);
      }
      auto flat = mx::zeros({num_x_matrices, M, K}, x.dtype(), s);
      grads.push_back(mx::reshape(
          mx::scatter_add(flat, lhs, mx::expand_dims(g, -3, s), 0, s), x.shape(), s));
    }
  }
  return grads;
}


} // namespace mlx_moe

// ------------------------------------------------------------ SoftmaxTopK
namespace mlx_moe {

std::vector<mx::Shape> SoftmaxTopK::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = k_;
  return {shape, shape};
}

bool SoftmaxTopK::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const SoftmaxTopK&>(other);
  return k_ == o.k_ && normalize_ == o.normalize_;
}

// The scores' gradient is that of the composition at the chosen experts
// (the indices, outputs[0], are constants); the indices have none.
std::vector<mx::array> SoftmaxTopK::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  const auto s = stream();
  const mx::array indices = mx::stop_gradient(outputs[0], s);
  const bool normalize = normalize_;
  auto composition = [&](const std::vector<mx::array>& in) {
    auto scores = mx::take_along_axis(mx::softmax(in[0], std::vector<int>{-1}, true, s), indices, -1, s);
    return normalize ? mx::divide(scores, mx::sum(scores, -1, true, s), s) : scores;
  };
  // One cotangent per output; the indices' carries nothing.
  return composition_vjp(composition, primals, {cotangents.back()}, argnums);
}

} // namespace mlx_moe

// ------------------------------------------------------------ Linear, QuantizedLinear
namespace mlx_moe {

namespace {

// x's shape with its last axis replaced by N.
mx::Shape projected_shape(const mx::array& x, int N) {
  auto shape = x.shape();
  shape.back() = N;
  return shape;
}

} // namespace

std::vector<mx::Shape> Linear::output_shapes(const std::vector<mx::array>& inputs) {
  return {projected_shape(inputs[0], inputs[1].shape(0))};
}

// out = x @ W^T:  d x = d out @ W;  d W = (d out)^T @ x over all rows.
std::vector<mx::array> Linear::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  const auto s = stream();
  const auto& x = primals[0];
  const auto& weight = primals[1];
  const auto& d_out = cotangents[0];
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      grads.push_back(mx::astype(mx::matmul(d_out, weight, s), x.dtype(), s));
    } else {
      const int N = weight.shape(0);
      const int K = weight.shape(1);
      auto rows_out = mx::reshape(d_out, {-1, N}, s);
      auto rows_x = mx::reshape(x, {-1, K}, s);
      grads.push_back(mx::astype(mx::matmul(mx::transpose(rows_out, s), rows_x, s), weight.dtype(), s));
    }
  }
  return grads;
}

std::vector<mx::Shape> QuantizedLinear::output_shapes(const std::vector<mx::array>& inputs) {
  return {projected_shape(inputs[0], inputs[1].shape(0))};
}

bool QuantizedLinear::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantizedLinear&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_ && mode_ == o.mode_;
}

// d x = d out @ W (MLX's quantized_matmul, transpose=false). The packed
// weight, scales and biases get no gradient (frozen, as MLX's layers).
std::vector<mx::array> QuantizedLinear::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  std::optional<mx::array> biases;
  if (primals.size() == 4) {
    biases = primals[3];
  }
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg != 0) {
      throw std::invalid_argument(
          "[quantized_linear] Gradients are defined with respect to x only, not the quantized "
          "weight, scales or biases.");
    }
    grads.push_back(mx::astype(
        mx::quantized_matmul(
            cotangents[0], primals[1], primals[2], biases, false, group_size_, bits_, mode_, stream()),
        primals[0].dtype(), stream()));
  }
  return grads;
}

} // namespace mlx_moe

// ------------------------------------------------------------ Attention
namespace mlx_moe {

std::vector<mx::Shape> Attention::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = inputs[2].shape(-1);
  return {shape};
}

bool Attention::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Attention&>(other);
  return scale_ == o.scale_ && causal_ == o.causal_;
}

// Gradients of the plain-MLX composition (attention_reference): training
// through attention is rare on the CPU, and the composition's vjp is exact.
std::vector<mx::array> Attention::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  const auto s = stream();
  const float scale = scale_;
  const bool causal = causal_;
  return composition_vjp(
      [=](const std::vector<mx::array>& in) { return attention_reference(in[0], in[1], in[2], scale, causal, s); },
      primals, cotangents, argnums);
}

} // namespace mlx_moe

// ----------------------------------------------------------------- Rope
namespace mlx_moe {

bool Rope::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Rope&>(other);
  return dims_ == o.dims_ && traditional_ == o.traditional_ && base_ == o.base_ && scale_ == o.scale_ &&
      offset_ == o.offset_ && inverse_ == o.inverse_;
}

// A rotation's transpose is the rotation by the opposite angle.
std::vector<mx::array> Rope::vjp(
    const std::vector<mx::array>&,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>&,
    const std::vector<mx::array>&) {
  const auto& cotangent = cotangents[0];
  return {mx::array(
      cotangent.shape(), cotangent.dtype(),
      std::make_shared<Rope>(stream(), dims_, traditional_, base_, scale_, offset_, !inverse_), {cotangent})};
}

} // namespace mlx_moe

// -------------------------------------------------------------- RmsNorm
namespace mlx_moe {

std::vector<mx::array> RmsNorm::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  const auto s = stream();
  const float eps = eps_;
  auto composition = [=](const std::vector<mx::array>& in) {
    auto x = mx::astype(in[0], mx::float32, s);
    auto mean_square = mx::mean(mx::square(x, s), std::vector<int>{-1}, true, s);
    auto y = mx::multiply(x, mx::rsqrt(mx::add(mean_square, mx::array(eps), s), s), s);
    if (in.size() == 2) {
      y = mx::multiply(y, mx::astype(in[1], mx::float32, s), s);
    }
    return mx::astype(y, in[0].dtype(), s);
  };
  return composition_vjp(composition, primals, cotangents, argnums);
}

} // namespace mlx_moe
