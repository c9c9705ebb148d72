// mftk CPU ops: declarations shared by the registration and the kernels.
// Shapes: N tokens, D_in -> D_out, T tasks, R rank. Compute dtype: fp64 for fp64 inputs, else fp32.
#pragma once
// Light headers only (the Tensor class, per-op headers in the .cpp files): no torch/extension.h,
// which costs ~20 s of compile time per translation unit.
#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>

namespace mftk {

// perm (N,) int64 tokens grouped by task, -1 last; offsets (T+1,) int64.
std::tuple<at::Tensor, at::Tensor> build_plan_cpu(const at::Tensor& task_ids, int64_t num_tasks);

// y (N, D_out) x.dtype; shrink (N, R) compute dtype, in plan order (row i <-> token perm[i]).
std::tuple<at::Tensor, at::Tensor> hard_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling,
    const at::Tensor& perm, const at::Tensor& offsets);

// grad_x (N, D_in), grad_lora_a (T, R, D_in), grad_lora_b (T, D_out, R).
std::tuple<at::Tensor, at::Tensor, at::Tensor> hard_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling,
    const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& shrink);

// y (N, D_out); logits (N, T) x.dtype; probs (N, T) and shrink (N, T*R) compute dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_bias,
    double temperature, int64_t top_k);

// grad_x, grad_lora_a, grad_lora_b, grad_router_weight (T, D_in), grad_router_bias (T,).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_bwd_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_logits, const at::Tensor& x,
    const std::optional<at::Tensor>& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& scaling, const at::Tensor& router_weight, const at::Tensor& probs,
    const at::Tensor& shrink, double temperature);

// Threads that entered one parallel region (a build check: 1 means OpenMP was compiled out).
int64_t parallel_threads_cpu();

// x W^T + b in the compute dtype; without weight, just b (or zeros): the adapters alone.
at::Tensor base_forward(const at::Tensor& xc, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, int64_t d_out);

// grad_y W, or zeros (N, D_in) without weight.
at::Tensor base_grad_x(const at::Tensor& gy, const std::optional<at::Tensor>& weight, int64_t d_in);

// A kernel that reads through raw pointers checks the shapes itself (direct torch.ops calls
// skip the Python checks): "name: expected [..], got [..]".
inline void expect(const at::Tensor& t, at::IntArrayRef sizes, const char* name) {
  TORCH_CHECK(t.sizes() == sizes, name, ": expected ", sizes, ", got ", t.sizes());
}

inline void expect(const std::optional<at::Tensor>& t, at::IntArrayRef sizes, const char* name) {
  if (t.has_value() && t->defined()) expect(*t, sizes, name);
}

inline at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace mftk
