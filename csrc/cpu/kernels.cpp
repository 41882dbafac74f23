#include "cpu/kernels.h"

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

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

#if defined(__x86_64__) || defined(_M_X64)
// One CPUID feature bit (register 0 eax, 1 ebx, 2 ecx, 3 edx), read directly
// for F16C and AVX512_BF16: clang before 16 rejects those names in
// __builtin_cpu_supports.
bool cpuid_bit(unsigned leaf, unsigned subleaf, int reg, int bit) {
  unsigned r[4] = {0, 0, 0, 0};
  if (!__get_cpuid_count(leaf, subleaf, &r[0], &r[1], &r[2], &r[3])) {
    return false;
  }
  return (r[reg] >> bit) & 1u;
}
#endif

} // namespace

const CpuKernels& cpu_kernels() {
  const char* cap = std::getenv("MLX_MOE_CPU_KERNELS");
  const int max_rank = (cap && rank_of(cap) >= 0) ? rank_of(cap) : 2;
#if defined(__x86_64__) || defined(_M_X64)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      cpuid_bit(1, 0, 2, 29);  // F16C
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      cpuid_bit(7, 1, 0, 5);  // AVX512_BF16
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
