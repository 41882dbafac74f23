// RmsNorm::eval_cpu: y = x / sqrt(mean(x^2) + eps) * weight over the last
// axis, in float32, rounded once. MLX's CPU rms_norm costs ~40-100 us per
// call at decode sizes (four calls per layer per token); this is one pass.
#include <algorithm>
#include <cmath>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/types/half_types.h"

#include "cpu/indices.h"
#include "cpu/thread_pool.h"
#include "primitives.h"

namespace mlx_moe {

namespace {

// Elements per pool task: below one task the call stays on one thread.
constexpr int64_t kElementsPerTask = 1 << 16;

struct RmsNormArguments {
  const void* x;
  mx::Shape shape;
  mx::Strides strides;
  const void* weight;
  int64_t weight_stride;
  void* out;
  float eps;
};

template <typename T>
void run_rms_norm(const RmsNormArguments& a) {
  const int ndim = static_cast<int>(a.shape.size());
  const int64_t D = a.shape[ndim - 1];
  int64_t rows = 1;
  for (int d = 0; d + 1 < ndim; ++d) {
    rows *= a.shape[d];
  }
  if (rows == 0 || D == 0) {
    return;
  }
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.weight);
  T* out = static_cast<T*>(a.out);
  const int64_t last_stride = a.strides[ndim - 1];
  auto normalize = [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t src = batch_offset(row, a.shape, a.strides, ndim - 1);
      float sum = 0.0f;
      for (int64_t j = 0; j < D; ++j) {
        const float v = static_cast<float>(x[src + j * last_stride]);
        sum += v * v;
      }
      const float scale = 1.0f / std::sqrt(sum / static_cast<float>(D) + a.eps);
      for (int64_t j = 0; j < D; ++j) {
        const float v = static_cast<float>(x[src + j * last_stride]) * scale;
        out[row * D + j] = static_cast<T>(w ? v * static_cast<float>(w[j * a.weight_stride]) : v);
      }
    }
  };
  const int64_t rows_per_task = std::max<int64_t>(1, kElementsPerTask / D);
  if (rows <= rows_per_task) {
    normalize(0, rows);
    return;
  }
  const int64_t tasks = (rows + rows_per_task - 1) / rows_per_task;
  cpu::ThreadPool::instance().parallel_for(tasks, [&](int64_t t, int) {
    normalize(t * rows_per_task, std::min(rows, (t + 1) * rows_per_task));
  });
}

} // namespace

void RmsNorm::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const mx::array& x = inputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  encoder.set_output_array(out);
  const bool has_weight = inputs.size() == 2;
  RmsNormArguments args{
      x.data<void>(),
      x.shape(),
      x.strides(),
      has_weight ? inputs[1].data<void>() : nullptr,
      has_weight ? static_cast<int64_t>(inputs[1].strides(0)) : 0,
      out.data<void>(),
      eps_};
  const auto dtype = out.dtype();
  encoder.dispatch([args = std::move(args), dtype]() {
    if (dtype == mx::float32) {
      run_rms_norm<float>(args);
    } else if (dtype == mx::float16) {
      run_rms_norm<mx::float16_t>(args);
    } else {
      run_rms_norm<mx::bfloat16_t>(args);
    }
  });
}

} // namespace mlx_moe
