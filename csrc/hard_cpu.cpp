// Hard routing on CPU: each token goes to its own task's adapter.
//   y[n] = x[n] W^T + b + s[t] (x[n] A[t]^T) B[t]^T,   t = task_ids[n]
// Tokens are gathered once in plan order; each task is then a contiguous row range, so every
// per-task GEMM reads and writes slices in place. Tasks run in parallel (at::parallel_for).
#include <torch/extension.h>

#include "mftk.h"

namespace mftk {

namespace {

at::Tensor base_linear(const at::Tensor& xc, const at::Tensor& wc,
                       const std::optional<at::Tensor>& bias, at::ScalarType cdt) {
  if (bias.has_value() && bias->defined()) return at::addmm(bias->to(cdt), xc, wc.t());
  return at::mm(xc, wc.t());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> hard_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling,
    const at::Tensor& perm, const at::Tensor& offsets) {
  const auto cdt = compute_dtype(x);
  const int64_t n = x.size(0), t_count = lora_a.size(0), rank = lora_a.size(1);
  const int64_t d_out = weight.size(0);
  auto xc = x.to(cdt).contiguous();
  auto y = base_linear(xc, weight.to(cdt), bias, cdt);
  auto shrink = at::zeros({n, rank}, xc.options());
  auto off_t = offsets.to(at::kLong).contiguous();
  const int64_t* off = off_t.data_ptr<int64_t>();
  const int64_t routed = off[t_count];
  if (routed > 0) {
    auto idx = perm.narrow(0, 0, routed);
    auto xs = xc.index_select(0, idx);  // [routed, D_in], plan order
    auto delta = at::empty({routed, d_out}, xc.options());
    auto a = lora_a.to(cdt).contiguous();
    auto b = lora_b.to(cdt).contiguous();
    auto s = scaling.to(at::kDouble).contiguous();
    const double* sp = s.data_ptr<double>();
    at::parallel_for(0, t_count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t rows = off[t + 1] - off[t];
        if (rows == 0) continue;
        auto s_t = shrink.narrow(0, off[t], rows);  // [rows, R]
        at::mm_out(s_t, xs.narrow(0, off[t], rows), a[t].t());
        auto d_t = delta.narrow(0, off[t], rows);  // [rows, D_out]
        at::mm_out(d_t, s_t * sp[t], b[t].t());
      }
    });
    y.index_add_(0, idx, delta);
  }
  return {y.to(x.scalar_type()), shrink};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hard_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling,
    const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& shrink) {
  const auto cdt = compute_dtype(x);
  const int64_t t_count = lora_a.size(0), rank = lora_a.size(1);
  const int64_t d_in = x.size(1), d_out = weight.size(0);
  auto gy = grad_y.to(cdt).contiguous();
  auto grad_x = at::mm(gy, weight.to(cdt));
  auto grad_a = at::zeros({t_count, rank, d_in}, gy.options());
  auto grad_b = at::zeros({t_count, d_out, rank}, gy.options());
  auto off_t = offsets.to(at::kLong).contiguous();
  const int64_t* off = off_t.data_ptr<int64_t>();
  const int64_t routed = off[t_count];
  if (routed > 0) {
    auto idx = perm.narrow(0, 0, routed);
    auto xs = x.to(cdt).index_select(0, idx);  // [routed, D_in]
    auto dys = gy.index_select(0, idx);         // [routed, D_out]
    auto dxs = at::empty({routed, d_in}, gy.options());
    auto sh = shrink.to(cdt);
    auto a = lora_a.to(cdt).contiguous();
    auto b = lora_b.to(cdt).contiguous();
    auto s = scaling.to(at::kDouble).contiguous();
    const double* sp = s.data_ptr<double>();
    at::parallel_for(0, t_count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t rows = off[t + 1] - off[t];
        if (rows == 0) continue;
        auto dy_t = dys.narrow(0, off[t], rows);
        auto x_t = xs.narrow(0, off[t], rows);
        auto s_t = sh.narrow(0, off[t], rows);
        auto gb_t = grad_b[t];
        at::mm_out(gb_t, dy_t.t(), s_t);  // dB = s * dy^T S
        gb_t.mul_(sp[t]);
        auto ds = at::mm(dy_t, b[t]).mul_(sp[t]);  // dS = s * dy B   [rows, R]
        auto ga_t = grad_a[t];
        at::mm_out(ga_t, ds.t(), x_t);  // dA = dS^T x
        auto dx_t = dxs.narrow(0, off[t], rows);
        at::mm_out(dx_t, ds, a[t]);  // dx += dS A
      }
    });
    grad_x.index_add_(0, idx, dxs);
  }
  return {grad_x.to(x.scalar_type()), grad_a.to(lora_a.scalar_type()),
          grad_b.to(lora_b.scalar_type())};
}

}  // namespace mftk
