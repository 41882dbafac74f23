// The CPU kernels built for x86-64 with AVX2, FMA and F16C (this file alone
// gets -mavx2 -mfma -mf16c); used only when the CPU has them.
#include "cpu/attention_kernels.h"
#include "cpu/gather_mm_kernels.h"
#include "cpu/gather_qmm_kernels.h"
#include "cpu/kernels.h"
#include "cpu/switch_glu_kernels.h"

#if !defined(MLX_MOE_SIMD_AVX2)
#error "kernels_avx2.cpp must be compiled with -mavx2 -mfma -mf16c"
#endif

namespace mlx_moe::cpu {

const CpuKernels& kernels_avx2() {
  static const CpuKernels table{"avx2", &run_task, &gate_up_task, &down_task, &gather_qmm_task, &attention_task};
  return table;
}

} // namespace mlx_moe::cpu
