// Standalone check of the portable CPU kernel build (kernels_portable.cpp)
// against a double-precision loop, with no MLX library: compiled for another
// architecture (arm64: the NEON branch of simd.h) and run under an emulator
// by tests/test_portable_native.py. Prints "N passed, M failed" and exits
// non-zero on a failure.
#include <algorithm>
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

// gather_qmm (transpose: w[e] [N, K] packed along K): random codes packed
// as MLX's little-endian bit stream, per-group scales (and biases for
// affine), against a double loop over the dequantized values. `mxfp4`:
// e2m1 codes with E8M0 scales. Rows per matrix decide the kernel: up to 6
// the generic direct kernel, more the dequantize-to-buffer path.
template <typename T>
void check_gather_qmm(int bits, int group, bool mxfp4, int K, int N, int E, int pairs,
                      ElementType type, double tol, const char* name) {
  std::mt19937 rng(bits * 977 + group + K + N + pairs);
  std::normal_distribution<float> normal;
  const int groups = K / group;
  const int64_t row_bytes = int64_t(K) * bits / 8;
  std::vector<uint8_t> packed(E * N * row_bytes + 8, 0);
  std::vector<int> codes(E * N * K);
  for (int64_t i = 0; i < int64_t(codes.size()); ++i) {
    codes[i] = int(rng() % (1u << bits));
    const int64_t row = i / K, k = i % K;
    const int64_t bit = row * row_bytes * 8 + k * bits;
    for (int b = 0; b < bits; ++b) {
      if ((codes[i] >> b) & 1) packed[(bit + b) / 8] |= uint8_t(1u << ((bit + b) % 8));
    }
  }
  std::vector<T> scales(E * N * groups), biases(E * N * groups);
  std::vector<uint8_t> exponents(E * N * groups);
  for (size_t i = 0; i < scales.size(); ++i) {
    scales[i] = Store<T>::from(0.05f + 0.01f * normal(rng));
    biases[i] = Store<T>::from(0.1f * normal(rng));
    exponents[i] = uint8_t(120 + rng() % 10);
  }
  static const double e2m1[16] = {0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6};
  auto weight = [&](int64_t row, int k) {
    const int64_t g = row * groups + k / group;
    const int q = codes[row * K + k];
    if (mxfp4) return e2m1[q] * std::ldexp(1.0, int(exponents[g]) - 127);
    return double(Store<T>::to(scales[g])) * q + double(Store<T>::to(biases[g]));
  };
  std::vector<T> x(pairs * K), out(pairs * N);
  for (auto& v : x) v = Store<T>::from(normal(rng));
  std::vector<uint32_t> rhs(pairs);
  for (auto& r : rhs) r = rng() % E;
  std::vector<int64_t> x_off(pairs);
  for (int p = 0; p < pairs; ++p) x_off[p] = int64_t(p) * K;
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
  GatherQMMProblem problem;
  problem.rows_per_pair = 1;
  problem.N = N;
  problem.K = K;
  problem.dtype = type;
  problem.x = x.data();
  problem.x_row_stride = K;
  problem.x_col_stride = 1;
  problem.x_offsets = x_off.data();
  problem.w.mode = mxfp4 ? QuantizationMode::mxfp4 : QuantizationMode::affine;
  problem.w.bits = bits;
  problem.w.group_size = group;
  problem.w.packed = packed.data();
  problem.w.row_bytes = row_bytes;
  problem.w.matrix_bytes = row_bytes * N;
  problem.w.scales = mxfp4 ? static_cast<const void*>(exponents.data()) : scales.data();
  problem.w.biases = mxfp4 ? nullptr : biases.data();
  problem.w.scale_row_stride = groups;
  problem.w.scale_matrix_stride = int64_t(groups) * N;
  problem.transpose = true;
  problem.matrix_of_pair = rhs.data();
  problem.out = out.data();
  problem.pair_order = order.data();
  problem.group_begin = begin.data();
  problem.num_groups = int64_t(begin.size()) - 1;
  for (int64_t g = 0; g < problem.num_groups; ++g) {
    for (int n = 0; n < N; n += 48) {
      kernels_portable().gather_qmm_task(problem, {g, n, std::min(N, n + 48)});
    }
  }
  double worst = 0;
  for (int p = 0; p < pairs; ++p) {
    for (int n = 0; n < N; ++n) {
      double s = 0, scale = 0;
      for (int k = 0; k < K; ++k) {
        const double term = double(Store<T>::to(x[x_off[p] + k])) * weight(int64_t(rhs[p]) * N + n, k);
        s += term;
        scale += std::fabs(term);
      }
      const double got = Store<T>::to(out[int64_t(p) * N + n]);
      worst = std::max(worst, std::fabs(got - s) / (scale + 1e-30));
    }
  }
  report(name, worst, tol);
}

// Attention: q [1, Hq, L, d], k and v [1, Hkv, S, d] contiguous, causal or
// not, every task of the kernel run in turn; error relative to the values'
// largest magnitude (the output is a convex combination of value rows).
template <typename T>
void check_attention(int Hq, int Hkv, int L, int S, int d, bool causal, ElementType type, double tol,
                     const char* name) {
  std::mt19937 rng(Hq * 17 + L * 5 + S + d);
  std::normal_distribution<float> normal;
  std::vector<T> q(size_t(Hq) * L * d), k(size_t(Hkv) * S * d), v(size_t(Hkv) * S * d), out(size_t(Hq) * L * d);
  for (auto* a : {&q, &k, &v}) {
    for (auto& e : *a) {
      e = Store<T>::from(normal(rng));
    }
  }
  AttentionProblem p;
  p.dtype = type;
  p.batch = 1;
  p.q_heads = Hq;
  p.kv_heads = Hkv;
  p.q_len = L;
  p.kv_len = S;
  p.head_dim = d;
  p.value_dim = d;
  p.scale = 1.0f / std::sqrt(float(d));
  p.causal = causal;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  const int64_t qs[3] = {int64_t(Hq) * L * d, int64_t(L) * d, d};
  const int64_t ks[3] = {int64_t(Hkv) * S * d, int64_t(S) * d, d};
  std::copy(qs, qs + 3, p.q_strides);
  std::copy(ks, ks + 3, p.k_strides);
  std::copy(ks, ks + 3, p.v_strides);
  for (int h = 0; h < Hkv; ++h) {
    for (int i = 0; i < L; i += 3) {
      kernels_portable().attention_task(p, {0, h, i, std::min(L, i + 3)});
    }
  }
  double worst = 0, magnitude = 0;
  const int G = Hq / Hkv;
  for (const auto& e : v) {
    magnitude = std::max(magnitude, std::fabs(double(Store<T>::to(e))));
  }
  for (int h = 0; h < Hq; ++h) {
    const int kv = h / G;
    for (int i = 0; i < L; ++i) {
      const int keys = causal ? S - L + i + 1 : S;
      std::vector<double> w(keys);
      double top = -1e300, sum = 0;
      for (int j = 0; j < keys; ++j) {
        double s = 0;
        for (int c = 0; c < d; ++c) {
          s += double(Store<T>::to(q[(size_t(h) * L + i) * d + c])) * Store<T>::to(k[(size_t(kv) * S + j) * d + c]);
        }
        w[j] = s * p.scale;
        top = std::max(top, w[j]);
      }
      for (auto& x : w) {
        x = std::exp(x - top);
        sum += x;
      }
      for (int c = 0; c < d; ++c) {
        double o = 0;
        for (int j = 0; j < keys; ++j) {
          o += w[j] / sum * Store<T>::to(v[(size_t(kv) * S + j) * d + c]);
        }
        worst = std::max(worst, std::fabs(double(Store<T>::to(out[(size_t(h) * L + i) * d + c])) - o));
      }
    }
  }
  report(name, worst / magnitude, tol);
}

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
  // Few rows per matrix (direct kernel) and many (dequantized blocks).
  check_gather_qmm<float>(4, 32, false, 96, 53, 3, 5, ElementType::float32, 1e-5, "gather_qmm f32 4-bit direct");
  check_gather_qmm<float>(3, 64, false, 128, 21, 2, 19, ElementType::float32, 1e-5, "gather_qmm f32 3-bit blocks");
  check_gather_qmm<BF16>(8, 128, false, 256, 19, 3, 4, ElementType::bfloat16, 1e-2, "gather_qmm bf16 8-bit direct");
  check_gather_qmm<F16>(4, 32, true, 64, 33, 4, 6, ElementType::float16, 2e-3, "gather_qmm f16 mxfp4 direct");
  check_gather_qmm<BF16>(2, 32, false, 64, 40, 2, 17, ElementType::bfloat16, 1e-2, "gather_qmm bf16 2-bit blocks");
  // Attention: decode over several key blocks, causal prefill, head sizes
  // off the SIMD widths.
  check_attention<float>(4, 2, 1, 300, 40, false, ElementType::float32, 1e-5, "attention f32 decode");
  check_attention<F16>(2, 2, 7, 140, 16, true, ElementType::float16, 2e-3, "attention f16 causal");
  check_attention<BF16>(6, 3, 5, 9, 36, true, ElementType::bfloat16, 1e-2, "attention bf16 causal");
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
