#include "cpu/thread_pool.h"

#include <chrono>
#include <cstdlib>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace mlx_moe::cpu {

namespace {

// How long an idle worker keeps polling for the next job before it sleeps:
// longer than the gap between two MoE layers' calls while decoding, short
// enough not to steal a core from other work for long.
constexpr auto kSpinBeforeSleep = std::chrono::microseconds(300);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

int threads_from_environment() {
  if (const char* value = std::getenv("MLX_MOE_NUM_THREADS")) {
    int n = std::atoi(value);
    if (n > 0) {
      return n;
    }
  }
  unsigned hardware = std::thread::hardware_concurrency();
  return hardware > 0 ? static_cast<int>(hardware) : 1;
}

} // namespace

ThreadPool& ThreadPool::instance() {
  // Never destroyed: worker threads must not be joined during static
  // destruction at interpreter exit.
  static ThreadPool* pool = new ThreadPool(threads_from_environment());
  return *pool;
}

ThreadPool::ThreadPool(int num_threads) {
  for (int i = 1; i < num_threads; ++i) {
    workers_.emplace_back([this, i] { worker_loop(i); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(sleep_mutex_);
    stopping_.store(true);
  }
  wake_.notify_all();
  for (auto& w : workers_) {
    w.join();
  }
}

void ThreadPool::run_share(int thread_index) {
  while (true) {
    int64_t i = next_task_.fetch_add(1, std::memory_order_relaxed);
    if (i >= num_tasks_) {
      return;
    }
    try {
      (*task_)(i, thread_index);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) {
        error_ = std::current_exception();
      }
      // Let the other threads run out of tasks quickly.
      next_task_.store(num_tasks_, std::memory_order_relaxed);
    }
  }
}

void ThreadPool::worker_loop(int thread_index) {
  uint64_t seen = 0;
  while (true) {
    // Poll for a while, then sleep until the generation changes.
    auto spin_until = std::chrono::steady_clock::now() + kSpinBeforeSleep;
    while (generation_.load(std::memory_order_acquire) == seen && !stopping_.load() &&
           std::chrono::steady_clock::now() < spin_until) {
      for (int i = 0; i < 64; ++i) {
        cpu_relax();
      }
      // Let a runnable thread on this core (Python building the next
      // graph, MLX's scheduler) go first: on few cores a pure spin would
      // delay the very work the next job waits for.
      std::this_thread::yield();
    }
    if (generation_.load(std::memory_order_acquire) == seen) {
      std::unique_lock<std::mutex> lock(sleep_mutex_);
      wake_.wait(lock, [&] {
        return stopping_.load() || generation_.load(std::memory_order_acquire) != seen;
      });
    }
    if (stopping_.load()) {
      return;
    }
    seen = generation_.load(std::memory_order_acquire);
    // Join, then check the job is still open (both sequentially consistent
    // with the caller's close-then-count): either the caller sees us and
    // waits, or we see it closed and leave. A worker the OS has not run
    // yet (two cores shared with MLX's and Python's threads) thus never
    // holds the caller up; the caller takes its tasks instead.
    joined_workers_.fetch_add(1);
    if (!closed_.load()) {
      run_share(thread_index);
    }
    joined_workers_.fetch_sub(1);
  }
}

void ThreadPool::parallel_for(int64_t num_tasks, const std::function<void(int64_t, int)>& task) {
  if (num_tasks <= 0) {
    return;
  }
  if (workers_.empty() || num_tasks == 1) {
    for (int64_t i = 0; i < num_tasks; ++i) {
      task(i, 0);
    }
    return;
  }
  std::lock_guard<std::mutex> call_lock(call_mutex_);
  task_ = &task;
  num_tasks_ = num_tasks;
  error_ = nullptr;
  next_task_.store(0, std::memory_order_relaxed);
  closed_.store(false);
  {
    // Under the mutex so that a worker between its check and its wait
    // cannot miss the notification.
    std::lock_guard<std::mutex> lock(sleep_mutex_);
    generation_.fetch_add(1, std::memory_order_release);
  }
  wake_.notify_all();
  run_share(0);
  closed_.store(true);
  while (joined_workers_.load() != 0) {
    cpu_relax();
  }
  task_ = nullptr;
  if (error_) {
    std::rethrow_exception(error_);
  }
}

} // namespace mlx_moe::cpu
