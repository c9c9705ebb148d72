// Routing plan on CPU: a stable counting sort of task ids (histogram, exclusive scan, scatter).
#include <ATen/ops/empty.h>

#include <vector>

#include "mftk.h"

namespace mftk {

std::tuple<at::Tensor, at::Tensor> build_plan_cpu(const at::Tensor& task_ids, int64_t num_tasks) {
  TORCH_CHECK(task_ids.dim() == 1, "task_ids: expected (N,), got ", task_ids.sizes());
  TORCH_CHECK(num_tasks >= 1, "num_tasks: expected >= 1, got ", num_tasks);
  auto ids = task_ids.to(at::kLong).contiguous();
  const int64_t n = ids.numel();
  const int64_t* id = ids.data_ptr<int64_t>();
  // Bucket T holds the base-only tokens (-1), so they land after every task.
  std::vector<int64_t> counts(num_tasks + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = id[i];
    TORCH_CHECK(t >= -1 && t < num_tasks, "task_ids: id ", t, " at ", i, " out of range [-1, ",
                num_tasks, ")");
    counts[t < 0 ? num_tasks : t] += 1;
  }
  auto offsets = at::empty({num_tasks + 1}, ids.options());
  int64_t* off = offsets.data_ptr<int64_t>();
  std::vector<int64_t> cursor(num_tasks + 1, 0);
  int64_t run = 0;
  for (int64_t t = 0; t <= num_tasks; ++t) {
    off[t] = run;
    cursor[t] = run;
    run += counts[t];
  }
  auto perm = at::empty({n}, ids.options());
  int64_t* p = perm.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = id[i] < 0 ? num_tasks : id[i];
    p[cursor[t]++] = i;
  }
  return {perm, offsets};
}

}  // namespace mftk
