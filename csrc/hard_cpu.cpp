// Hard routing on CPU: each token goes to its own task's adapter.
//   y[n] = x[n] W^T + b + s[t] (x[n] A[t]^T) B[t]^T,   t = task_ids[n]
// The plan orders all N tokens by task (base-only last), so each task is a contiguous range of
// plan rows. The forward is ONE parallel region over a list of (task, row block, column block)
// tiles, handed out dynamically (an atomic counter), so a thread that the OS deschedules under
// load does not hold the others at a barrier per GEMM. A tile gathers its rows into a
// thread-local block, multiplies it against W and the task's adapter while the block is in
// cache, and writes its y (grad_x) rows once. The backward does the same for dS and grad_x, then
// a second region of units that each own one (task, column chunk) block of dA or dB. The GEMMs
// inside a tile run single-threaded (nested in the region). Tiny problems run inline.
#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <c10/core/ScalarType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_blas.h"
#include "cpu_tiles.h"
#include "mftk.h"

namespace mftk {

// Distinct threads that entered one at::parallel_for region of at::get_num_threads() chunks (the
// tiles' region). 1 with more threads set means the build dropped OpenMP (no -fopenmp).
int64_t parallel_threads_cpu() {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<std::atomic<int>> seen(threads);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    seen[std::min<int64_t>(at::get_thread_num(), threads - 1)].store(1);
  });
  int64_t count = 0;
  for (const auto& s : seen) count += s.load();
  return count;
}

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
  auto off_t = offsets.to(at::kLong).contiguous();
  auto perm_t = perm.to(at::kLong).contiguous();
  check_plan(perm_t, off_t, t_count, n);
  const int64_t* off = off_t.data_ptr<int64_t>();
  const int64_t* pp = perm_t.data_ptr<int64_t>();
  auto shrink = at::zeros({n, rank}, xc.options());  // plan order
  if (off[t_count] == 0 || n == 0)
    return {base_forward(xc, weight, bias, d_out).to(x.scalar_type()), shrink};
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  auto w = has_w ? weight->to(cdt).contiguous() : at::Tensor();  // [D_out, D_in]
  auto bias_c = has_b ? bias->to(cdt).contiguous() : at::Tensor();
  auto a = lora_a.to(cdt).contiguous();  // [T, R, D_in]
  auto b = lora_b.to(cdt).contiguous();  // [T, D_out, R]
  auto s = scaling.to(at::kDouble).contiguous();
  const double* sp = s.data_ptr<double>();
  if (n * d_in * d_out < kSerialMacs) {
    // Tiny: the base is ATen's own linear over all rows (bit-identical to nn.Linear, so B = 0
    // gives the base exactly), then each task's rows get s S B^T added; no tiles, no region.
    auto y0 = base_forward(xc, weight, bias, d_out).contiguous();
    const int64_t routed = off[t_count];
    auto xs = at::empty({routed, d_in}, xc.options());  // routed rows, plan order
    auto delta = at::empty({routed, d_out}, xc.options());
    AT_DISPATCH_FLOATING_TYPES(cdt, "hard_fwd_cpu_small", [&] {
      SerialBlas serial;
      gather(xs.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), d_in, pp, routed, 0, d_in);
      const scalar_t* ap = a.data_ptr<scalar_t>();
      const scalar_t* bp = b.data_ptr<scalar_t>();
      for (int64_t t = 0; t < t_count; ++t) {
        const int64_t rows = off[t + 1] - off[t];
        if (rows == 0) continue;
        scalar_t* sp_t = shrink.data_ptr<scalar_t>() + off[t] * rank;
        gemm<scalar_t>(false, true, rows, rank, d_in, 1, xs.data_ptr<scalar_t>() + off[t] * d_in,
                       d_in, ap + t * rank * d_in, d_in, 0, sp_t, rank);
        gemm<scalar_t>(false, true, rows, d_out, rank, static_cast<scalar_t>(sp[t]), sp_t, rank,
                       bp + t * d_out * rank, rank, 0,
                       delta.data_ptr<scalar_t>() + off[t] * d_out, d_out);
      }
      scalar_t* yp = y0.data_ptr<scalar_t>();
      const scalar_t* dp = delta.data_ptr<scalar_t>();
      for (int64_t i = 0; i < routed; ++i)
        for (int64_t c = 0; c < d_out; ++c) yp[pp[i] * d_out + c] += dp[i * d_out + c];
    });
    return {y0.to(x.scalar_type()), shrink};
  }
  auto y = at::empty({n, d_out}, xc.options());

  const int64_t threads = choose_threads(n, d_in, d_out);
  const auto tiles = make_tiles(off, t_count, n, d_out, threads);
  const int64_t bn = tiles.front().cols;
  auto opt = xc.options();
  // Per thread slot: x block [bm, D_in], y chunk [bm, chunk], shrink block [bm, R].
  auto xbuf = at::empty({threads, kRowBlock, d_in}, opt);
  auto ybuf = at::empty({threads, kRowBlock, std::min(bn, kColChunk)}, opt);
  auto sbuf = at::empty({threads, kRowBlock, rank}, opt);
  AT_DISPATCH_FLOATING_TYPES(cdt, "hard_fwd_cpu", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* wp = has_w ? w.data_ptr<scalar_t>() : nullptr;
    const scalar_t* biasp = has_b ? bias_c.data_ptr<scalar_t>() : nullptr;
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* shp = shrink.data_ptr<scalar_t>();
    run_tiles(static_cast<int64_t>(tiles.size()), threads, [&](int64_t i, int64_t slot) {
      const Tile& tl = tiles[i];
      const int64_t* idx = pp + tl.row0;
      scalar_t* xb_p = xbuf.data_ptr<scalar_t>() + slot * kRowBlock * d_in;
      scalar_t* yb_p = ybuf.data_ptr<scalar_t>() + slot * kRowBlock * std::min(bn, kColChunk);
      gather(xb_p, xp, d_in, idx, tl.rows, 0, d_in);
      const int64_t rows = tl.rows, t = tl.task;
      scalar_t* sb_p = nullptr;
      if (t >= 0) {
        // S = x_blk A_t^T [rows, R], once per tile; the first column block keeps it (plan order)
        // for the backward.
        sb_p = tl.col0 == 0 ? shp + tl.row0 * rank
                            : sbuf.data_ptr<scalar_t>() + slot * kRowBlock * rank;
        gemm<scalar_t>(false, true, rows, rank, d_in, 1, xb_p, d_in, ap + t * rank * d_in, d_in,
                       0, sb_p, rank);
      }
      // Column chunks small enough that the y chunk stays in L2 while base, adapter and the
      // row copy touch it.
      for (int64_t c0 = tl.col0; c0 < tl.col0 + tl.cols; c0 += kColChunk) {
        const int64_t cols = std::min(kColChunk, tl.col0 + tl.cols - c0);
        for (int64_t r = 0; r < rows; ++r) {  // the y chunk starts as the bias (or zeros)
          scalar_t* yr = yb_p + r * cols;
          if (has_b) {
            std::memcpy(yr, biasp + c0, cols * sizeof(scalar_t));
          } else {
            std::fill(yr, yr + cols, scalar_t(0));
          }
        }
        if (has_w)  // y += x_blk W[c0 : c0 + cols]^T     [rows, cols]
          gemm<scalar_t>(false, true, rows, cols, d_in, 1, xb_p, d_in, wp + c0 * d_in, d_in, 1,
                         yb_p, cols);
        if (t >= 0)  // y += s_t S B_t[c0 : c0 + cols]^T
          gemm<scalar_t>(false, true, rows, cols, rank, static_cast<scalar_t>(sp[t]), sb_p, rank,
                         bp + (t * d_out + c0) * rank, rank, 1, yb_p, cols);
        scatter(yp, d_out, yb_p, idx, rows, c0, cols);
      }
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
  const int64_t n = x.size(0);
  auto gy = grad_y.to(cdt).contiguous();
  auto grad_a = at::zeros({t_count, rank, d_in}, gy.options());
  auto grad_b = at::zeros({t_count, d_out, rank}, gy.options());
  auto off_t = offsets.to(at::kLong).contiguous();
  auto perm_t = perm.to(at::kLong).contiguous();
  check_plan(perm_t, off_t, t_count, n);
  const int64_t* off = off_t.data_ptr<int64_t>();
  const int64_t* pp = perm_t.data_ptr<int64_t>();
  expect(shrink, {n, rank}, "shrink");
  if (off[t_count] == 0 || n == 0) {
    return {base_grad_x(gy, weight, d_in).to(x.scalar_type()), grad_a.to(lora_a.scalar_type()),
            grad_b.to(lora_b.scalar_type())};
  }
  const bool has_w = weight.has_value() && weight->defined();
  auto w = has_w ? weight->to(cdt).contiguous() : at::Tensor();  // [D_out, D_in]
  auto xc = x.to(cdt).contiguous();
  auto sh = shrink.to(cdt).contiguous();  // [N, R], plan order
  auto a = lora_a.to(cdt).contiguous();
  auto b = lora_b.to(cdt).contiguous();
  auto s = scaling.to(at::kDouble).contiguous();
  const double* sp = s.data_ptr<double>();
  auto grad_x = at::empty({n, d_in}, gy.options());

  const int64_t threads = choose_threads(n, d_in, d_out);
  const auto tiles = make_tiles(off, t_count, n, d_in, threads);
  auto opt = gy.options();
  // Region 1, per tile: dS = s dy B_t and the dx rows. Per thread slot: dy block [bm, D_out], dx
  // chunk [bm, chunk], dS [bm, R]; dS of every routed row is kept (plan order) for region 2.
  auto dybuf = at::empty({threads, kRowBlock, d_out}, opt);
  auto dxbuf = at::empty({threads, kRowBlock, kColChunk}, opt);
  auto dsbuf = at::empty({threads, kRowBlock, rank}, opt);
  auto ds_all = at::empty({off[t_count], rank}, opt);
  // Region 2, one unit per (task, 256-column chunk) of dA and of dB: the unit owns that block of
  // the gradient and adds its task's row blocks into it in order, so no partial sums are kept
  // (no scratch that grows with N) and the thread count changes no bit. Costs one more gathered
  // read of dy.
  struct Unit {
    int64_t task, col0;
    bool db;
  };
  std::vector<Unit> units;
  for (int64_t t = 0; t < t_count; ++t) {
    if (off[t + 1] == off[t]) continue;
    for (int64_t c = 0; c < d_in; c += kColChunk) units.push_back({t, c, false});
    for (int64_t c = 0; c < d_out; c += kColChunk) units.push_back({t, c, true});
  }
  auto cbuf = at::empty({threads, kRowBlock, kColChunk}, opt);
  AT_DISPATCH_FLOATING_TYPES(cdt, "hard_bwd_cpu", [&] {
    const scalar_t* dyp = gy.data_ptr<scalar_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* wp = has_w ? w.data_ptr<scalar_t>() : nullptr;
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    const scalar_t* shp = sh.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* dsp = ds_all.data_ptr<scalar_t>();
    run_tiles(static_cast<int64_t>(tiles.size()), threads, [&](int64_t i, int64_t slot) {
      const Tile& tl = tiles[i];
      const int64_t* idx = pp + tl.row0;
      scalar_t* dyb_p = dybuf.data_ptr<scalar_t>() + slot * kRowBlock * d_out;
      scalar_t* dxb_p = dxbuf.data_ptr<scalar_t>() + slot * kRowBlock * kColChunk;
      gather(dyb_p, dyp, d_out, idx, tl.rows, 0, d_out);
      const int64_t rows = tl.rows, t = tl.task;
      // dS = s dy B_t   [rows, R], once per tile; the first column block keeps it
      scalar_t* ds_p = tl.col0 == 0 && t >= 0
                           ? dsp + tl.row0 * rank
                           : dsbuf.data_ptr<scalar_t>() + slot * kRowBlock * rank;
      if (t >= 0)
        gemm<scalar_t>(false, false, rows, rank, d_out, static_cast<scalar_t>(sp[t]), dyb_p, d_out,
                       bp + t * d_out * rank, rank, 0, ds_p, rank);
      // Column chunks of D_in: the dx chunk stays in L2 for base, adapter and the row copy.
      for (int64_t c0 = tl.col0; c0 < tl.col0 + tl.cols; c0 += kColChunk) {
        const int64_t cols = std::min(kColChunk, tl.col0 + tl.cols - c0);
        if (has_w) {  // dx = dy W[:, c0 : c0 + cols]     [rows, cols]
          gemm<scalar_t>(false, false, rows, cols, d_out, 1, dyb_p, d_out, wp + c0, d_in, 0,
                         dxb_p, cols);
        } else {
          std::fill(dxb_p, dxb_p + rows * cols, scalar_t(0));
        }
        if (t >= 0)  // dx += dS A_t[:, c0 : c0 + cols]
          gemm<scalar_t>(false, false, rows, cols, rank, 1, ds_p, rank, ap + t * rank * d_in + c0,
                         d_in, 1, dxb_p, cols);
        scatter(gxp, d_in, dxb_p, idx, rows, c0, cols);
      }
    });
    run_tiles(static_cast<int64_t>(units.size()), threads, [&](int64_t u, int64_t slot) {
      const Unit& un = units[u];
      const int64_t t = un.task, c0 = un.col0;
      const int64_t cols = std::min(kColChunk, (un.db ? d_out : d_in) - c0);
      scalar_t* cb = cbuf.data_ptr<scalar_t>() + slot * kRowBlock * kColChunk;
      for (int64_t r0 = off[t]; r0 < off[t + 1]; r0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, off[t + 1] - r0);
        if (un.db) {  // dB_t[c0 : c0 + cols] += s dy_blk[:, cols]^T S_blk   [cols, R]
          gather(cb, dyp, d_out, pp + r0, rows, c0, cols);
          gemm<scalar_t>(true, false, cols, rank, rows, static_cast<scalar_t>(sp[t]), cb, cols,
                         shp + r0 * rank, rank, 1,
                         grad_b.data_ptr<scalar_t>() + (t * d_out + c0) * rank, rank);
        } else {  // dA_t[:, c0 : c0 + cols] += dS_blk^T x_blk[:, cols]   [R, cols]
          gather(cb, xp, d_in, pp + r0, rows, c0, cols);
          gemm<scalar_t>(true, false, rank, cols, rows, 1, dsp + r0 * rank, rank, cb, cols, 1,
                         grad_a.data_ptr<scalar_t>() + t * rank * d_in + c0, d_in);
        }
      }
    });
  });
  return {grad_x.to(x.scalar_type()), grad_a.to(lora_a.scalar_type()),
          grad_b.to(lora_b.scalar_type())};
}

}  // namespace mftk
