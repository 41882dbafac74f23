#include "cpu/thread_pool.h"

#include <atomic>
#include <cstdlib>
#include <string>

namespace mlx_moe::cpu {

namespace {

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
  static ThreadPool pool(threads_from_environment());
  return pool;
}

ThreadPool::ThreadPool(int num_threads) {
  for (int i = 1; i < num_threads; ++i) {
    workers_.emplace_back([this, i] { worker_loop(i); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
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
      std::lock_guard<std::mutex> lock(mutex_);
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
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) {
        return;
      }
      seen = generation_;
    }
    run_share(thread_index);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      --busy_workers_;
    }
    done_.notify_one();
  }
}

void ThreadPool::parallel_for(
    int64_t num_tasks,
    const std::function<void(int64_t, int)>& task) {
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
  {
    std::lock_guard<std::mutex> lock(mutex_);
    task_ = &task;
    num_tasks_ = num_tasks;
    next_task_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    busy_workers_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  wake_.notify_all();
  run_share(0);
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return busy_workers_ == 0; });
    error = error_;
    task_ = nullptr;
  }
  if (error) {
    std::rethrow_exception(error);
  }
}

} // namespace mlx_moe::cpu
