// msl_abi.h: the C interface between code compiled from .metal sources (via
// msl_shim.h) and the simulator's runtime (msl_runtime.cpp).
#pragma once
#include <cstddef>
#include <cstdint>

extern "C" {
struct msl_thread_info {
  uint32_t thread_position_in_grid[3];
  uint32_t threadgroup_position_in_grid[3];
  uint32_t thread_position_in_threadgroup[3];
  uint32_t threads_per_threadgroup[3];
  uint32_t threadgroups_per_grid[3];
  uint32_t threads_per_grid[3];
  uint32_t thread_index_in_threadgroup;
  uint32_t thread_index_in_simdgroup;
  uint32_t simdgroup_index_in_threadgroup;
  uint32_t simdgroups_per_threadgroup;
  uint32_t threads_per_simdgroup;  // 32 (the hardware width, also for a partial simdgroup)
  int32_t nbuffers;
  void* const* buffers;
  const uint64_t* buffer_sizes;
  int32_t ntg;
  void* const* tg_buffers;
  const uint64_t* tg_sizes;
};
const msl_thread_info* msl_rt_thread_info();
// scope 0: threadgroup_barrier, 1: simdgroup_barrier.
void msl_rt_barrier(int scope, unsigned flags, const char* file, unsigned line, unsigned col);
// All-gather of `n` bytes across the active lanes of the caller's simdgroup
// (a rendezvous): `all` receives 32 slots of n bytes (inactive lanes: 0xFF
// bytes), `mask` the active lanes.
void msl_rt_simd_exchange(const void* mine, size_t n, void* all, uint32_t* mask, const char* file,
                          unsigned line, unsigned col);
void* msl_rt_tg_alloc(const void* key, const char* name, size_t size, size_t align);
void msl_rt_untracked(int on);  // atomics: accesses not race-checked
void msl_rt_error(const char* kind, const char* message);
// Records an error and ends the launch (the calling thread never resumes).
void msl_rt_fatal(const char* kind, const char* message);
void msl_rt_register_kernel(const char* name, void (*thunk)());
}


// ---- host side: what the Python harness (metal_sim/sim.py, ctypes) calls.
extern "C" {
enum msl_schedule { MSL_SCHEDULE_FORWARD = 0, MSL_SCHEDULE_REVERSE = 1, MSL_SCHEDULE_RANDOM = 2 };
struct msl_launch_desc {
  const char* kernel;            // host name
  uint32_t threadgroups[3];      // dispatchThreadgroups: threadgroups per grid
  uint32_t threads[3];           // threads per threadgroup
  uint32_t grid_threads[3];      // dispatchThreads (non-uniform) if all > 0: threads per grid
  int32_t nbuffers;              // [[buffer(i)]]: host memory, copied in and back out
  void* const* buffers;
  const uint64_t* buffer_sizes;
  int32_t ntg;                   // [[threadgroup(i)]] lengths (setThreadgroupMemoryLength)
  const uint64_t* tg_sizes;
  int32_t schedule;              // msl_schedule
  uint64_t seed;                 // random schedule
  double preempt;                // random schedule: chance to switch thread at each shared access
  int32_t race_check;            // track shared accesses (needs the instrumented build)
  int32_t strict;                // threads exiting while others wait at a barrier: error, not warning
  uint64_t stack_size;           // bytes per simulated thread (0: default)
};
// Returns the number of error diagnostics (0: clean), -1 if the launch could
// not start; `diag` receives a JSON list of {severity, kind, message, count}.
int msl_sim_launch(const msl_launch_desc* desc, char* diag, size_t diag_cap);
int msl_sim_kernel_count();
const char* msl_sim_kernel_name(int i);
}
