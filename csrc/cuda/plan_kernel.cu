// Routing plan on the GPU (see plan_kernel.h). Tokens are processed in warp-sized chunks:
//   1. histogram: counts[b * C + c] = tokens of bucket b in chunk c (b = T holds the -1 tokens);
//   2. exclusive scan of counts in bucket-major order: the first output row of (b, c);
//   3. scatter: a token's row = scan[b * C + c] + its rank among same-bucket lanes of its warp.
// Bucket-major scan order plus lane order within a warp makes the sort stable.
#include "plan_kernel.h"

namespace mftk_cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;      // 8 warps (chunks) per block in histogram / scatter
constexpr int kScanThreads = 1024;

__device__ __forceinline__ int64_t bucket_of(int64_t id, int64_t num_tasks) {
  return (id < 0 || id >= num_tasks) ? num_tasks : id;
}

// One warp per chunk of 32 tokens; the lowest lane of each bucket writes the chunk's count.
__global__ void histogram_kernel(const int64_t* __restrict__ ids, int64_t n, int64_t num_tasks,
                                 int64_t chunks, int64_t* __restrict__ counts) {
  const int64_t chunk = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (chunk >= chunks) return;  // whole warps exit together
  const int lane = threadIdx.x % kWarp;
  const int64_t i = chunk * kWarp + lane;
  const long long key = i < n ? bucket_of(ids[i], num_tasks) : -1;  // -1: past the end
  const unsigned same = __match_any_sync(0xffffffffu, key);
  if (key >= 0 && lane == __ffs(same) - 1) counts[key * chunks + chunk] = __popc(same);
}

// Exclusive scan of len int64 in place by one block: per-thread serial sums over contiguous
// segments, a shared-memory scan of the segment totals, then a serial rewrite.
__global__ void scan_kernel(int64_t* __restrict__ data, int64_t len, int64_t chunks,
                            int64_t num_tasks, int64_t* __restrict__ offsets) {
  __shared__ int64_t totals[kScanThreads];
  const int64_t per = (len + kScanThreads - 1) / kScanThreads;
  const int64_t lo = min(len, per * threadIdx.x), hi = min(len, lo + per);
  int64_t sum = 0;
  for (int64_t j = lo; j < hi; ++j) sum += data[j];
  totals[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = 1; stride < kScanThreads; stride *= 2) {  // Hillis-Steele, inclusive
    const int64_t add = threadIdx.x >= stride ? totals[threadIdx.x - stride] : 0;
    __syncthreads();
    totals[threadIdx.x] += add;
    __syncthreads();
  }
  int64_t run = totals[threadIdx.x] - sum;  // exclusive prefix of this segment
  for (int64_t j = lo; j < hi; ++j) {
    const int64_t v = data[j];
    data[j] = run;
    run += v;
  }
  __syncthreads();
  // offsets[b] = first row of bucket b = scan at (b, chunk 0); offsets[T] = routed tokens.
  for (int64_t b = threadIdx.x; b <= num_tasks; b += blockDim.x) offsets[b] = data[b * chunks];
}

__global__ void scatter_kernel(const int64_t* __restrict__ ids, int64_t n, int64_t num_tasks,
                               int64_t chunks, const int64_t* __restrict__ starts,
                               int64_t* __restrict__ perm) {
  const int64_t chunk = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (chunk >= chunks) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t i = chunk * kWarp + lane;
  const long long key = i < n ? bucket_of(ids[i], num_tasks) : -1;
  const unsigned same = __match_any_sync(0xffffffffu, key);
  if (key < 0) return;
  const unsigned lower = (1u << lane) - 1u;  // lanes before this one
  perm[starts[key * chunks + chunk] + __popc(same & lower)] = i;
}

// cum[t + 1] = blocks of tasks 0..t (serial over T: tiny, once per batch).
__global__ void block_count_kernel(const int64_t* __restrict__ offsets, int64_t num_tasks,
                                   int64_t block_m, int64_t* __restrict__ cum) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int64_t run = 0;
  cum[0] = 0;
  for (int64_t t = 0; t < num_tasks; ++t) {
    run += (offsets[t + 1] - offsets[t] + block_m - 1) / block_m;
    cum[t + 1] = run;
  }
}

__global__ void block_table_kernel(const int64_t* __restrict__ offsets,
                                   const int64_t* __restrict__ cum, int64_t num_tasks,
                                   int64_t block_m, int32_t* __restrict__ block_task,
                                   int64_t* __restrict__ block_row, int64_t table_len) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < table_len;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (j >= cum[num_tasks]) {
      block_task[j] = -1;
      block_row[j] = 0;
      continue;
    }
    int64_t lo = 0, hi = num_tasks - 1;  // last t with cum[t] <= j
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (cum[mid] <= j) lo = mid; else hi = mid - 1;
    }
    block_task[j] = static_cast<int32_t>(lo);
    block_row[j] = offsets[lo] + (j - cum[lo]) * block_m;
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

size_t plan_workspace_elems(int64_t n, int64_t num_tasks) {
  return static_cast<size_t>((num_tasks + 1) * cdiv(n > 0 ? n : 1, kWarp));
}

cudaError_t build_plan_launch(const int64_t* task_ids, int64_t n, int64_t num_tasks, int64_t* perm,
                              int64_t* offsets, int64_t* workspace, cudaStream_t stream) {
  if (n <= 0) return cudaMemsetAsync(offsets, 0, sizeof(int64_t) * (num_tasks + 1), stream);
  const int64_t chunks = cdiv(n, kWarp);
  const int64_t len = (num_tasks + 1) * chunks;
  cudaError_t err = cudaMemsetAsync(workspace, 0, sizeof(int64_t) * len, stream);
  if (err != cudaSuccess) return err;
  const int64_t blocks = cdiv(chunks * kWarp, kThreads);
  histogram_kernel<<<blocks, kThreads, 0, stream>>>(task_ids, n, num_tasks, chunks, workspace);
  scan_kernel<<<1, kScanThreads, 0, stream>>>(workspace, len, chunks, num_tasks, offsets);
  scatter_kernel<<<blocks, kThreads, 0, stream>>>(task_ids, n, num_tasks, chunks, workspace, perm);
  return cudaGetLastError();
}

cudaError_t block_table_launch(const int64_t* offsets, int64_t num_tasks, int64_t block_m,
                               int32_t* block_task, int64_t* block_row, int64_t table_len,
                               int64_t* workspace, cudaStream_t stream) {
  if (table_len <= 0) return cudaSuccess;
  block_count_kernel<<<1, 1, 0, stream>>>(offsets, num_tasks, block_m, workspace);
  const int64_t blocks = cdiv(table_len, kThreads) < 1024 ? cdiv(table_len, kThreads) : 1024;
  block_table_kernel<<<blocks, kThreads, 0, stream>>>(offsets, workspace, num_tasks, block_m,
                                                       block_task, block_row, table_len);
  return cudaGetLastError();
}

}  // namespace mftk_cuda
