// The gather matmul kernels built for x86-64 CPUs with AVX-512 BF16 (this
// file alone gets -mavx512f -mavx512bw -mavx512vl -mavx512bf16 on top of the
// AVX2 flags); called only when the CPU has them. The same kernels as the
// AVX2 build, plus the VDPBF16PS dot kernel for bfloat16 x bfloat16.
#define MLX_MOE_DOT_BF16 1
#include "cpu/dot_bf16_avx512.h"
#include "cpu/gather_mm_kernels.h"

namespace mlx_moe::cpu {

void gather_mm_task_avx512(const GatherMMProblem& problem, const GatherMMTask& task) {
  run_task(problem, task);
}

} // namespace mlx_moe::cpu
