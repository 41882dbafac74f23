// GatherMM::eval_gpu: out[i] = a[lhs[i]] @ b[rhs[i]] with the kernels of
// gather_mm.metal. The index entries are routed by rhs (route.metal's
// counting sort, as the fused SwitchGLU does), then the gather_mm kernel
// reads each entry's M rows of a through order and lhs, and writes its
// output rows in place: no gathered copy of a, no scatter of out.
//
// GatherQMM::eval_gpu: the same with gather_qmm.metal's kernels (decode up
// to 8 rows per expert, then the simdgroup_matrix prefill kernel).
#include <limits>
#include <stdexcept>

#include <mlx/allocator.h>
#include <mlx/backend/gpu/copy.h>
#include <mlx/backend/metal/device.h>

#include "metal/dispatch.h"
#include "metal/gather_mm_plan.h"
#include "metal/gather_qmm_plan.h"
#include "primitives.h"

namespace mlx_moe {

namespace {

// What both gathers do before their kernel: out filled with NaN (an entry
// whose rhs id is out of range is in no expert's rows and is not written; a
// bad id anywhere empties the routing; the GPU cannot raise mid-evaluation,
// so such outputs must not pass for numbers), and the index entries routed
// by rhs. Returns the routing (order, offsets) the kernels read.
struct EntryRouting {
  mx::array order;
  mx::array offsets;
};

EntryRouting prepare_gather(
    mx::metal::Device& device,
    mx::metal::CommandEncoder& encoder,
    const mx::Stream& s,
    mx::array& out,
    const mx::array& rhs,
    int64_t num_experts) {
  mx::array nan(std::numeric_limits<float>::quiet_NaN(), out.dtype());
  encoder.add_temporary(nan);
  mx::fill_gpu(nan, out, s);
  const int entries = static_cast<int>(rhs.size());
  EntryRouting routing{
      metal::temporary(encoder, {entries}, mx::uint32),
      metal::temporary(encoder, {static_cast<int>(num_experts + 1)}, mx::uint32)};
  mx::array sorted_experts = metal::temporary(encoder, {entries}, mx::uint32);
  mx::array status = metal::temporary(encoder, {1}, mx::uint32);
  metal::encode_route(
      device, encoder, rhs, static_cast<int>(num_experts), routing.order, routing.offsets, sorted_experts, status);
  return routing;
}

}  // namespace

void GatherMM::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& s = stream();
  auto& device = mx::metal::device(s.device);
  auto& encoder = mx::metal::get_command_encoder(s);
  // Inputs: a [..., M, K], b [..., K, N], lhs_indices and rhs_indices uint32
  // of one shape I (ops.cpp checked shapes and dtypes, and that the plans
  // accept them). Output [*I, M, N].
  const mx::array& a = inputs[0];
  const mx::array& b = inputs[1];
  if (out.size() == 0) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    return;
  }
  // out [*I, M, N] is not empty, so M, N >= 1; K = 0 (possible under
  // shapeless compilation) is a product of empty sums.
  const int64_t M = a.shape(-2), K = a.shape(-1), N = b.shape(-1);
  if (K == 0) {
    mx::array zero(0.0f, out.dtype());
    encoder.add_temporary(zero);
    mx::fill_gpu(zero, out, s);
    return;
  }
  const int64_t lhs_batches = static_cast<int64_t>(a.size()) / (M * K);
  const int64_t num_experts = static_cast<int64_t>(b.size()) / (K * N);
  const int64_t entries = static_cast<int64_t>(inputs[2].size());
  // The kernels read x [lhs_batches * M, K] and w [E, N, K] densely (w with
  // 16-byte loads, so aligned): b^T is row-contiguous when b is a transposed
  // view of [E, N, K] weights (mlx-lm's SwitchLinear: no copy); any other
  // layout or an unaligned view is copied once per call.
  const mx::array x = metal::row_contiguous(a, encoder, s);
  const mx::array w = metal::aligned_rows(mx::swapaxes_in_eval(b, -1, -2), encoder, s);
  const mx::array lhs = metal::row_contiguous(inputs[2], encoder, s);
  const mx::array rhs = metal::row_contiguous(inputs[3], encoder, s);
  const EntryRouting routing = prepare_gather(device, encoder, s, out, rhs, num_experts);

  // Rows per expert are only known on the GPU: plan for the worst case (all
  // entries on one expert).
  const int64_t rows = entries * M;
  const auto plan = metal::plan_gather_mm(rows, rows, N, K, num_experts, out.dtype(), M, lhs_batches);
  if (metal::empty_grid(plan.grid)) {
    return;
  }
  metal::use_kernel(device, encoder, plan.kernel, plan.threads);
  // Buffers as gather_mm.metal: 0 x, 1 w, 2 offsets, 3 out, 4 params, 5 order, 6 lhs.
  encoder.set_input_array(x, 0);
  encoder.set_input_array(w, 1);
  encoder.set_input_array(routing.offsets, 2);
  encoder.set_output_array(out, 3);
  encoder.set_bytes(plan.params, 4);
  encoder.set_input_array(routing.order, 5);
  encoder.set_input_array(lhs, 6);
  encoder.set_threadgroup_memory_length(plan.threadgroup_memory, 0);
  metal::dispatch(encoder, plan.grid, plan.threads);
}

void GatherQMM::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& s = stream();
  auto& device = mx::metal::device(s.device);
  auto& encoder = mx::metal::get_command_encoder(s);
  // Inputs: x [..., M, K], w [..., N, K * bits / 32] (ops.cpp sends only
  // transpose=True here), scales, [biases], lhs_indices, rhs_indices
  // (ops.cpp checked the plan accepts the shapes).
  const bool has_biases = inputs.size() == 6;
  const mx::array& x_in = inputs[0];
  const mx::array& w = inputs[1];
  if (out.size() == 0) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    return;
  }
  // M, N >= 1 (out is not empty) and K >= group_size (the packed format).
  const int64_t M = x_in.shape(-2), K = x_in.shape(-1), N = w.shape(-2);
  const int64_t lhs_batches = static_cast<int64_t>(x_in.size()) / (M * K);
  const int64_t num_experts = static_cast<int64_t>(w.size()) / (N * w.shape(-1));
  const int64_t entries = static_cast<int64_t>(inputs[inputs.size() - 2].size());
  const mx::array x = metal::row_contiguous(x_in, encoder, s);
  const mx::array packed = metal::aligned_rows(w, encoder, s);  // uint4 / uint2 block loads
  const mx::array scales = metal::row_contiguous(inputs[2], encoder, s);
  const mx::array biases = has_biases ? metal::row_contiguous(inputs[3], encoder, s) : scales;
  const mx::array lhs = metal::row_contiguous(inputs[inputs.size() - 2], encoder, s);
  const mx::array rhs = metal::row_contiguous(inputs[inputs.size() - 1], encoder, s);
  const EntryRouting routing = prepare_gather(device, encoder, s, out, rhs, num_experts);

  const int64_t rows = entries * M;
  const auto plan = metal::plan_gather_qmm(
      rows, rows, N, K, num_experts, group_size_, bits_, mode_, out.dtype(), M, lhs_batches);
  if (metal::empty_grid(plan.grid)) {
    return;
  }
  metal::use_kernel(device, encoder, plan.kernel, plan.threads);
  // Buffers as gather_qmm.metal: 0 x, 1 w, 2 scales, 3 biases (mxfp4: unused,
  // the scales bound in their place), 4 offsets, 5 out, 6 params, 7 order, 8 lhs.
  encoder.set_input_array(x, 0);
  encoder.set_input_array(packed, 1);
  encoder.set_input_array(scales, 2);
  encoder.set_input_array(biases, 3);
  encoder.set_input_array(routing.offsets, 4);
  encoder.set_output_array(out, 5);
  encoder.set_bytes(plan.params, 6);
  encoder.set_input_array(routing.order, 7);
  encoder.set_input_array(lhs, 8);
  encoder.set_threadgroup_memory_length(plan.threadgroup_memory, 0);
  metal::dispatch(encoder, plan.grid, plan.threads);
}

}  // namespace mlx_moe
