// Shared pieces of the Metal dispatch (the eval_gpu of each primitive in
// this directory): our compiled kernel library and one launch helper. Built
// only when MLX has Metal (macOS); on Linux these files are checked
// syntax-only against the macOS headers (tests/test_metal_dispatch_syntax.py).
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include <mlx/backend/metal/device.h>

namespace mlx_moe::metal {

// The name of our metallib, built by CMake's mlx_build_metallib from the
// .metal files of this directory and installed beside the extension module.
inline constexpr const char* kLibraryName = "mlx_moe_kernels";

// The compute pipeline of kernel `name` (a host_name of our metallib).
MTL::ComputePipelineState* pipeline(mlx::core::metal::Device& device, const std::string& name);

// Selects `kernel` on the encoder, checking that the threadgroup size the
// plan chose fits the pipeline (Apple GPUs lower the limit for kernels that
// use many registers): a clear error instead of a failed launch.
void use_pipeline(
    mlx::core::metal::CommandEncoder& encoder,
    MTL::ComputePipelineState* kernel,
    const std::string& name,
    const std::array<uint32_t, 3>& threads);

// dispatchThreadgroups with a plan's grid (threadgroups) and threads.
void dispatch(
    mlx::core::metal::CommandEncoder& encoder,
    const std::array<uint32_t, 3>& grid,
    const std::array<uint32_t, 3>& threads);

// True when a plan's grid has no threadgroup (nothing to launch).
inline bool empty_grid(const std::array<uint32_t, 3>& grid) {
  return grid[0] == 0 || grid[1] == 0 || grid[2] == 0;
}

}  // namespace mlx_moe::metal
