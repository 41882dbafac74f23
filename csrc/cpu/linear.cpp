// Linear::eval_cpu and QuantizedLinear::eval_cpu: a dense projection is a
// gather matmul over one matrix, so both describe x's rows as the gather
// problems do (cpu/gather_mm_problem.h, cpu/gather_qmm_problem.h) and run
// the same kernels as the experts: a few rows stream W once over all cores,
// many rows take the tiled compute paths.
#include <cstring>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

#include "cpu/element_type.h"
#include "cpu/gather_qmm_problem.h"
#include "cpu/gather_tasks.h"
#include "cpu/indices.h"
#include "cpu/kernels.h"
#include "cpu/quantized_arrays.h"
#include "primitives.h"

namespace mlx_moe {

namespace {

// x [..., K] as index pairs of the gather problems, all on matrix 0: one
// pair of every row when the leading axes collapse into a single row
// stride (row-contiguous x, a one-token x, a column slice), else one pair
// per row, each at its own offset. The output is row contiguous either way.
struct RowPairs {
  int64_t rows_per_pair = 0;
  int64_t row_stride = 0;
  int64_t col_stride = 1;
  std::vector<int64_t> offsets; // per pair, in elements
  std::vector<uint32_t> matrix; // per pair: 0
  std::vector<uint32_t> order; // the pairs in order: one group
  int64_t group_begin[2] = {0, 0};

  explicit RowPairs(const mx::array& x) {
    const int ndim = static_cast<int>(x.ndim());
    const int64_t K = x.shape(-1);
    col_stride = x.strides()[ndim - 1];
    int64_t rows = 1;
    for (int d = 0; d + 1 < ndim; ++d) {
      rows *= x.shape(d);
    }
    // Walk the leading axes from the innermost: each (of size > 1) must
    // step by the inner one's stride times its size.
    bool collapses = true;
    int64_t expected = -1;
    row_stride = K;
    for (int d = ndim - 2; d >= 0; --d) {
      if (x.shape(d) == 1) {
        continue;
      }
      if (expected < 0) {
        row_stride = x.strides()[d];
      } else if (x.strides()[d] != expected) {
        collapses = false;
        break;
      }
      expected = x.strides()[d] * x.shape(d);
    }
    int64_t pairs = 1;
    if (collapses) {
      rows_per_pair = rows;
      offsets.assign(1, 0);
    } else {
      rows_per_pair = 1;
      pairs = rows;
      offsets.resize(rows);
      for (int64_t r = 0; r < rows; ++r) {
        offsets[r] = cpu_batch_offset(x, r);
      }
    }
    matrix.assign(pairs, 0);
    order.resize(pairs);
    for (int64_t p = 0; p < pairs; ++p) {
      order[p] = static_cast<uint32_t>(p);
    }
    group_begin[1] = pairs;
  }

  int64_t num_pairs() const {
    return static_cast<int64_t>(order.size());
  }

 private:
  // Offset of row r (x's leading axes flattened row-major).
  static int64_t cpu_batch_offset(const mx::array& x, int64_t r) {
    return batch_offset(r, x.shape(), x.strides(), static_cast<int>(x.ndim()) - 1);
  }
};

bool has_no_work(mx::array& out, int64_t K) {
  if (out.size() == 0) {
    return true;
  }
  if (K == 0) {
    // An empty sum: zeros.
    std::memset(out.data<void>(), 0, out.nbytes());
    return true;
  }
  return false;
}

} // namespace

void Linear::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const mx::array& x = inputs[0];
  const mx::array& weight = inputs[1];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const cpu::ElementType dtype = cpu::element_type(out.dtype(), "linear");

  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(x);
  encoder.set_input_array(weight);
  encoder.set_output_array(out);
  encoder.dispatch([x = mx::array::unsafe_weak_copy(x), weight = mx::array::unsafe_weak_copy(weight),
                    out = mx::array::unsafe_weak_copy(out), dtype]() mutable {
    const int64_t K = x.shape(-1);
    if (has_no_work(out, K)) {
      return;
    }
    RowPairs pairs(x);
    cpu::GatherMMProblem problem;
    problem.rows_per_pair = pairs.rows_per_pair;
    problem.N = weight.shape(0);
    problem.K = K;
    problem.dtype = dtype;
    problem.a = x.data<void>();
    problem.a_row_stride = pairs.row_stride;
    problem.a_col_stride = pairs.col_stride;
    problem.a_offsets = pairs.offsets.data();
    // W^T [K, N] as a view of weight [N, K].
    problem.b = weight.data<void>();
    problem.b_k_stride = weight.strides()[1];
    problem.b_n_stride = weight.strides()[0];
    std::vector<int64_t> b_offsets(pairs.num_pairs(), 0); // every pair on the one matrix
    problem.b_offsets = b_offsets.data();
    problem.out = out.data<void>();
    problem.pair_order = pairs.order.data();
    problem.group_begin = pairs.group_begin;
    problem.num_groups = 1;
    cpu::run_column_blocks(problem, cpu::kColumnQuantum, cpu::cpu_kernels().gather_mm_task);
  });
}

void QuantizedLinear::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const bool has_biases = inputs.size() == 4;
  const mx::array& x = inputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const cpu::ElementType dtype = cpu::element_type(out.dtype(), "quantized_linear");
  cpu::QuantizedMatrices w =
      quantized_matrices(inputs[1], inputs[2], has_biases ? &inputs[3] : nullptr, group_size_, bits_, mode_);

  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  encoder.set_output_array(out);
  encoder.dispatch([x = mx::array::unsafe_weak_copy(x), out = mx::array::unsafe_weak_copy(out), w, dtype,
                    N = inputs[1].shape(0)]() mutable {
    const int64_t K = x.shape(-1);
    if (has_no_work(out, K)) {
      return;
    }
    RowPairs pairs(x);
    cpu::GatherQMMProblem problem;
    problem.rows_per_pair = pairs.rows_per_pair;
    problem.N = N;
    problem.K = K;
    problem.dtype = dtype;
    problem.x = x.data<void>();
    problem.x_row_stride = pairs.row_stride;
    problem.x_col_stride = pairs.col_stride;
    problem.x_offsets = pairs.offsets.data();
    problem.w = w;
    problem.transpose = true;
    problem.matrix_of_pair = pairs.matrix.data();
    problem.out = out.data<void>();
    problem.pair_order = pairs.order.data();
    problem.group_begin = pairs.group_begin;
    problem.num_groups = 1;
    cpu::run_column_blocks(problem, cpu::kColumnQuantum, cpu::cpu_kernels().gather_qmm_task);
  });
}

} // namespace mlx_moe
