// GatherMM::eval_cpu: reads the indices, checks their range, groups the
// index pairs by b matrix (counting sort), splits the work into
// (group, column block) tasks and runs them on the thread pool with the best
// kernel build the CPU supports.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

#include "cpu/element_type.h"
#include "cpu/gather_mm_problem.h"
#include "cpu/gather_tasks.h"
#include "cpu/indices.h"
#include "cpu/kernels.h"
#include "cpu/routing.h"
#include "cpu/thread_pool.h"
#include "primitives.h"

namespace mlx_moe {

namespace {

using cpu::ElementType;

// Everything the CPU task needs from the arrays, captured by value.
struct GatherMMArguments {
  ElementType dtype;
  const void* a;
  mx::Shape a_shape;
  mx::Strides a_strides;
  const void* b;
  mx::Shape b_shape;
  mx::Strides b_strides;
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

void run_gather_mm(const GatherMMArguments& args) {
  const int a_ndim = static_cast<int>(args.a_shape.size());
  const int b_ndim = static_cast<int>(args.b_shape.size());
  const int64_t M = args.a_shape[a_ndim - 2];
  const int64_t K = args.a_shape[a_ndim - 1];
  const int64_t N = args.b_shape[b_ndim - 1];
  if (args.num_pairs == 0 || M == 0 || N == 0) {
    return;
  }
  int64_t a_batch = 1;
  for (int d = 0; d < a_ndim - 2; ++d) {
    a_batch *= args.a_shape[d];
  }
  int64_t b_batch = 1;
  for (int d = 0; d < b_ndim - 2; ++d) {
    b_batch *= args.b_shape[d];
  }

  // Pairs with an index out of range compute with index 0 (never an
  // out-of-bounds read) and get NaN rows at the end.
  std::vector<int64_t> bad_pairs;
  std::vector<uint32_t> lhs =
      read_indices(args.lhs, args.lhs_shape, args.lhs_strides, args.num_pairs, a_batch, bad_pairs);
  std::vector<uint32_t> rhs =
      read_indices(args.rhs, args.rhs_shape, args.rhs_strides, args.num_pairs, b_batch, bad_pairs);
  std::vector<int64_t> a_offsets(args.num_pairs);
  std::vector<int64_t> b_offsets(args.num_pairs);
  for (int64_t p = 0; p < args.num_pairs; ++p) {
    a_offsets[p] = batch_offset(lhs[p], args.a_shape, args.a_strides, a_ndim - 2);
    b_offsets[p] = batch_offset(rhs[p], args.b_shape, args.b_strides, b_ndim - 2);
  }
  cpu::ExpertGroups groups = cpu::group_by_expert(rhs.data(), args.num_pairs, b_batch);

  cpu::GatherMMProblem problem;
  problem.rows_per_pair = M;
  problem.N = N;
  problem.K = K;
  problem.dtype = args.dtype;
  problem.a = args.a;
  problem.a_row_stride = args.a_strides[a_ndim - 2];
  problem.a_col_stride = args.a_strides[a_ndim - 1];
  problem.a_offsets = a_offsets.data();
  problem.b = args.b;
  problem.b_k_stride = args.b_strides[b_ndim - 2];
  problem.b_n_stride = args.b_strides[b_ndim - 1];
  problem.b_offsets = b_offsets.data();
  problem.out = args.out;
  problem.pair_order = groups.pair_order.data();
  problem.group_begin = groups.group_begin.data();
  problem.num_groups = groups.num_groups();

  cpu::run_column_blocks(problem, cpu::kColumnQuantum, cpu::cpu_kernels().gather_mm_task);
  for (int64_t p : bad_pairs) {
    fill_nan(static_cast<char*>(args.out) + p * M * N * mx::size_of(args.out_dtype), M * N, args.out_dtype);
  }
}

} // namespace

void GatherMM::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const mx::array& a = inputs[0];
  const mx::array& b = inputs[1];
  const mx::array& lhs = inputs[2];
  const mx::array& rhs = inputs[3];
  out.set_data(mx::allocator::malloc(out.nbytes()));

  GatherMMArguments args{
      cpu::element_type(out.dtype(), "gather_mm"),
      a.data<void>(),
      a.shape(),
      a.strides(),
      b.data<void>(),
      b.shape(),
      b.strides(),
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
  encoder.set_input_array(a);
  encoder.set_input_array(b);
  encoder.set_input_array(lhs);
  encoder.set_input_array(rhs);
  encoder.set_output_array(out);
  encoder.dispatch([args = std::move(args)]() { run_gather_mm(args); });
}

} // namespace mlx_moe
