#include "cpu/kernels.h"

#include <cstdlib>
#include <cstring>

namespace mlx_moe::cpu {

namespace {

// Capability rank of a build name; -1 when unknown.
int rank_of(const char* name) {
  const char* order[] = {"portable", "avx2", "avx512"};
  for (int i = 0; i < 3; ++i) {
    if (std::strcmp(name, order[i]) == 0) {
      return i;
    }
  }
  return -1;
}

} // namespace

const CpuKernels& cpu_kernels() {
  const char* cap = std::getenv("MLX_MOE_CPU_KERNELS");
  const int max_rank = (cap && rank_of(cap) >= 0) ? rank_of(cap) : 2;
#if defined(__x86_64__) || defined(_M_X64)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bf16");
  if (avx512 && max_rank >= 2) {
    return kernels_avx512();
  }
  if (avx2 && max_rank >= 1) {
    return kernels_avx2();
  }
#endif
  (void)max_rank;
  return kernels_portable();
}

} // namespace mlx_moe::cpu
