// The table of CPU kernels, one table per instruction-set build:
// kernels_portable.cpp (baseline flags: NEON on arm64, plain C++ elsewhere),
// kernels_avx2.cpp (-mavx2 -mfma -mf16c) and kernels_avx512.cpp (plus
// AVX-512 BF16). Each build compiles the same kernel templates; the eval_cpu
// functions call through cpu_kernels(), which picks the best build the CPU
// supports at run time.
#pragma once

#include "cpu/attention_problem.h"
#include "cpu/gather_mm_problem.h"
#include "cpu/gather_qmm_problem.h"
#include "cpu/switch_glu_problem.h"

namespace mlx_moe::cpu {

struct CpuKernels {
  const char* name;
  void (*gather_mm_task)(const GatherMMProblem&, const GatherMMTask&);
  void (*gate_up_task)(const SwitchGluProblem&, const GateUpTask&);
  void (*down_task)(const SwitchGluProblem&, const DownTask&);
  void (*gather_qmm_task)(const GatherQMMProblem&, const GatherMMTask&);
  void (*attention_task)(const AttentionProblem&, const AttentionTask&);
};

const CpuKernels& kernels_portable();
#if defined(__x86_64__) || defined(_M_X64)
const CpuKernels& kernels_avx2();
const CpuKernels& kernels_avx512();
#endif

// The best build this CPU supports. MLX_MOE_CPU_KERNELS=portable|avx2|avx512
// caps the choice (the tests run every build the machine has); read at each
// call, so a test can change it.
const CpuKernels& cpu_kernels();

} // namespace mlx_moe::cpu
