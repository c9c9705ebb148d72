// Routing plan on the GPU: a stable counting sort of task ids, plus the block -> task table.
// Plain CUDA, no torch headers, so CI can compile-check it with nvcc alone (check.sh).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mftk_cuda {

// int64 elements of scratch that build_plan_launch needs for n tokens and T tasks.
size_t plan_workspace_elems(int64_t n, int64_t num_tasks);

// perm (n,): token indices grouped by task 0..T-1, stable, ids outside [0, T) (i.e. -1) last;
// offsets (T + 1,): offsets[t] = first row of task t, offsets[T] = routed token count.
// task_ids, perm, offsets and workspace are device pointers; nothing is synchronised.
cudaError_t build_plan_launch(const int64_t* task_ids, int64_t n, int64_t num_tasks, int64_t* perm,
                              int64_t* offsets, int64_t* workspace, cudaStream_t stream);

// For row blocks of block_m plan rows, numbered task after task (cdiv(count_t, block_m) each):
// block_task[j] = the task of block j and block_row[j] = its first plan row, for
// j < table_len = cdiv(n, block_m) + T (an upper bound on the block count, so no host sync);
// unused entries get block_task = -1. workspace: T + 1 int64.
cudaError_t block_table_launch(const int64_t* offsets, int64_t num_tasks, int64_t block_m,
                               int32_t* block_task, int64_t* block_row, int64_t table_len,
                               int64_t* workspace, cudaStream_t stream);

}  // namespace mftk_cuda
