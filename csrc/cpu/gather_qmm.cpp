// GatherQMM::eval_cpu: reads and checks the indices, groups the index pairs
// by weight matrix (counting sort), splits the work into (group, column
// block) tasks and runs them on the thread pool with the best kernel build.
#include <algorithm>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

#include "cpu/element_type.h"
#include "cpu/gather_qmm_problem.h"
#include "cpu/gather_tasks.h"
#include "cpu/indices.h"
#include "cpu/quantized_arrays.h"
#include "cpu/kernels.h"
#include "cpu/routing.h"
#include "cpu/thread_pool.h"
#include "primitives.h"

namespace mlx_moe {

namespace {

// What the CPU task needs from the arrays, captured by value.
struct GatherQMMArguments {
  cpu::ElementType dtype;
  const void* x;
  mx::Shape x_shape;
  mx::Strides x_strides;
  cpu::QuantizedMatrices w;
  int64_t num_matrices;
  int64_t N;
  bool transpose;
  const uint32_t* lhs;
  mx::Shape lhs_shape;
  mx::Strides lhs_strides;
  const uint32_t* rhs;
  mx::Shape rhs_shape;
  mx::Strides rhs_strides;
  int64_t num_pairs;
  void* out;
  mx::Dtype out_dtype;
};

void run_gather_qmm(const GatherQMMArguments& args) {
  const int x_ndim = static_cast<int>(args.x_shape.size());
  const int64_t M = args.x_shape[x_ndim - 2];
  const int64_t K = args.x_shape[x_ndim - 1];
  if (args.num_pairs == 0 || M == 0 || args.N == 0) {
    return;
  }
  int64_t x_batch = 1;
  for (int d = 0; d < x_ndim - 2; ++d) {
    x_batch *= args.x_shape[d];
  }
  // Pairs with an index out of range compute with index 0 (never an
  // out-of-bounds read) and get NaN rows at the end.
  std::vector<int64_t> bad_pairs;
  std::vector<uint32_t> lhs =
      read_indices(args.lhs, args.lhs_shape, args.lhs_strides, args.num_pairs, x_batch, bad_pairs);
  std::vector<uint32_t> rhs = read_indices(
      args.rhs, args.rhs_shape, args.rhs_strides, args.num_pairs, args.num_matrices, bad_pairs);
  std::vector<int64_t> x_offsets(args.num_pairs);
  for (int64_t p = 0; p < args.num_pairs; ++p) {
    x_offsets[p] = batch_offset(lhs[p], args.x_shape, args.x_strides, x_ndim - 2);
  }
  cpu::ExpertGroups groups = cpu::group_by_expert(rhs.data(), args.num_pairs, args.num_matrices);

  cpu::GatherQMMProblem problem;
  problem.rows_per_pair = M;
  problem.N = args.N;
  problem.K = K;
  problem.dtype = args.dtype;
  problem.x = args.x;
  problem.x_row_stride = args.x_strides[x_ndim - 2];
  problem.x_col_stride = args.x_strides[x_ndim - 1];
  problem.x_offsets = x_offsets.data();
  problem.w = args.w;
  problem.transpose = args.transpose;
  problem.matrix_of_pair = rhs.data();
  problem.out = args.out;
  problem.pair_order = groups.pair_order.data();
  problem.group_begin = groups.group_begin.data();
  problem.num_groups = groups.num_groups();

  cpu::run_column_blocks(
      problem, problem.transpose ? cpu::kColumnQuantum : problem.w.group_size, cpu::cpu_kernels().gather_qmm_task);
  const size_t item = mx::size_of(args.out_dtype);
  for (int64_t p : bad_pairs) {
    fill_nan(static_cast<char*>(args.out) + p * M * args.N * item, M * args.N, args.out_dtype);
  }
}

} // namespace

// The packed weight, scales and biases as the kernels read them (the op made
// them row-contiguous).
cpu::QuantizedMatrices quantized_matrices(
    const mx::array& w,
    const mx::array& scales,
    const mx::array* biases,
    int group_size,
    int bits,
    const std::string& mode) {
  if (!w.flags().row_contiguous || !scales.flags().row_contiguous ||
      (biases && !biases->flags().row_contiguous)) {
    throw std::logic_error("[gather_qmm] internal: quantized arrays must be row contiguous.");
  }
  cpu::QuantizedMatrices q;
  q.mode = mode == "mxfp4" ? cpu::QuantizationMode::mxfp4 : cpu::QuantizationMode::affine;
  q.bits = bits;
  q.group_size = group_size;
  q.packed = reinterpret_cast<const uint8_t*>(w.data<uint32_t>());
  q.row_bytes = int64_t{w.shape(-1)} * 4;
  q.matrix_bytes = q.row_bytes * w.shape(-2);
  q.scales = scales.data<void>();
  q.biases = biases ? biases->data<void>() : nullptr;
  q.scale_row_stride = scales.shape(-1);
  q.scale_matrix_stride = q.scale_row_stride * scales.shape(-2);
  return q;
}

void GatherQMM::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const bool has_biases = inputs.size() == 6;
  const mx::array& x = inputs[0];
  const mx::array& w = inputs[1];
  const mx::array& scales = inputs[2];
  const mx::array& lhs = inputs[inputs.size() - 2];
  const mx::array& rhs = inputs[inputs.size() - 1];
  out.set_data(mx::allocator::malloc(out.nbytes()));

  int64_t num_matrices = 1;
  for (int d = 0; d < static_cast<int>(w.ndim()) - 2; ++d) {
    num_matrices *= w.shape(d);
  }
  GatherQMMArguments args{
      cpu::element_type(out.dtype(), "gather_qmm"),
      x.data<void>(),
      x.shape(),
      x.strides(),
      quantized_matrices(w, scales, has_biases ? &inputs[3] : nullptr, group_size_, bits_, mode_),
      num_matrices,
      out.shape(-1),
      transpose_,
      lhs.data<uint32_t>(),
      lhs.shape(),
      lhs.strides(),
      rhs.data<uint32_t>(),
      rhs.shape(),
      rhs.strides(),
      static_cast<int64_t>(lhs.size()),
      out.data<void>(),
      out.dtype()};

  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  encoder.set_output_array(out);
  encoder.dispatch([args = std::move(args)]() { run_gather_qmm(args); });
}

} // namespace mlx_moe
