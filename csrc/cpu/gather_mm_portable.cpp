// The gather matmul kernels built with the target's baseline flags: NEON on
// arm64, plain C++ elsewhere (and on x86-64 CPUs without AVX2).
#include "cpu/gather_mm_kernels.h"

namespace mlx_moe::cpu {

void gather_mm_task_portable(const GatherMMProblem& problem, const GatherMMTask& task) {
  run_task(problem, task);
}

} // namespace mlx_moe::cpu
