// Rope::eval_cpu: rotary position embedding over the last axis of x,
// positions along the second-to-last axis. A table of cos/sin per
// (position, frequency) is built once per call (L x dims / 2 values), then
// every row is rotated; rows are split over the thread pool when there are
// many (a prompt).
#include <algorithm>
#include <cmath>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

#include "cpu/indices.h"
#include "cpu/thread_pool.h"
#include "mlx/types/half_types.h"
#include "primitives.h"

namespace mlx_moe {

namespace {

// Rows per pool task: below this a call runs on one thread (decode rotates
// a few thousand values, less than waking a worker costs).
constexpr int64_t kRowsPerTask = 256;

template <typename T>
inline float load_value(const void* base, int64_t offset) {
  return static_cast<float>(static_cast<const T*>(base)[offset]);
}

template <typename T>
inline void store_value(void* base, int64_t offset, float value) {
  static_cast<T*>(base)[offset] = static_cast<T>(value);
}

struct RopeArguments {
  const void* x;
  mx::Shape shape;
  mx::Strides strides;
  void* out;
  int dims;
  bool traditional;
  bool inverse;
  float base;
  float scale;
  int offset;
};

template <typename T>
void run_rope(const RopeArguments& a) {
  const int ndim = static_cast<int>(a.shape.size());
  const int64_t D = a.shape[ndim - 1];
  const int64_t L = a.shape[ndim - 2];
  int64_t rows = 1;
  for (int d = 0; d + 1 < ndim; ++d) {
    rows *= a.shape[d];
  }
  if (rows == 0 || D == 0) {
    return;
  }
  const int half = a.dims / 2;
  // The angles as MLX's rope computes them, in float32:
  // theta = (position * scale) * base^(-i / half).
  std::vector<float> cosines(L * half), sines(L * half);
  const float log_base = std::log(a.base);
  for (int i = 0; i < half; ++i) {
    const float inverse_frequency = std::exp(-static_cast<float>(i) * log_base / static_cast<float>(half));
    for (int64_t l = 0; l < L; ++l) {
      const float theta = (static_cast<float>(a.offset + l) * a.scale) * inverse_frequency;
      cosines[l * half + i] = std::cos(theta);
      sines[l * half + i] = a.inverse ? -std::sin(theta) : std::sin(theta);
    }
  }
  const int64_t last_stride = a.strides[ndim - 1];
  auto rotate_rows = [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      // The row's element offset over the leading axes (any strides); its
      // position is its index along the second-to-last axis.
      const int64_t src = batch_offset(row, a.shape, a.strides, ndim - 1);
      const int64_t position = row % L;
      const float* c = cosines.data() + position * half;
      const float* s = sines.data() + position * half;
      const int64_t dst = row * D;
      for (int i = 0; i < half; ++i) {
        const int64_t i1 = a.traditional ? 2 * i : i;
        const int64_t i2 = a.traditional ? 2 * i + 1 : i + half;
        const float x1 = load_value<T>(a.x, src + i1 * last_stride);
        const float x2 = load_value<T>(a.x, src + i2 * last_stride);
        store_value<T>(a.out, dst + i1, x1 * c[i] - x2 * s[i]);
        store_value<T>(a.out, dst + i2, x1 * s[i] + x2 * c[i]);
      }
      for (int64_t j = 2 * half; j < D; ++j) {
        store_value<T>(a.out, dst + j, load_value<T>(a.x, src + j * last_stride));
      }
    }
  };
  if (rows <= kRowsPerTask) {
    rotate_rows(0, rows);
    return;
  }
  const int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  cpu::ThreadPool::instance().parallel_for(tasks, [&](int64_t t, int) {
    rotate_rows(t * kRowsPerTask, std::min(rows, (t + 1) * kRowsPerTask));
  });
}

} // namespace

void Rope::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const mx::array& x = inputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(x);
  encoder.set_output_array(out);
  RopeArguments args{
      x.data<void>(), x.shape(), x.strides(), out.data<void>(), dims_, traditional_, inverse_, base_, scale_, offset_};
  const auto dtype = out.dtype();
  encoder.dispatch([args = std::move(args), dtype]() {
    if (dtype == mx::float32) {
      run_rope<float>(args);
    } else if (dtype == mx::float16) {
      run_rope<mx::float16_t>(args);
    } else {
      run_rope<mx::bfloat16_t>(args);
    }
  });
}

} // namespace mlx_moe
