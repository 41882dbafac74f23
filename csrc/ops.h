// The C++ op functions: argument checks, dtype and shape rules, and the
// primitive graph. Every message names the op, like MLX's own.
#pragma once

#include <optional>
#include <string>
#include <utility>

#include "mlx/ops.h"

namespace mlx_moe {

namespace mx = mlx::core;

// Same semantics as mx::gather_mm: out[i] = a[lhs_indices[i]] @
// b[rhs_indices[i]] over the broadcast index arrays, indices into the
// flattened batch dimensions of a [..., M, K] and b [..., K, N]; without
// indices it is a plain (broadcasting) matmul. float32, float16 and
// bfloat16, accumulated in float32.
mx::array gather_mm(
    mx::array a,
    mx::array b,
    std::optional<mx::array> lhs_indices = std::nullopt,
    std::optional<mx::array> rhs_indices = std::nullopt,
    bool sorted_indices = false,
    mx::StreamOrDevice s = {});

// Gather matmul on quantized matrices, mx.gather_qmm's semantics: out[i] =
// x[lhs_indices[i]] @ W[rhs_indices[i]]^T (transpose, W [..., N, K]) or
// @ W[rhs_indices[i]] (W [..., K, N]), W the matrices mx.quantize packed
// into w, scales and biases (mode "affine": bits 1-6 or 8, group size 32,
// 64 or 128; "mxfp4": 4 bits, group 32, no biases). Unset group_size/bits
// take the mode's defaults. Differentiable in x.
mx::array gather_qmm(
    mx::array x,
    mx::array w,
    mx::array scales,
    std::optional<mx::array> biases = std::nullopt,
    std::optional<mx::array> lhs_indices = std::nullopt,
    std::optional<mx::array> rhs_indices = std::nullopt,
    bool transpose = true,
    std::optional<int> group_size = std::nullopt,
    std::optional<int> bits = std::nullopt,
    const std::string& mode = "affine",
    bool sorted_indices = false,
    mx::StreamOrDevice s = {});

// The fused SwitchGLU of a MoE layer (mlx-lm's SwitchGLU with SwiGLU):
// for every token t and slot j with expert e = indices[t, j],
//   y[t, j] = (silu(x[t] @ gate[e]^T) * (x[t] @ up[e]^T)) @ down[e]^T,
// returned as [..., k, D], or, with scores, as sum_j scores[t, j] * y[t, j],
// [..., D], computed inside the down kernel. x [..., D]; gate_weight and
// up_weight [E, H, D]; down_weight [E, D, H]; indices [..., k]. With
// gate_weight empty, up_weight is one fused gate_up weight [E, 2H, D] (gate
// rows first). Differentiable in x, the weights and scores.
// With first_expert (expert parallelism), the weights are experts
// [first_expert, first_expert + E) of a larger set: slots whose expert is
// outside that range contribute nothing (zero rows without scores) and no
// kernel reads or computes anything for them; no index is out of range.
mx::array switch_glu(
    mx::array x,
    std::optional<mx::array> gate_weight,
    mx::array up_weight,
    mx::array down_weight,
    mx::array indices,
    std::optional<mx::array> scores = std::nullopt,
    std::optional<int> first_expert = std::nullopt,
    mx::StreamOrDevice s = {});

// A softmax router's expert choice: the k most probable experts of each
// row of logits [..., E] (softmax in float32) and their probabilities in
// the logits' dtype, renormalized over the k when `normalize`. Returns
// (indices [..., k] uint32, most probable first; scores [..., k]). On the
// CPU one SoftmaxTopK node; elsewhere MLX's softmax/argpartition
// composition (indices then in partition order). Differentiable in logits.
std::pair<mx::array, mx::array> softmax_top_k(
    mx::array logits, int k, bool normalize = false, mx::StreamOrDevice s = {});

// `a` itself when it is already evaluated and row contiguous, else a
// contiguous copy: the kernels read weights' rows directly, and a
// Contiguous graph node per weight and call costs microseconds, as much
// as a small product at one token.
mx::array row_contiguous(const mx::array& a, const mx::Stream& stream);

// A dense projection x @ weight^T, nn.Linear's product: x [..., K], weight
// [N, K] -> [..., N] in the promoted dtype (float32, float16, bfloat16).
// On the CPU it runs our gather kernels over a single matrix (linear.cpp);
// elsewhere it is mx::matmul. Differentiable in x and weight.
mx::array linear(mx::array x, mx::array weight, mx::StreamOrDevice s = {});

// nn.QuantizedLinear's product x @ W^T, W one mx.quantize triple (w [N,
// K * bits / 32], scales, biases) in a format gather_qmm accepts; the
// output dtype follows mx.quantized_matmul. On the CPU our gather_qmm
// kernels over a single matrix; elsewhere mx::quantized_matmul.
// Differentiable in x.
mx::array quantized_linear(
    mx::array x,
    mx::array w,
    mx::array scales,
    std::optional<mx::array> biases = std::nullopt,
    std::optional<int> group_size = std::nullopt,
    std::optional<int> bits = std::nullopt,
    const std::string& mode = "affine",
    mx::StreamOrDevice s = {});

// softmax(scale * q k^T [+ causal mask]) v, mx.fast.scaled_dot_product_attention's
// semantics for mask "" (none) or "causal" (aligned to the last key): q [B,
// Hq, L, d], k [B, Hkv, S, d], v [B, Hkv, S, dv], one float dtype, Hq a
// multiple of Hkv (grouped-query attention). On the CPU our kernel
// (cpu/attention_kernels.h); elsewhere MLX's. Differentiable.
mx::array scaled_dot_product_attention(
    mx::array q, mx::array k, mx::array v, float scale, const std::string& mask = "", mx::StreamOrDevice s = {});

// The same in plain MLX ops, computed in float32 (the gradient of the
// primitive, and a readable statement of what the kernel computes).
mx::array attention_reference(
    const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal, mx::StreamOrDevice s = {});

// Rotary position embedding with mx.fast.rope's semantics (integer offset,
// frequencies base^(-2i/dims)): our CPU kernel (one op instead of MLX's CPU
// composition of a dozen); elsewhere mx::fast::rope. Differentiable.
mx::array rope(
    mx::array x, int dims, bool traditional, float base, float scale, int offset, mx::StreamOrDevice s = {});

// RMS normalisation over the last axis with mx.fast.rms_norm's semantics
// (output in x's dtype promoted with the weight's): our CPU kernel, elsewhere
// mx::fast::rms_norm. Differentiable.
mx::array rms_norm(mx::array x, std::optional<mx::array> weight, float eps, mx::StreamOrDevice s = {});

// One mx.quantize triple: packed codes, scales and (affine) biases.
struct QuantizedWeight {
  mx::array weight;
  mx::array scales;
  std::optional<mx::array> biases;
};

// switch_glu on quantized experts: gate, up [E, H, D * bits / 32] and down
// [E, D, H * bits / 32] codes with their scales and biases, all in one
// quantization format (see gather_qmm). Differentiable in x and scores.
mx::array switch_glu_quantized(
    mx::array x,
    const QuantizedWeight& gate,
    const QuantizedWeight& up,
    const QuantizedWeight& down,
    mx::array indices,
    std::optional<mx::array> scores = std::nullopt,
    std::optional<int> group_size = std::nullopt,
    std::optional<int> bits = std::nullopt,
    const std::string& mode = "affine",
    std::optional<int> first_expert = std::nullopt,
    mx::StreamOrDevice s = {});

// The routing step on its own: the slots (t * k + j) of indices [..., k]
// sorted by expert, and the offsets [E + 1] of each expert's range.
std::pair<mx::array, mx::array> route(mx::array indices, int num_experts, mx::StreamOrDevice s = {});

// A validated quantization format: mode "affine" or "mxfp4", with the
// mode's defaults filled in. Throws invalid_argument naming `op` otherwise.
struct QuantizationFormat {
  std::string mode;
  int group_size;
  int bits;
};
QuantizationFormat quantization_format(
    std::optional<int> group_size,
    std::optional<int> bits,
    const std::string& mode,
    const char* op);

// Checks one mx.quantize triple (w, scales, biases) against the format;
// errors name `op` and the weight as `name`.
void check_quantized_weight(
    const mx::array& w,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const QuantizationFormat& format,
    const char* op,
    const std::string& name);

// The compute dtype of a quantized product: x's dtype promoted with the
// scales' and biases' (affine), as mx.quantized_matmul's output; throws
// invalid_argument naming `op` unless it is float32, float16 or bfloat16.
mx::Dtype quantized_compute_type(
    const mx::array& x,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const QuantizationFormat& format,
    const char* op);

// One quantized weight as the kernels read it: the codes, then the scales
// (and, affine mode, the biases) in the compute dtype `type`, each row
// contiguous (see row_contiguous).
std::vector<mx::array> quantized_kernel_inputs(
    const mx::array& w,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const QuantizationFormat& format,
    mx::Dtype type,
    const mx::Stream& stream);

// A shape as error messages print it, e.g. "(2, 3)".
std::string shape_text(const mx::Shape& shape);

// True when this build has our kernels for the stream's device. Where it
// has none (the GPU before the Metal/CUDA kernels land) the ops fall back
// to MLX's own implementation.
bool has_kernels_for(const mx::Stream& stream);

} // namespace mlx_moe
