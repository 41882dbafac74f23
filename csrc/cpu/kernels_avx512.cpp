// The CPU kernels built for x86-64 CPUs with AVX-512 BF16 (this file alone
// gets -mavx512f -mavx512bw -mavx512vl -mavx512bf16 on top of the AVX2
// flags); used only when the CPU has them. The same kernels as the AVX2
// build, except that bfloat16 x bfloat16 dot products run on VDPBF16PS
// (dot_bf16_avx512.h).
#define MLX_MOE_DOT_BF16 1
#include "cpu/attention_kernels.h"
#include "cpu/gather_mm_kernels.h"
#include "cpu/gather_qmm_kernels.h"
#include "cpu/kernels.h"
#include "cpu/switch_glu_kernels.h"

namespace mlx_moe::cpu {

const CpuKernels& kernels_avx512() {
  static const CpuKernels table{"avx512", &run_task, &gate_up_task, &down_task, &gather_qmm_task, &attention_task};
  return table;
}

} // namespace mlx_moe::cpu
