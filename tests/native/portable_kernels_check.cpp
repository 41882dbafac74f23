// Standalone check of the portable CPU kernel build (kernels_portable.cpp)
// against a double-precision loop, with no MLX library: compiled for another
// architecture (arm64: the NEON branch of simd.h) and run under an emulator
// by tests/test_portable_native.py. Prints "N passed, M failed" and exits
// non-zero on a failure.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/kernels.h"
#include "mlx/types/half_types.h"

using namespace mlx_moe::cpu;

namespace {

// 16-bit storage, as the kernels read it (raw float16 / bfloat16 bits).
struct F16 {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};

int passed = 0, failed = 0;

template <typename T>
struct Store;
template <>
struct Store<float> {
  static float from(float x) { return x; }
  static float to(float x) { return x; }
};
template <>
struct Store<F16> {
  static F16 from(float x) {
    mlx::core::float16_t h(x);
    F16 b;
    std::memcpy(&b.bits, &h, 2);
    return b;
  }
  static float to(F16 b) {
    mlx::core::float16_t h;
    std::memcpy(&h, &b.bits, 2);
    return static_cast<float>(h);
  }
};
template <>
struct Store<BF16> {
  static BF16 from(float x) {
    mlx::core::bfloat16_t h(x);
    BF16 b;
    std::memcpy(&b.bits, &h, 2);
    return b;
  }
  static float to(BF16 b) {
    mlx::core::bfloat16_t h;
    std::memcpy(&h, &b.bits, 2);
    return static_cast<float>(h);
  }
};

void report(const char* what, double err, double tol) {
  if (err <= tol) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAIL %s: error %g > %g\n", what, err, tol);
  }
}

// gather_mm: pairs p use a[p] [M, K] and b[rhs[p]] [K, N] (transposed: K
// contiguous, or N contiguous), grouped by rhs.
template <typename T>
void check_gather_mm(int M, int K, int N, int E, int pairs, bool k_contiguous, ElementType type,
                     double tol, const char* name) {
  std::mt19937 rng(M * 131 + K * 7 + N + pairs);
  std::normal_distribution<float> normal;
  std::vector<T> a(pairs * M * K), b(E * K * N), out(pairs * M * N);
  for (auto& v : a) v = Store<T>::from(normal(rng));
  for (auto& v : b) v = Store<T>::from(normal(rng));
  std::vector<uint32_t> rhs(pairs);
  for (auto& r : rhs) r = rng() % E;
  std::vector<int64_t> a_off(pairs), b_off(pairs);
  for (int p = 0; p < pairs; ++p) {
    a_off[p] = int64_t(p) * M * K;
    b_off[p] = int64_t(rhs[p]) * K * N;
  }
  // Counting sort by matrix.
  std::vector<uint32_t> order;
  std::vector<int64_t> begin;
  for (int e = 0; e < E; ++e) {
    bool any = false;
    for (int p = 0; p < pairs; ++p) {
      if (int(rhs[p]) == e) {
        if (!any) begin.push_back(order.size());
        any = true;
        order.push_back(p);
      }
    }
  }
  begin.push_back(order.size());
  GatherMMProblem problem;
  problem.rows_per_pair = M;
  problem.N = N;
  problem.K = K;
  problem.dtype = type;
  problem.a = a.data();
  problem.a_row_stride = K;
  problem.a_col_stride = 1;
  problem.a_offsets = a_off.data();
  problem.b = b.data();
  problem.b_k_stride = k_contiguous ? 1 : N;
  problem.b_n_stride = k_contiguous ? K : 1;
  problem.b_offsets = b_off.data();
  problem.out = out.data();
  problem.pair_order = order.data();
  problem.group_begin = begin.data();
  problem.num_groups = int64_t(begin.size()) - 1;
  for (int64_t g = 0; g < problem.num_groups; ++g) {
    for (int n = 0; n < N; n += 48) {
      kernels_portable().gather_mm_task(problem, {g, n, std::min(N, n + 48)});
    }
  }
  double worst = 0;
  for (int p = 0; p < pairs; ++p) {
    for (int m = 0; m < M; ++m) {
      for (int n = 0; n < N; ++n) {
        double s = 0, scale = 0;
        for (int k = 0; k < K; ++k) {
          double bv = Store<T>::to(b[b_off[p] + (k_contiguous ? int64_t(n) * K + k : int64_t(k) * N + n)]);
          double av = Store<T>::to(a[a_off[p] + m * K + k]);
          s += av * bv;
          scale += std::fabs(av * bv);
        }
        double got = Store<T>::to(out[(int64_t(p) * M + m) * N + n]);
        worst = std::max(worst, std::fabs(got - s) / (scale + 1e-30));
      }
    }
  }
  report(name, worst, tol);
}

// switch_glu: gate_up then down with scores, against a double loop.
template <typename T>
void check_switch_glu(int tokens, int top_k, int D, int H, int E, ElementType type, double tol,
                      const char* name) {
  std::mt19937 rng(tokens * 17 + D + H + E);
  std::normal_distribution<float> normal;
  std::vector<T> x(tokens * D), gate(E * H * D), up(E * H * D), down(E * D * H);
  for (auto& v : x) v = Store<T>::from(normal(rng));
  for (auto& v : gate) v = Store<T>::from(normal(rng) / std::sqrt(float(D)));
  for (auto& v : up) v = Store<T>::from(normal(rng) / std::sqrt(float(D)));
  for (auto& v : down) v = Store<T>::from(normal(rng) / std::sqrt(float(H)));
  std::vector<uint32_t> experts(tokens * top_k);
  for (auto& e : experts) e = rng() % E;
  std::vector<float> scores(tokens * top_k);
  for (auto& s : scores) s = std::uniform_real_distribution<float>(0, 1)(rng);
  std::vector<uint32_t> offsets(E + 1, 0), order(tokens * top_k);
  for (auto e : experts) ++offsets[e + 1];
  for (int e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  std::vector<uint32_t> next(offsets.begin(), offsets.end() - 1);
  for (int s = 0; s < tokens * top_k; ++s) order[next[experts[s]]++] = s;
  std::vector<T> hidden(tokens * top_k * H), out(tokens * D);
  SwitchGluProblem p;
  p.dtype = type;
  p.tokens = tokens;
  p.top_k = top_k;
  p.model_dims = D;
  p.hidden_dims = H;
  p.num_experts = E;
  p.x = x.data();
  p.x_row_stride = D;
  p.gate = gate.data();
  p.up = up.data();
  p.gate_up_expert_stride = int64_t(H) * D;
  p.gate_up_row_stride = D;
  p.down = down.data();
  p.down_expert_stride = int64_t(D) * H;
  p.down_row_stride = H;
  p.order = order.data();
  p.offsets = offsets.data();
  p.hidden = hidden.data();
  p.scores = scores.data();
  p.out = out.data();
  for (int e = 0; e < E; ++e) {
    for (int h = 0; h < H; h += 48) {
      kernels_portable().gate_up_task(p, {e, h, std::min(H, h + 48)});
    }
  }
  for (int d = 0; d < D; d += 48) {
    kernels_portable().down_task(p, {0, E, d, std::min(D, d + 48)});
  }
  double worst = 0, magnitude = 0;
  for (int t = 0; t < tokens; ++t) {
    for (int d = 0; d < D; ++d) {
      double total = 0;
      for (int j = 0; j < top_k; ++j) {
        int e = experts[t * top_k + j];
        double y = 0;
        for (int h = 0; h < H; ++h) {
          double g = 0, u = 0;
          for (int k = 0; k < D; ++k) {
            double xv = Store<T>::to(x[t * D + k]);
            g += xv * Store<T>::to(gate[(int64_t(e) * H + h) * D + k]);
            u += xv * Store<T>::to(up[(int64_t(e) * H + h) * D + k]);
          }
          double hv = g / (1 + std::exp(-g)) * u;
          hv = Store<T>::to(Store<T>::from(float(hv))); // hidden is stored in T
          y += hv * Store<T>::to(down[(int64_t(e) * D + d) * H + h]);
        }
        total += scores[t * top_k + j] * y;
      }
      worst = std::max(worst, std::fabs(Store<T>::to(out[t * D + d]) - total));
      magnitude = std::max(magnitude, std::fabs(total));
    }
  }
  report(name, worst / (magnitude + 1e-30), tol);
}

} // namespace

int main() {
  // Shapes off every tile multiple (K tails, ragged columns and rows).
  for (bool kc : {true, false}) {
    check_gather_mm<float>(1, 37, 29, 5, 11, kc, ElementType::float32, 1e-5, "gather_mm f32");
    check_gather_mm<float>(3, 300, 97, 4, 9, kc, ElementType::float32, 1e-5, "gather_mm f32 many rows");
    check_gather_mm<F16>(2, 130, 50, 3, 7, kc, ElementType::float16, 2e-3, "gather_mm f16");
    check_gather_mm<BF16>(1, 257, 17, 6, 13, kc, ElementType::bfloat16, 1e-2, "gather_mm bf16");
  }
  check_switch_glu<float>(5, 2, 40, 24, 4, ElementType::float32, 1e-5, "switch_glu f32");
  check_switch_glu<F16>(3, 3, 37, 29, 5, ElementType::float16, 3e-3, "switch_glu f16");
  check_switch_glu<BF16>(4, 2, 64, 48, 6, ElementType::bfloat16, 2e-2, "switch_glu bf16");
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
