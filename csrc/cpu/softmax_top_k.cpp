// SoftmaxTopK::eval_cpu: a softmax router's top-k experts and their
// probabilities, one pass per row. At one token the stock composition is
// six small graph nodes (softmax, argpartition, slice, take_along_axis,
// sum, divide) of a few microseconds each for 128 numbers.
#include <algorithm>
#include <cmath>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/types/half_types.h"

#include "cpu/indices.h"
#include "cpu/thread_pool.h"
#include "primitives.h"

namespace mlx_moe {

namespace {

// Rows per pool task; fewer rows stay on the calling thread.
constexpr int64_t kRowsPerTask = 64;

struct SoftmaxTopKArguments {
  const void* logits; // [..., E], any strides
  mx::Shape shape;
  mx::Strides strides;
  int64_t rows;
  int64_t experts;
  int k;
  bool normalize;
  uint32_t* indices; // [rows, k]
  void* scores; // [rows, k]
};

// Rounds to T and back, as a value of dtype T takes part in the next op.
template <typename T>
inline float rounded(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <typename T>
void run_softmax_top_k(const SoftmaxTopKArguments& a) {
  const T* logits = static_cast<const T*>(a.logits);
  T* scores = static_cast<T*>(a.scores);
  const int64_t E = a.experts;
  const int k = a.k;
  const int ndim = static_cast<int>(a.shape.size());
  const int64_t step = a.strides[ndim - 1];
  auto route_rows = [&](int64_t begin, int64_t end) {
    // best[0..k): chosen experts, most probable first.
    std::vector<uint32_t> best(k);
    std::vector<float> best_logit(k);
    for (int64_t row = begin; row < end; ++row) {
      const T* l = logits + batch_offset(row, a.shape, a.strides, ndim - 1);
      float max_logit = -INFINITY;
      for (int64_t e = 0; e < E; ++e) {
        max_logit = std::max(max_logit, static_cast<float>(l[e * step]));
      }
      float total = 0.0f;
      for (int64_t e = 0; e < E; ++e) {
        total += std::exp(static_cast<float>(l[e * step]) - max_logit);
      }
      // Insertion into the sorted top k, by logit (softmax keeps the order);
      // a strict comparison keeps the lower expert first among equals.
      int filled = 0;
      for (int64_t e = 0; e < E; ++e) {
        const float v = static_cast<float>(l[e * step]);
        if (filled == k && !(v > best_logit[k - 1])) {
          continue;
        }
        int at = filled < k ? filled++ : k - 1;
        while (at > 0 && v > best_logit[at - 1]) {
          best_logit[at] = best_logit[at - 1];
          best[at] = best[at - 1];
          --at;
        }
        best_logit[at] = v;
        best[at] = static_cast<uint32_t>(e);
      }
      // Probabilities rounded to T (softmax's output dtype), then, like
      // scores / scores.sum(), a float32 sum rounded to T and a quotient
      // rounded to T.
      float sum = 0.0f;
      for (int j = 0; j < k; ++j) {
        best_logit[j] = rounded<T>(std::exp(best_logit[j] - max_logit) / total);
        sum += best_logit[j];
      }
      sum = rounded<T>(sum);
      for (int j = 0; j < k; ++j) {
        a.indices[row * k + j] = best[j];
        scores[row * k + j] = static_cast<T>(a.normalize ? best_logit[j] / sum : best_logit[j]);
      }
    }
  };
  if (a.rows <= kRowsPerTask) {
    route_rows(0, a.rows);
    return;
  }
  const int64_t tasks = (a.rows + kRowsPerTask - 1) / kRowsPerTask;
  cpu::ThreadPool::instance().parallel_for(tasks, [&](int64_t t, int) {
    route_rows(t * kRowsPerTask, std::min(a.rows, (t + 1) * kRowsPerTask));
  });
}

} // namespace

void SoftmaxTopK::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const mx::array& logits = inputs[0];
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  encoder.set_input_array(logits);
  encoder.set_output_array(outputs[0]);
  encoder.set_output_array(outputs[1]);
  const int64_t experts = logits.shape(-1);
  SoftmaxTopKArguments args{
      logits.data<void>(),
      logits.shape(),
      logits.strides(),
      experts == 0 ? 0 : static_cast<int64_t>(logits.size()) / experts,
      experts,
      k_,
      normalize_,
      outputs[0].data<uint32_t>(),
      outputs[1].data<void>()};
  const auto dtype = logits.dtype();
  encoder.dispatch([args, dtype]() {
    if (dtype == mx::float32) {
      run_softmax_top_k<float>(args);
    } else if (dtype == mx::float16) {
      run_softmax_top_k<mx::float16_t>(args);
    } else {
      run_softmax_top_k<mx::bfloat16_t>(args);
    }
  });
}

} // namespace mlx_moe
