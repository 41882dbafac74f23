// A small persistent pool of worker threads for the CPU kernels.
//
// MLX runs a primitive's CPU work on the stream's own thread; our kernels
// split that work over all cores. The calling thread takes part, so with N
// threads the pool keeps N-1 workers. Work is handed out by an atomic
// counter (dynamic scheduling), which balances ragged expert groups.
#pragma once

#include <atomic>
#include <condition_variable>
#include <exception>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mlx_moe::cpu {

class ThreadPool {
 public:
  // Runs task(task_index, thread_index) for every task_index in
  // [0, num_tasks) on the pool and the calling thread; returns when all are
  // done. thread_index is in [0, num_threads()) and unique among concurrent
  // calls of task. The first exception thrown by a task is rethrown here.
  void parallel_for(
      int64_t num_tasks,
      const std::function<void(int64_t, int)>& task);

  int num_threads() const {
    return static_cast<int>(workers_.size()) + 1;
  }

  // The process-wide pool, sized by MLX_MOE_NUM_THREADS or else by the
  // number of hardware threads.
  static ThreadPool& instance();

  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

 private:
  void worker_loop(int thread_index);
  void run_share(int thread_index);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::mutex call_mutex_; // one parallel_for at a time
  uint64_t generation_ = 0;
  int busy_workers_ = 0;
  bool stopping_ = false;

  // The job of the current generation.
  const std::function<void(int64_t, int)>* task_ = nullptr;
  int64_t num_tasks_ = 0;
  std::atomic<int64_t> next_task_{0};
  std::exception_ptr error_;
};

} // namespace mlx_moe::cpu
