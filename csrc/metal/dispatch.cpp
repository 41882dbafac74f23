#include "metal/dispatch.h"

#include <dlfcn.h>

#include <filesystem>
#include <stdexcept>

namespace mlx_moe::metal {

namespace {

// The directory of the binary this code is linked into (the extension
// module), where CMake installs the metallib.
const std::string& module_directory() {
  static const std::string directory = [] {
    Dl_info info;
    if (dladdr(reinterpret_cast<const void*>(&module_directory), &info) == 0 || info.dli_fname == nullptr) {
      throw std::runtime_error("[mlx_moe_kernels] cannot locate the extension module to load its metallib");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return directory;
}

}  // namespace

MTL::ComputePipelineState* pipeline(mlx::core::metal::Device& device, const std::string& name) {
  // get_library caches by name; it loads <module dir>/mlx_moe_kernels.metallib once.
  MTL::Library* library = device.get_library(kLibraryName, module_directory());
  return device.get_kernel(name, library);
}

void use_pipeline(
    mlx::core::metal::CommandEncoder& encoder,
    MTL::ComputePipelineState* kernel,
    const std::string& name,
    const std::array<uint32_t, 3>& threads) {
  const uint64_t wanted = uint64_t{threads[0]} * threads[1] * threads[2];
  const uint64_t limit = kernel->maxTotalThreadsPerThreadgroup();
  if (wanted > limit) {
    throw std::runtime_error(
        "[mlx_moe_kernels] kernel " + name + " needs " + std::to_string(wanted) +
        " threads per threadgroup but this GPU allows " + std::to_string(limit) + " for it");
  }
  encoder.set_compute_pipeline_state(kernel);
}

void dispatch(
    mlx::core::metal::CommandEncoder& encoder,
    const std::array<uint32_t, 3>& grid,
    const std::array<uint32_t, 3>& threads) {
  encoder.dispatch_threadgroups(
      MTL::Size(grid[0], grid[1], grid[2]), MTL::Size(threads[0], threads[1], threads[2]));
}

}  // namespace mlx_moe::metal
