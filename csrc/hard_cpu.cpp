// Hard routing on CPU: each token goes to its own task's adapter.
//   y[n] = x[n] W^T + b + s[t] (x[n] A[t]^T) B[t]^T,   t = task_ids[n]
// The plan lists each task's tokens as a contiguous range of perm, cut here into blocks of at most
// kBlock rows of one task. Blocks run in parallel: each gathers its rows of x (and grad_y) into a
// small cache-resident buffer, runs the rank-R GEMMs on it and adds the result straight into its
// token rows of y (or grad_x) -- rows of different blocks are distinct, so there are no races and
// no full-size gathered copies. dA and dB are per-block partials summed per task in block order,
// so the result does not depend on the thread count.
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "mftk.h"

namespace mftk {

namespace {

constexpr int64_t kBlock = 128;

struct Block {
  int64_t task, row0, rows;  // rows row0 .. row0 + rows of the plan, all of one task
};

std::vector<Block> plan_blocks(const int64_t* off, int64_t t_count) {
  std::vector<Block> blocks;
  for (int64_t t = 0; t < t_count; ++t)
    for (int64_t r0 = off[t]; r0 < off[t + 1]; r0 += kBlock)
      blocks.push_back({t, r0, std::min(kBlock, off[t + 1] - r0)});
  return blocks;
}

// Calls fn(k) for k in [0, n), blocks handed out one at a time from a shared counter: on a busy
// machine a thread that is descheduled holds back one block, not a static half of the work
// (static halves ran 2-4x slower on a loaded 2-core machine, the idle thread spinning meanwhile).
template <typename F>
void parallel_blocks(int64_t n, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t k = next.fetch_add(1); k < n; k = next.fetch_add(1)) fn(k);
  });
}

// out[i] = src[idx[i]] for i < rows.   src: [N, D] contiguous; out: [rows, D]
template <typename scalar_t>
void gather_rows(const at::Tensor& src, const int64_t* idx, int64_t rows, at::Tensor& out) {
  const int64_t d = src.size(1);
  const scalar_t* s = src.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  for (int64_t i = 0; i < rows; ++i) std::memcpy(o + i * d, s + idx[i] * d, d * sizeof(scalar_t));
}

// dst[idx[i]] += src[i] for i < rows.
template <typename scalar_t>
void scatter_add_rows(at::Tensor& dst, const int64_t* idx, int64_t rows, const at::Tensor& src) {
  const int64_t d = dst.size(1);
  scalar_t* o = dst.data_ptr<scalar_t>();
  const scalar_t* s = src.data_ptr<scalar_t>();
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* orow = o + idx[i] * d;
    const scalar_t* srow = s + i * d;
    for (int64_t j = 0; j < d; ++j) orow[j] += srow[j];
  }
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
  auto y = base_forward(xc, weight, bias, d_out).contiguous();
  auto shrink = at::zeros({n, rank}, xc.options());
  auto off_t = offsets.to(at::kLong).contiguous();
  auto perm_t = perm.to(at::kLong).contiguous();
  const int64_t* off = off_t.data_ptr<int64_t>();
  const int64_t* pp = perm_t.data_ptr<int64_t>();
  TORCH_CHECK(perm.numel() == n && offsets.numel() == t_count + 1, "perm/offsets: plan shape");
  check_plan(off, t_count, pp, n);
  if (off[t_count] == 0) return {y.to(x.scalar_type()), shrink};
  auto a = lora_a.to(cdt).contiguous();
  auto b = lora_b.to(cdt).contiguous();
  auto s = scaling.to(at::kDouble).contiguous();
  const double* sp = s.data_ptr<double>();
  const auto blocks = plan_blocks(off, t_count);
  AT_DISPATCH_FLOATING_TYPES(cdt, "hard_fwd_cpu", [&] {
    parallel_blocks(blocks.size(), [&](int64_t k) {
      const auto& blk = blocks[k];
      auto xk = at::empty({blk.rows, d_in}, xc.options());  // [rows, D_in]
      gather_rows<scalar_t>(xc, pp + blk.row0, blk.rows, xk);
      auto s_k = shrink.narrow(0, blk.row0, blk.rows);  // [rows, R], plan order
      at::mm_out(s_k, xk, a[blk.task].t());
      auto yk = at::mm(s_k * sp[blk.task], b[blk.task].t());  // [rows, D_out]
      scatter_add_rows<scalar_t>(y, pp + blk.row0, blk.rows, yk);
    });
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
  auto gy = grad_y.to(cdt).contiguous();
  auto grad_x = base_grad_x(gy, weight, d_in).contiguous();
  auto grad_a = at::zeros({t_count, rank, d_in}, gy.options());
  auto grad_b = at::zeros({t_count, d_out, rank}, gy.options());
  auto off_t = offsets.to(at::kLong).contiguous();
  auto perm_t = perm.to(at::kLong).contiguous();
  const int64_t* off = off_t.data_ptr<int64_t>();
  const int64_t* pp = perm_t.data_ptr<int64_t>();
  TORCH_CHECK(perm.numel() == x.size(0) && offsets.numel() == t_count + 1, "perm/offsets: shape");
  check_plan(off, t_count, pp, x.size(0));
  if (off[t_count] > 0) {
    auto xc = x.to(cdt).contiguous();
    auto sh = shrink.to(cdt).contiguous();
    auto a = lora_a.to(cdt).contiguous();
    auto b = lora_b.to(cdt).contiguous();
    auto s = scaling.to(at::kDouble).contiguous();
    const double* sp = s.data_ptr<double>();
    const auto blocks = plan_blocks(off, t_count);
    const int64_t nb = blocks.size();
    auto part_a = at::empty({nb, rank, d_in}, gy.options());   // per-block dA
    auto part_b = at::empty({nb, d_out, rank}, gy.options());  // per-block dB
    AT_DISPATCH_FLOATING_TYPES(cdt, "hard_bwd_cpu", [&] {
      parallel_blocks(nb, [&](int64_t k) {
        const auto& blk = blocks[k];
        const int64_t t = blk.task;
        auto dyk = at::empty({blk.rows, d_out}, gy.options());  // [rows, D_out]
        auto xk = at::empty({blk.rows, d_in}, gy.options());    // [rows, D_in]
        gather_rows<scalar_t>(gy, pp + blk.row0, blk.rows, dyk);
        gather_rows<scalar_t>(xc, pp + blk.row0, blk.rows, xk);
        auto s_k = sh.narrow(0, blk.row0, blk.rows);  // [rows, R]
        auto pb = part_b[k];
        at::mm_out(pb, dyk.t(), s_k);  // dB = s dy^T S
        pb.mul_(sp[t]);
        auto ds = at::mm(dyk, b[t]).mul_(sp[t]);  // dS = s dy B   [rows, R]
        auto pa = part_a[k];
        at::mm_out(pa, ds.t(), xk);  // dA = dS^T x
        scatter_add_rows<scalar_t>(grad_x, pp + blk.row0, blk.rows, at::mm(ds, a[t]));
      });
    });
    // Blocks of a task are consecutive: sum their partials in block order.
    for (int64_t k0 = 0, t = 0; t < t_count; ++t) {
      int64_t k1 = k0;
      while (k1 < nb && blocks[k1].task == t) ++k1;
      if (k1 > k0) {
        auto ga = grad_a[t];
        auto gb = grad_b[t];
        at::sum_out(ga, part_a.narrow(0, k0, k1 - k0), {0});
        at::sum_out(gb, part_b.narrow(0, k0, k1 - k0), {0});
      }
      k0 = k1;
    }
  }
  return {grad_x.to(x.scalar_type()), grad_a.to(lora_a.scalar_type()),
          grad_b.to(lora_b.scalar_type())};
}

}  // namespace mftk
