// The split of a gather matmul into (group, column block) tasks, shared by
// gather_mm and gather_qmm: several tasks per thread so that ragged groups
// balance, column blocks a multiple of `quantum` (every column tile width,
// so only a matrix's last block has a ragged edge; for gather_qmm with the
// quantized axis along the columns, the group size), never narrower than it
// (keeps weight rows streaming in long runs), largest groups first so the
// dynamic schedule ends with small tasks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/gather_mm_problem.h"
#include "cpu/thread_pool.h"

namespace mlx_moe::cpu {

constexpr int64_t kGatherTasksPerThread = 8;

// Column blocks are a multiple of this: of every dot and outer-product tile
// width (1, 2, 3, 4, 8, 16) and of the quantized kernels' 8-column panels.
// (gather_qmm with the quantized axis along the columns uses the group
// size instead.)
constexpr int64_t kColumnQuantum = 48;

// `Problem`: N, num_groups and group_rows(g) (GatherMMProblem,
// GatherQMMProblem).
template <typename Problem>
std::vector<GatherMMTask> column_block_tasks(const Problem& p, int64_t quantum, int num_threads) {
  const int64_t target = kGatherTasksPerThread * num_threads;
  const int64_t max_blocks = std::max<int64_t>(1, (p.N + quantum - 1) / quantum);
  const int64_t blocks =
      std::clamp<int64_t>((target + p.num_groups - 1) / p.num_groups, 1, max_blocks);
  int64_t width = (p.N + blocks - 1) / blocks;
  width = (width + quantum - 1) / quantum * quantum;
  std::vector<int64_t> order(p.num_groups);
  for (int64_t g = 0; g < p.num_groups; ++g) {
    order[g] = g;
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return p.group_rows(a) > p.group_rows(b);
  });
  std::vector<GatherMMTask> tasks;
  for (int64_t g : order) {
    for (int64_t n = 0; n < p.N; n += width) {
      tasks.push_back({g, n, std::min(p.N, n + width)});
    }
  }
  return tasks;
}

// Runs kernel(problem, task) for every column block task of `problem` on
// the process's thread pool.
template <typename Problem, typename Kernel>
void run_column_blocks(const Problem& problem, int64_t quantum, Kernel kernel) {
  ThreadPool& pool = ThreadPool::instance();
  const std::vector<GatherMMTask> tasks = column_block_tasks(problem, quantum, pool.num_threads());
  pool.parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i, int) { kernel(problem, tasks[i]); });
}

} // namespace mlx_moe::cpu
