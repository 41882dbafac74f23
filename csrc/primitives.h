// The Primitive classes: shapes, equivalence and gradients, independent of
// any backend. eval_cpu lives in cpu/, eval_gpu in metal/ or cuda/ (one file
// per primitive family, same names across backends).
#pragma once

#include <optional>
#include <string>

#include "mlx/primitives.h"

namespace mlx_moe {

namespace mx = mlx::core;

// How the fused SwitchGLU primitives' weights are quantized (absent: float
// weights). Each quantized weight is 2 inputs (packed codes, scales) or 3
// (with biases, affine mode) in place of one.
struct WeightQuantization {
  int group_size;
  int bits;
  std::string mode;
  bool has_biases;
  int inputs_per_weight() const {
    return has_biases ? 3 : 2;
  }
  bool operator==(const WeightQuantization& o) const {
    return group_size == o.group_size && bits == o.bits && mode == o.mode && has_biases == o.has_biases;
  }
};

// out[i] = a[lhs_indices[i]] @ b[rhs_indices[i]] for every position i of the
// (broadcast) index arrays. Inputs: a [..., M, K], b [..., K, N],
// lhs_indices and rhs_indices uint32 of one shape I (indices into a's and
// b's flattened batch dimensions). Output: [*I, M, N] in a's dtype.
class GatherMM : public mx::UnaryPrimitive {
 public:
  // sorted_indices: the caller promises the matrix indices are grouped
  // (as mx.gather_mm's flag); lhs_is_identity: lhs_indices is the default
  // arange over a's batch, with no broadcasting (gradient shortcut).
  GatherMM(mx::Stream stream, bool sorted_indices, bool lhs_is_identity)
      : mx::UnaryPrimitive(stream),
        sorted_indices_(sorted_indices),
        lhs_is_identity_(lhs_is_identity) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "MoeGatherMM";
  }

 private:
  bool sorted_indices_;
  bool lhs_is_identity_;
};

// Routing of a MoE layer: groups the (token, slot) pairs by expert with a
// counting sort. Input: indices [T, k] uint32. Outputs, all uint32: order
// [T * k], the slots s = t * k + j sorted by expert (stable); offsets
// [E + 1], expert e's slots being order[offsets[e] .. offsets[e + 1]); and
// sorted_experts [T * k], the expert of each sorted position (what the
// gradients need); status [1], 1 if some id is >= E (then every offset is 0,
// an empty routing), else 0. The CPU raises for a bad id; a GPU cannot raise
// during its asynchronous evaluation, so ops.cpp turns a nonzero status into
// NaN outputs there. Not differentiable (indices are discrete). `op` names
// the calling op in error messages.
class MoeRoute : public mx::Primitive {
 public:
  MoeRoute(mx::Stream stream, int num_experts, std::string op)
      : mx::Primitive(stream), num_experts_(num_experts), op_(std::move(op)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "MoeRoute";
  }

 private:
  int num_experts_;
  std::string op_;
};

// A softmax router's choice: for every row of logits [..., E], the k
// experts of highest probability softmax(logits) (computed in float32) and
// their probabilities, rounded to the logits' dtype, renormalized to sum to
// one when `normalize` (sum and quotient rounded as MLX's ops round them).
// Outputs: indices [..., k] uint32 (most probable first; ties to the lower
// expert) and scores [..., k] in the logits' dtype. One node in place of
// softmax, argpartition, slice, take_along_axis, sum and divide.
// Differentiable in the logits (through the scores).
class SoftmaxTopK : public mx::Primitive {
 public:
  SoftmaxTopK(mx::Stream stream, int k, bool normalize)
      : mx::Primitive(stream), k_(k), normalize_(normalize) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "MoeSoftmaxTopK";
  }

 private:
  int k_;
  bool normalize_;
};

// Gate and up projections with SwiGLU, fused: for every routed slot, in
// expert-sorted order i, hidden[i] = silu(x[t] @ gate[e]^T) * (x[t] @
// up[e]^T). Inputs: x [T, D], gate [E, H, D], up [E, H, D] (last axis
// contiguous; gate and up may be two views of one fused [E, 2H, D] weight),
// order, offsets, sorted_experts (MoeRoute). Output: hidden [T * k, H].
// Quantized (`quantization` set): gate and up are each (codes [E, H, D *
// bits / 32], scales, [biases]) as mx.quantize packs them; gradients then
// flow to x only.
class MoeGateUpSwiGLU : public mx::UnaryPrimitive {
 public:
  MoeGateUpSwiGLU(mx::Stream stream, int top_k, std::optional<WeightQuantization> quantization = std::nullopt)
      : mx::UnaryPrimitive(stream), top_k_(top_k), quantization_(std::move(quantization)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "MoeGateUpSwiGLU";
  }

 private:
  int top_k_;
  std::optional<WeightQuantization> quantization_;
};

// Down projection with the routing-score combine, fused: out[t] = sum_j
// scores[t, j] * (hidden[i(t, j)] @ down[e(t, j)]^T). Inputs: hidden
// [T * k, H] in sorted order, down [E, D, H], order, offsets,
// sorted_experts, and optionally scores [T, k] float32. Output: [T, D] with
// scores; without, every slot's own row, [T * k, D] in slot order.
// Quantized (`quantization` set): down is (codes [E, D, H * bits / 32],
// scales, [biases]); gradients then flow to hidden and scores only.
class MoeDownCombine : public mx::UnaryPrimitive {
 public:
  MoeDownCombine(mx::Stream stream, int top_k, std::optional<WeightQuantization> quantization = std::nullopt)
      : mx::UnaryPrimitive(stream), top_k_(top_k), quantization_(std::move(quantization)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "MoeDownCombine";
  }

 private:
  int top_k_;
  std::optional<WeightQuantization> quantization_;
};

// out[i] = x[lhs_indices[i]] @ W[rhs_indices[i]]^T (transpose) or
// x[lhs_indices[i]] @ W[rhs_indices[i]], W[j] the dequantized matrix j of
// an mx.quantize-packed weight (cpu/quantized.h). Inputs: x [..., M, K] in
// the compute dtype, w uint32 [..., N, K * bits / 32] (transpose) or
// [..., K, N * bits / 32], scales (and, affine mode, biases) [..., rows,
// groups], lhs_indices and rhs_indices uint32 of one shape I. Output:
// [*I, M, N] in x's dtype. Differentiable in x only.
class GatherQMM : public mx::UnaryPrimitive {
 public:
  GatherQMM(
      mx::Stream stream,
      int group_size,
      int bits,
      std::string mode,
      bool transpose,
      bool sorted_indices,
      bool lhs_is_identity)
      : mx::UnaryPrimitive(stream),
        group_size_(group_size),
        bits_(bits),
        mode_(std::move(mode)),
        transpose_(transpose),
        sorted_indices_(sorted_indices),
        lhs_is_identity_(lhs_is_identity) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "MoeGatherQMM";
  }

 private:
  int group_size_;
  int bits_;
  std::string mode_;
  bool transpose_;
  bool sorted_indices_;
  bool lhs_is_identity_;
};

// A dense projection, x @ weight^T, as nn.Linear computes it. Inputs: x
// [..., K] (any strides), weight [N, K] (any strides), one float dtype.
// Output: [..., N], row contiguous. One graph node in place of the
// gather_mm composition (index arrays, reshapes): a decode step has
// hundreds of these, and each node costs microseconds to build and run.
class Linear : public mx::UnaryPrimitive {
 public:
  explicit Linear(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
  const char* name() const override {
    return "MoeLinear";
  }
};

// x @ W^T for an mx.quantize-packed W, as nn.QuantizedLinear computes it.
// Inputs: x [..., K] (any strides) in the compute dtype, w uint32 [N, K *
// bits / 32], scales (and, affine mode, biases) [N, K / group_size], all
// row contiguous. Output: [..., N] in x's dtype. Differentiable in x only.
class QuantizedLinear : public mx::UnaryPrimitive {
 public:
  QuantizedLinear(mx::Stream stream, int group_size, int bits, std::string mode)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits), mode_(std::move(mode)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "MoeQuantizedLinear";
  }

 private:
  int group_size_;
  int bits_;
  std::string mode_;
};

// Scaled dot-product attention (mx.fast.scaled_dot_product_attention's
// product for no mask or the "causal" one): inputs q [B, Hq, L, d], k [B,
// Hkv, S, d], v [B, Hkv, S, dv] of one float dtype, Hq a multiple of Hkv;
// output [B, Hq, L, dv]. The gradient is that of the plain-MLX composition.
class Attention : public mx::UnaryPrimitive {
 public:
  Attention(mx::Stream stream, float scale, bool causal)
      : mx::UnaryPrimitive(stream), scale_(scale), causal_(causal) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "MoeAttention";
  }

 private:
  float scale_;
  bool causal_;
};

// Rotary position embedding (mx.fast.rope's semantics for an integer
// offset and no custom frequencies): the first `dims` features of x's last
// axis are rotated in pairs (i, i + dims/2), or (2i, 2i + 1) when
// `traditional`, by (offset + position) * scale * base^(-2i/dims), the
// position being the index along the second-to-last axis; `inverse`
// rotates by the opposite angle (the gradient). Output: x's shape and
// dtype, contiguous.
class Rope : public mx::UnaryPrimitive {
 public:
  Rope(mx::Stream stream, int dims, bool traditional, float base, float scale, int offset, bool inverse)
      : mx::UnaryPrimitive(stream),
        dims_(dims),
        traditional_(traditional),
        base_(base),
        scale_(scale),
        offset_(offset),
        inverse_(inverse) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "MoeRope";
  }

 private:
  int dims_;
  bool traditional_;
  float base_;
  float scale_;
  int offset_;
  bool inverse_;
};

// RMS normalisation over the last axis, mx.fast.rms_norm's semantics:
// x / sqrt(mean(x^2) + eps) (* weight [D]), in float32, in x's dtype. Inputs:
// x, and the weight when there is one. The gradient is the composition's.
class RmsNorm : public mx::UnaryPrimitive {
 public:
  RmsNorm(mx::Stream stream, float eps) : mx::UnaryPrimitive(stream), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }
  const char* name() const override {
    return "MoeRmsNorm";
  }

 private:
  float eps_;
};

} // namespace mlx_moe
