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

// use_pipeline with the pipeline of kernel `name` of our metallib.
void use_kernel(
    mlx::core::metal::Device& device,
    mlx::core::metal::CommandEncoder& encoder,
    const std::string& name,
    const std::array<uint32_t, 3>& threads);

// dispatchThreadgroups with a plan's grid (threadgroups) and threads.
void dispatch(
    mlx::core::metal::CommandEncoder& encoder,
    const std::array<uint32_t, 3>& grid,
    const std::array<uint32_t, 3>& threads);

// Encodes the routing kernel (route.metal) over `indices` (uint32,
// row-contiguous): order, sorted_experts [indices.size()], offsets
// [num_experts + 1] and status [1] must be allocated. Shared by
// MoeRoute::eval_gpu and GatherMM::eval_gpu.
void encode_route(
    mlx::core::metal::Device& device,
    mlx::core::metal::CommandEncoder& encoder,
    const mlx::core::array& indices,
    int num_experts,
    mlx::core::array& order,
    mlx::core::array& offsets,
    mlx::core::array& sorted_experts,
    mlx::core::array& status);

// A freshly allocated array of `shape` and `dtype`, kept alive by the
// encoder until its command buffer completes (scratch for one launch).
mlx::core::array temporary(
    mlx::core::metal::CommandEncoder& encoder, mlx::core::Shape shape, mlx::core::Dtype dtype);

// `a` itself if row-contiguous, else a contiguous copy encoded on `s`.
mlx::core::array row_contiguous(
    const mlx::core::array& a, mlx::core::metal::CommandEncoder& encoder, const mlx::core::Stream& s);

// `a` itself if row-contiguous and 16-byte aligned in its buffer, else a
// contiguous copy (freshly allocated, so aligned): the kernels read weight
// rows with 16-byte vector loads, valid only from aligned addresses.
mlx::core::array aligned_rows(
    const mlx::core::array& a, mlx::core::metal::CommandEncoder& encoder, const mlx::core::Stream& s);

// True when a plan's grid has no threadgroup (nothing to launch).
inline bool empty_grid(const std::array<uint32_t, 3>& grid) {
  return grid[0] == 0 || grid[1] == 0 || grid[2] == 0;
}

}  // namespace mlx_moe::metal
