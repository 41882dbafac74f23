// The gather matmul kernels built for x86-64 with AVX2, FMA and F16C (this
// file alone gets -mavx2 -mfma -mf16c); called only when the CPU has them.
#include "cpu/gather_mm_kernels.h"

#if !defined(MLX_MOE_SIMD_AVX2)
#error "gather_mm_avx2.cpp must be compiled with -mavx2 -mfma -mf16c"
#endif

namespace mlx_moe::cpu {

void gather_mm_task_avx2(const GatherMMProblem& problem, const GatherMMTask& task) {
  run_task(problem, task);
}

} // namespace mlx_moe::cpu
