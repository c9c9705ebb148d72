// Registers the GPU routing plan (plan_kernel.cu) as the CUDA implementation of mftk::build_plan,
// and defines mftk::block_table (CUDA only). Built only on CUDA builds of torch (setup.py).
// Only device-generic c10 headers (no c10/cuda), so a CPU torch plus cuda_runtime.h can
// syntax-check this file (check.sh).
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "plan_kernel.h"

namespace mftk {

namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
}

// The current CUDA stream of `device`, through the registered CUDA guard implementation.
cudaStream_t current_stream(const c10::Device& device) {
  const auto stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> build_plan_cuda(const at::Tensor& task_ids, int64_t num_tasks) {
  TORCH_CHECK(task_ids.dim() == 1, "task_ids: expected (N,), got ", task_ids.sizes());
  TORCH_CHECK(num_tasks >= 1, "num_tasks: expected >= 1, got ", num_tasks);
  TORCH_CHECK(task_ids.is_cuda(), "task_ids: expected a CUDA tensor");
  const c10::DeviceGuard guard(task_ids.device());
  auto ids = task_ids.to(at::kLong).contiguous();
  const int64_t n = ids.numel();
  auto perm = at::empty({n}, ids.options());
  auto offsets = at::empty({num_tasks + 1}, ids.options());
  auto work = at::empty({static_cast<int64_t>(mftk_cuda::plan_workspace_elems(n, num_tasks))},
                        ids.options());
  check_cuda(mftk_cuda::build_plan_launch(ids.data_ptr<int64_t>(), n, num_tasks,
                                          perm.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                                          work.data_ptr<int64_t>(),
                                          current_stream(ids.device())),
             "mftk::build_plan (CUDA)");
  return {perm, offsets};
}

// block_task (cdiv(N, block_m) + T,) int32 (-1 past the last block), block_row (same,) int64.
std::tuple<at::Tensor, at::Tensor> block_table_cuda(const at::Tensor& offsets, int64_t num_tokens,
                                                    int64_t block_m) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 2, "offsets: expected (T + 1,)");
  TORCH_CHECK(block_m >= 1, "block_m: expected >= 1, got ", block_m);
  TORCH_CHECK(offsets.is_cuda(), "offsets: expected a CUDA tensor");
  const c10::DeviceGuard guard(offsets.device());
  auto off = offsets.to(at::kLong).contiguous();
  const int64_t num_tasks = off.numel() - 1;
  const int64_t len = (num_tokens + block_m - 1) / block_m + num_tasks;
  auto block_task = at::empty({len}, off.options().dtype(at::kInt));
  auto block_row = at::empty({len}, off.options());
  auto work = at::empty({num_tasks + 1}, off.options());
  check_cuda(mftk_cuda::block_table_launch(off.data_ptr<int64_t>(), num_tasks, block_m,
                                           block_task.data_ptr<int32_t>(),
                                           block_row.data_ptr<int64_t>(), len,
                                           work.data_ptr<int64_t>(),
                                           current_stream(off.device())),
             "mftk::block_table (CUDA)");
  return {block_task, block_row};
}

}  // namespace mftk

TORCH_LIBRARY_FRAGMENT(mftk, m) {
  m.def("block_table(Tensor offsets, int num_tokens, int block_m) -> (Tensor block_task, "
        "Tensor block_row)");
}

TORCH_LIBRARY_IMPL(mftk, CUDA, m) {
  m.impl("build_plan", &mftk::build_plan_cuda);
  m.impl("block_table", &mftk::block_table_cuda);
}
