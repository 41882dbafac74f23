// The CPU kernels built with the target's baseline flags: NEON on arm64,
// plain C++ elsewhere (and on x86-64 CPUs without AVX2).
#include "cpu/attention_kernels.h"
#include "cpu/gather_mm_kernels.h"
#include "cpu/gather_qmm_kernels.h"
#include "cpu/kernels.h"
#include "cpu/switch_glu_kernels.h"

namespace mlx_moe::cpu {

const CpuKernels& kernels_portable() {
  static const CpuKernels table{"portable", &run_task, &gate_up_task, &down_task, &gather_qmm_task, &attention_task};
  return table;
}

} // namespace mlx_moe::cpu
