// A small persistent pool of worker threads for the CPU kernels.
//
// MLX runs a primitive's CPU work on the stream's own thread; our kernels
// split that work over all cores. The calling thread takes part, so with N
// threads the pool keeps N-1 workers. Work is handed out by an atomic
// counter (dynamic scheduling), which balances ragged expert groups.
//
// Decoding calls the kernels every few hundred microseconds, so waking a
// sleeping thread (tens of microseconds) would be a visible cost: workers
// spin briefly after each job before they sleep, and the caller spins while
// it waits for the last worker.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
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
  void parallel_for(int64_t num_tasks, const std::function<void(int64_t, int)>& task);

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
  std::mutex call_mutex_; // one parallel_for at a time

  // Wake-up: a new job bumps generation_; sleeping workers wait on wake_.
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stopping_{false};
  // Workers inside the current job; the caller waits for these only.
  std::atomic<int> joined_workers_{0};
  // Set by the caller once every task is taken: a worker that arrives
  // later leaves without touching the job.
  std::atomic<bool> closed_{true};

  // The current job.
  const std::function<void(int64_t, int)>* task_ = nullptr;
  int64_t num_tasks_ = 0;
  std::atomic<int64_t> next_task_{0};
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

} // namespace mlx_moe::cpu
