// Python bindings: argument names and docstrings only, no logic.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>

#include "metal/gather_mm_plan.h"
#include "metal/gather_qmm_plan.h"
#include "metal/route_plan.h"
#include "metal/switch_glu_plan.h"
#include "metal/switch_glu_quantized_plan.h"
#include "cpu/huge_pages.h"
#include "cpu/kernels.h"
#include "ops.h"

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace nb::literals;

namespace {

// One SwitchGLU launch of a Metal plan as a dict (kernel, grid, threads,
// threadgroup memory per index) for the simulator tests.
nb::dict switch_glu_launch(const mlx_moe::metal::SwitchGluLaunch& l) {
  nb::dict d;
  d["kernel"] = l.kernel;
  d["grid"] = nb::make_tuple(l.grid[0], l.grid[1], l.grid[2]);
  d["threads"] = nb::make_tuple(l.threads[0], l.threads[1], l.threads[2]);
  nb::list memory;
  for (uint32_t bytes : l.threadgroup_memory) {
    memory.append(bytes);
  }
  d["threadgroup_memory"] = memory;
  return d;
}

// A plan's constant-buffer struct, as the bytes the host would send.
template <typename Params>
nb::bytes params_bytes(const Params& params) {
  return nb::bytes(reinterpret_cast<const char*>(&params), sizeof(params));
}

// A gather_mm / gather_qmm launch (the two plans have the same fields).
template <typename Launch>
nb::dict gather_launch(const Launch& plan) {
  nb::dict d;
  d["kernel"] = plan.kernel;
  d["prefill"] = plan.prefill;
  d["grid"] = nb::make_tuple(plan.grid[0], plan.grid[1], plan.grid[2]);
  d["threads"] = nb::make_tuple(plan.threads[0], plan.threads[1], plan.threads[2]);
  d["threadgroup_memory"] = plan.threadgroup_memory;
  d["block_rows"] = plan.block_rows;
  d["block_cols"] = plan.block_cols;
  d["k_chunk"] = plan.params.k_chunk;
  d["params"] = params_bytes(plan.params);
  return d;
}

// The fields the float and the quantized SwitchGLU plans share.
template <typename Plan>
nb::dict switch_glu_plan(const Plan& plan) {
  nb::dict d;
  d["gate_up"] = switch_glu_launch(plan.gate_up);
  d["down"] = switch_glu_launch(plan.down);
  d["scores"] = plan.scores;
  d["block_rows"] = plan.block_rows;
  d["block_cols"] = plan.block_cols;
  d["d_chunk"] = plan.params.d_chunk;
  d["h_chunk"] = plan.params.h_chunk;
  d["params"] = params_bytes(plan.params);
  return d;
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "C++ MLX primitives of mlx_moe_kernels (use the mlx_moe_kernels package).";

  m.def(
      "_cpu_kernel_build",
      [] { return std::string(mlx_moe::cpu::cpu_kernels().name); },
      "The CPU kernel build in use: avx512, avx2 or portable (the best the CPU supports, capped by "
      "MLX_MOE_CPU_KERNELS).");

  m.def(
      "_advise_huge_pages",
      [](std::vector<mx::array> arrays) {
        auto advice = mlx_moe::advise_huge_pages(std::move(arrays));
        return std::make_pair(advice.advised, advice.collapsed);
      },
      "arrays"_a,
      "(bytes advised, bytes collapsed) of the whole huge pages inside the arrays' distinct buffers "
      "(see mlx_moe_kernels.use_huge_pages).");

  m.def(
      "gather_mm",
      &mlx_moe::gather_mm,
      "a"_a,
      "b"_a,
      "lhs_indices"_a = nb::none(),
      "rhs_indices"_a = nb::none(),
      nb::kw_only(),
      "sorted_indices"_a = false,
      "stream"_a = nb::none(),
      "Gather matmul with the semantics of mx.gather_mm (see mlx_moe_kernels.gather_mm).");

  m.def(
      "gather_qmm",
      &mlx_moe::gather_qmm,
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a = nb::none(),
      "lhs_indices"_a = nb::none(),
      "rhs_indices"_a = nb::none(),
      "transpose"_a = true,
      "group_size"_a = nb::none(),
      "bits"_a = nb::none(),
      "mode"_a = "affine",
      nb::kw_only(),
      "sorted_indices"_a = false,
      "stream"_a = nb::none(),
      "Quantized gather matmul with the semantics of mx.gather_qmm (see mlx_moe_kernels.gather_qmm).");

  m.def(
      "linear",
      &mlx_moe::linear,
      "x"_a,
      "weight"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "x @ weight.T as nn.Linear computes it (see mlx_moe_kernels.linear).");

  m.def(
      "quantized_linear",
      &mlx_moe::quantized_linear,
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a = nb::none(),
      "group_size"_a = nb::none(),
      "bits"_a = nb::none(),
      "mode"_a = "affine",
      nb::kw_only(),
      "stream"_a = nb::none(),
      "x @ W.T for an mx.quantize triple, as nn.QuantizedLinear (see mlx_moe_kernels.quantized_linear).");

  m.def(
      "softmax_top_k",
      &mlx_moe::softmax_top_k,
      "logits"_a,
      "k"_a,
      "normalize"_a = false,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "A softmax router's top-k experts and their probabilities (see mlx_moe_kernels.softmax_top_k).");

  m.def(
      "scaled_dot_product_attention",
      &mlx_moe::scaled_dot_product_attention,
      "q"_a,
      "k"_a,
      "v"_a,
      nb::kw_only(),
      "scale"_a,
      "mask"_a = "",
      "stream"_a = nb::none(),
      "Attention as mx.fast.scaled_dot_product_attention (see mlx_moe_kernels.scaled_dot_product_attention).");

  m.def(
      "rope",
      &mlx_moe::rope,
      "x"_a,
      "dims"_a,
      nb::kw_only(),
      "traditional"_a,
      "base"_a,
      "scale"_a,
      "offset"_a,
      "stream"_a = nb::none(),
      "Rotary position embedding as mx.fast.rope (see mlx_moe_kernels.rope).");

  m.def(
      "rms_norm",
      &mlx_moe::rms_norm,
      "x"_a,
      "weight"_a.none(),
      nb::kw_only(),
      "eps"_a,
      "stream"_a = nb::none(),
      "RMS normalisation as mx.fast.rms_norm (see mlx_moe_kernels.rms_norm).");

  m.def(
      "switch_glu",
      &mlx_moe::switch_glu,
      "x"_a,
      "gate_weight"_a.none(),
      "up_weight"_a,
      "down_weight"_a,
      "indices"_a,
      "scores"_a = nb::none(),
      nb::kw_only(),
      "first_expert"_a = nb::none(),
      "stream"_a = nb::none(),
      "Fused SwitchGLU of a MoE layer (see mlx_moe_kernels.switch_glu).");

  m.def(
      "switch_glu_quantized",
      [](mx::array x, mx::array gate_w, mx::array gate_s, std::optional<mx::array> gate_b,
         mx::array up_w, mx::array up_s, std::optional<mx::array> up_b, mx::array down_w,
         mx::array down_s, std::optional<mx::array> down_b, mx::array indices,
         std::optional<mx::array> scores, std::optional<int> group_size, std::optional<int> bits,
         const std::string& mode, std::optional<int> first_expert, mx::StreamOrDevice stream) {
        return mlx_moe::switch_glu_quantized(
            x, {gate_w, gate_s, gate_b}, {up_w, up_s, up_b}, {down_w, down_s, down_b}, indices,
            scores, group_size, bits, mode, first_expert, stream);
      },
      "x"_a,
      "gate_weight"_a,
      "gate_scales"_a,
      "gate_biases"_a.none(),
      "up_weight"_a,
      "up_scales"_a,
      "up_biases"_a.none(),
      "down_weight"_a,
      "down_scales"_a,
      "down_biases"_a.none(),
      "indices"_a,
      "scores"_a = nb::none(),
      "group_size"_a = nb::none(),
      "bits"_a = nb::none(),
      "mode"_a = "affine",
      nb::kw_only(),
      "first_expert"_a = nb::none(),
      "stream"_a = nb::none(),
      "Fused SwitchGLU on quantized experts (see mlx_moe_kernels.switch_glu).");

  m.def(
      "route",
      &mlx_moe::route,
      "indices"_a,
      "num_experts"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Slots sorted by expert and per-expert offsets (see mlx_moe_kernels.route).");

  m.def(
      "_plan_gather_mm",
      [](int64_t rows, int64_t max_rows_per_expert, int64_t N, int64_t K, int64_t num_experts,
         mx::Dtype dtype, int64_t rows_per_index, int64_t lhs_batches) {
        auto plan = mlx_moe::metal::plan_gather_mm(
            rows, max_rows_per_expert, N, K, num_experts, dtype, rows_per_index, lhs_batches);
        return gather_launch(plan);
      },
      "rows"_a,
      "max_rows_per_expert"_a,
      "N"_a,
      "K"_a,
      "num_experts"_a,
      "dtype"_a,
      "rows_per_index"_a = 1,
      "lhs_batches"_a = -1,
      "Private: the Metal launch plan of gather_mm (kernel, grid, threads, threadgroup memory, params bytes).");

  m.def(
      "_plan_gather_qmm",
      [](int64_t rows, int64_t max_rows_per_expert, int64_t N, int64_t K, int64_t num_experts,
         int group_size, int bits, const std::string& mode, mx::Dtype dtype, int64_t rows_per_index,
         int64_t lhs_batches) {
        auto plan = mlx_moe::metal::plan_gather_qmm(
            rows, max_rows_per_expert, N, K, num_experts, group_size, bits, mode, dtype, rows_per_index,
            lhs_batches);
        return gather_launch(plan);
      },
      "rows"_a,
      "max_rows_per_expert"_a,
      "N"_a,
      "K"_a,
      "num_experts"_a,
      "group_size"_a,
      "bits"_a,
      "mode"_a,
      "dtype"_a,
      "rows_per_index"_a = 1,
      "lhs_batches"_a = -1,
      "Private: the Metal launch plan of the quantized gather_mm, decode path (kernel, grid, threads, threadgroup memory, params bytes).");

  m.def(
      "_plan_switch_glu",
      [](int64_t tokens, int64_t top_k, int64_t max_rows_per_expert, int64_t D, int64_t H,
         int64_t num_experts, mx::Dtype dtype, bool scores) {
        auto plan = mlx_moe::metal::plan_switch_glu(
            tokens, top_k, max_rows_per_expert, D, H, num_experts, dtype, scores);
        nb::dict d = switch_glu_plan(plan);
        d["combine"] = switch_glu_launch(plan.combine);
        d["prefill"] = plan.prefill;
        d["scratch_bytes"] = plan.scratch_bytes;
        return d;
      },
      "tokens"_a,
      "top_k"_a,
      "max_rows_per_expert"_a,
      "D"_a,
      "H"_a,
      "num_experts"_a,
      "dtype"_a,
      "scores"_a,
      "Private: the Metal launch plan of the fused SwitchGLU, decode path (gate_up and down launches, params bytes).");

  m.def(
      "_plan_switch_glu_quantized",
      [](int64_t tokens, int64_t top_k, int64_t max_rows_per_expert, int64_t D, int64_t H,
         int64_t num_experts, int group_size, int bits, const std::string& mode, mx::Dtype dtype, bool scores) {
        auto plan = mlx_moe::metal::plan_switch_glu_quantized(
            tokens, top_k, max_rows_per_expert, D, H, num_experts, group_size, bits, mode, dtype, scores);
        return switch_glu_plan(plan);
      },
      "tokens"_a,
      "top_k"_a,
      "max_rows_per_expert"_a,
      "D"_a,
      "H"_a,
      "num_experts"_a,
      "group_size"_a,
      "bits"_a,
      "mode"_a,
      "dtype"_a,
      "scores"_a,
      "Private: the Metal launch plan of the fused quantized SwitchGLU, decode path.");

  m.def(
      "_switch_glu_row_bound",
      &mlx_moe::metal::switch_glu_row_bound,
      "tokens"_a,
      "top_k"_a,
      "Private: the bound on an expert's rows the Metal dispatch plans the fused SwitchGLU with.");

  m.def(
      "_plan_route",
      [](int64_t slots, int64_t num_experts, int64_t max_threads) {
        auto plan = mlx_moe::metal::plan_route(slots, num_experts, max_threads);
        nb::dict d;
        d["kernel"] = plan.kernel;
        d["grid"] = nb::make_tuple(plan.grid[0], plan.grid[1], plan.grid[2]);
        d["threads"] = nb::make_tuple(plan.threads[0], plan.threads[1], plan.threads[2]);
        d["key_bits"] = plan.params.key_bits;
        d["params"] = params_bytes(plan.params);
        return d;
      },
      "slots"_a,
      "num_experts"_a,
      "max_threads"_a = 1024,
      "Private: the Metal launch plan of the routing kernel (kernel, grid, threads, params bytes).");
}
