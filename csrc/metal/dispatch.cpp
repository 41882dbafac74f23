#include "metal/dispatch.h"

#include <dlfcn.h>

#include <filesystem>
#include <stdexcept>

#include <mlx/allocator.h>
#include <mlx/backend/gpu/copy.h>

#include "metal/route_plan.h"

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

void use_kernel(
    mlx::core::metal::Device& device,
    mlx::core::metal::CommandEncoder& encoder,
    const std::string& name,
    const std::array<uint32_t, 3>& threads) {
  use_pipeline(encoder, pipeline(device, name), name, threads);
}

void dispatch(
    mlx::core::metal::CommandEncoder& encoder,
    const std::array<uint32_t, 3>& grid,
    const std::array<uint32_t, 3>& threads) {
  encoder.dispatch_threadgroups(
      MTL::Size(grid[0], grid[1], grid[2]), MTL::Size(threads[0], threads[1], threads[2]));
}

void encode_route(
    mlx::core::metal::Device& device,
    mlx::core::metal::CommandEncoder& encoder,
    const mlx::core::array& indices,
    int num_experts,
    mlx::core::array& order,
    mlx::core::array& offsets,
    mlx::core::array& sorted_experts,
    mlx::core::array& status) {
  auto* kernel = pipeline(device, "moe_route");
  const auto plan = plan_route(
      static_cast<int64_t>(indices.size()), num_experts, static_cast<int64_t>(kernel->maxTotalThreadsPerThreadgroup()));
  use_pipeline(encoder, kernel, plan.kernel, plan.threads);
  // Buffers as route.metal: 0 indices, 1 order, 2 offsets, 3 sorted_experts,
  // 4 error (the status: 1 if an id is >= E), 5 params. With no slots the
  // kernel still writes offsets (all 0) and the status; the empty slot
  // buffers get a one-word placeholder (Metal buffers cannot be empty).
  if (indices.size() == 0) {
    mlx::core::array placeholder = temporary(encoder, {1}, mlx::core::uint32);
    encoder.set_input_array(placeholder, 0);
    encoder.set_output_array(placeholder, 1);
    encoder.set_output_array(offsets, 2);
    encoder.set_output_array(placeholder, 3);
  } else {
    encoder.set_input_array(indices, 0);
    encoder.set_output_array(order, 1);
    encoder.set_output_array(offsets, 2);
    encoder.set_output_array(sorted_experts, 3);
  }
  encoder.set_output_array(status, 4);
  encoder.set_bytes(plan.params, 5);
  dispatch(encoder, plan.grid, plan.threads);
}

mlx::core::array temporary(
    mlx::core::metal::CommandEncoder& encoder, mlx::core::Shape shape, mlx::core::Dtype dtype) {
  mlx::core::array a(std::move(shape), dtype, nullptr, {});
  a.set_data(mlx::core::allocator::malloc(a.nbytes()));
  encoder.add_temporary(a);
  return a;
}

mlx::core::array row_contiguous(
    const mlx::core::array& a, mlx::core::metal::CommandEncoder& encoder, const mlx::core::Stream& s) {
  if (a.flags().row_contiguous) {
    return a;
  }
  mlx::core::array copy = mlx::core::contiguous_copy_gpu(a, s);
  encoder.add_temporary(copy);
  return copy;
}

mlx::core::array aligned_rows(
    const mlx::core::array& a, mlx::core::metal::CommandEncoder& encoder, const mlx::core::Stream& s) {
  if (a.flags().row_contiguous && a.offset() % 16 == 0) {
    return a;
  }
  mlx::core::array copy = mlx::core::contiguous_copy_gpu(a, s);
  encoder.add_temporary(copy);
  return copy;
}

}  // namespace mlx_moe::metal
