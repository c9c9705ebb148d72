// Hard routing on CPU: each token goes to its own task's adapter.
//   y[n] = x[n] W^T + b + s[t] (x[n] A[t]^T) B[t]^T,   t = task_ids[n]
// The plan orders all N tokens by task (base-only last), so each task is a contiguous row range.
// Rows are gathered into plan order once; the base GEMM runs on the gathered rows, each task's
// rank-R GEMMs add into their slice in place, and one parallel row copy puts the result back in
// token order. Compared with base-then-scatter-add this saves a read-modify-write pass over y
// (and grad_x), and every GEMM keeps all intra-op threads.
#include <torch/extension.h>

#include <algorithm>
#include <cstring>

#include "mftk.h"

namespace mftk {

namespace {

constexpr int64_t kRowGrain = 64;

// out[i] = src[idx[i]] for i < rows.   src: [N, D] contiguous; out: [rows, D]
template <typename scalar_t>
void gather_rows(const at::Tensor& src, const int64_t* idx, int64_t rows, at::Tensor& out) {
  const int64_t d = src.size(1);
  const scalar_t* s = src.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      std::memcpy(o + i * d, s + idx[i] * d, d * sizeof(scalar_t));
  });
}

// dst[idx[i]] = src[i] for i < rows. idx holds distinct rows (a permutation), so no races.
template <typename scalar_t>
void scatter_rows(at::Tensor& dst, const int64_t* idx, int64_t rows, const at::Tensor& src) {
  const int64_t d = dst.size(1);
  scalar_t* o = dst.data_ptr<scalar_t>();
  const scalar_t* s = src.data_ptr<scalar_t>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      std::memcpy(o + idx[i] * d, s + i * d, d * sizeof(scalar_t));
  });
}

// A hand-made plan must not send the row loops out of bounds.
void check_plan(const int64_t* off, int64_t t_count, const int64_t* perm, int64_t n) {
  TORCH_CHECK(off[0] == 0 && off[t_count] <= n, "offsets: expected 0 <= ... <= N = ", n);
  for (int64_t t = 0; t < t_count; ++t)
    TORCH_CHECK(off[t] <= off[t + 1], "offsets: expected non-decreasing, task ", t);
  for (int64_t i = 0; i < off[t_count]; ++i)
    TORCH_CHECK(perm[i] >= 0 && perm[i] < n, "perm: entry ", i, " = ", perm[i], " out of [0, N)");
}

}  // namespace

at::Tensor base_forward(const at::Tensor& xc, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, int64_t d_out) {
  const auto cdt = xc.scalar_type();
  const bool has_bias = bias.has_value() && bias->defined();
  if (weight.has_value() && weight->defined()) {
    const auto w = weight->to(cdt);
    return has_bias ? at::addmm(bias->to(cdt), xc, w.t()) : at::mm(xc, w.t());
  }
  auto y = at::zeros({xc.size(0), d_out}, xc.options());
  if (has_bias) y.add_(bias->to(cdt));
  return y;
}

at::Tensor base_grad_x(const at::Tensor& gy, const std::optional<at::Tensor>& weight,
                       int64_t d_in) {
  if (weight.has_value() && weight->defined()) return at::mm(gy, weight->to(gy.scalar_type()));
  return at::zeros({gy.size(0), d_in}, gy.options());
}

std::tuple<at::Tensor, at::Tensor> hard_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling,
    const at::Tensor& perm, const at::Tensor& offsets) {
  const auto cdt = compute_dtype(x);
  const int64_t n = x.size(0), t_count = lora_a.size(0), rank = lora_a.size(1);
  const int64_t d_in = x.size(1), d_out = lora_b.size(1);
  auto xc = x.to(cdt).contiguous();
  auto shrink = at::zeros({n, rank}, xc.options());
  auto off_t = offsets.to(at::kLong).contiguous();
  auto perm_t = perm.to(at::kLong).contiguous();
  const int64_t* off = off_t.data_ptr<int64_t>();
  const int64_t* pp = perm_t.data_ptr<int64_t>();
  TORCH_CHECK(perm.numel() == n && offsets.numel() == t_count + 1, "perm/offsets: plan shape");
  check_plan(off, t_count, pp, n);
  if (off[t_count] == 0) return {base_forward(xc, weight, bias, d_out).to(x.scalar_type()), shrink};
  auto a = lora_a.to(cdt).contiguous();
  auto b = lora_b.to(cdt).contiguous();
  auto s = scaling.to(at::kDouble).contiguous();
  const double* sp = s.data_ptr<double>();
  auto y = at::empty({n, d_out}, xc.options());
  AT_DISPATCH_FLOATING_TYPES(cdt, "hard_fwd_cpu", [&] {
    auto xs = at::empty({n, d_in}, xc.options());  // [N, D_in], plan order
    gather_rows<scalar_t>(xc, pp, n, xs);
    auto ys = base_forward(xs, weight, bias, d_out).contiguous();  // [N, D_out], plan order
    for (int64_t t = 0; t < t_count; ++t) {
      const int64_t rows = off[t + 1] - off[t];
      if (rows == 0) continue;
      auto s_t = shrink.narrow(0, off[t], rows);  // [rows, R]
      at::mm_out(s_t, xs.narrow(0, off[t], rows), a[t].t());
      ys.narrow(0, off[t], rows).addmm_(s_t, b[t].t(), 1.0, sp[t]);  // += s S B^T
    }
    scatter_rows<scalar_t>(y, pp, n, ys);
  });
  return {y.to(x.scalar_type()), shrink};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hard_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling,
    const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& shrink) {
  const auto cdt = compute_dtype(x);
  const int64_t t_count = lora_a.size(0), rank = lora_a.size(1);
  const int64_t d_in = x.size(1), d_out = lora_b.size(1);
  const int64_t n = x.size(0);
  auto gy = grad_y.to(cdt).contiguous();
  auto grad_a = at::zeros({t_count, rank, d_in}, gy.options());
  auto grad_b = at::zeros({t_count, d_out, rank}, gy.options());
  auto off_t = offsets.to(at::kLong).contiguous();
  auto perm_t = perm.to(at::kLong).contiguous();
  const int64_t* off = off_t.data_ptr<int64_t>();
  const int64_t* pp = perm_t.data_ptr<int64_t>();
  TORCH_CHECK(perm.numel() == n && offsets.numel() == t_count + 1, "perm/offsets: plan shape");
  check_plan(off, t_count, pp, n);
  at::Tensor grad_x;
  if (off[t_count] == 0) {
    grad_x = base_grad_x(gy, weight, d_in);
  } else {
    auto xc = x.to(cdt).contiguous();
    auto sh = shrink.to(cdt).contiguous();
    auto a = lora_a.to(cdt).contiguous();
    auto b = lora_b.to(cdt).contiguous();
    auto s = scaling.to(at::kDouble).contiguous();
    const double* sp = s.data_ptr<double>();
    const int64_t routed = off[t_count];
    grad_x = at::empty({n, d_in}, gy.options());
    AT_DISPATCH_FLOATING_TYPES(cdt, "hard_bwd_cpu", [&] {
      auto dys = at::empty({n, d_out}, gy.options());    // [N, D_out], plan order
      auto xs = at::empty({routed, d_in}, gy.options());  // [routed, D_in]
      gather_rows<scalar_t>(gy, pp, n, dys);
      gather_rows<scalar_t>(xc, pp, routed, xs);
      auto dxs = base_grad_x(dys, weight, d_in).contiguous();  // [N, D_in], plan order
      for (int64_t t = 0; t < t_count; ++t) {
        const int64_t rows = off[t + 1] - off[t];
        if (rows == 0) continue;
        auto dy_t = dys.narrow(0, off[t], rows);
        auto s_t = sh.narrow(0, off[t], rows);                 // [rows, R]
        auto gb_t = grad_b[t];
        at::mm_out(gb_t, dy_t.t(), s_t);                       // dB = s dy^T S
        gb_t.mul_(sp[t]);
        auto ds = at::mm(dy_t, b[t]).mul_(sp[t]);              // dS = s dy B  [rows, R]
        auto ga_t = grad_a[t];
        at::mm_out(ga_t, ds.t(), xs.narrow(0, off[t], rows));  // dA = dS^T x
        dxs.narrow(0, off[t], rows).addmm_(ds, a[t]);          // dx += dS A
      }
      scatter_rows<scalar_t>(grad_x, pp, n, dxs);
    });
  }
  return {grad_x.to(x.scalar_type()), grad_a.to(lora_a.scalar_type()),
          grad_b.to(lora_b.scalar_type())};
}

}  // namespace mftk
