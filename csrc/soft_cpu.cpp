// Soft routing on CPU: a learned softmax router blends all adapters per token.
//   p = softmax(topk_mask((x Wr^T + br) / temperature))
//   y = x W^T + b + sum_t p[:, t] s[t] (x A[t]^T) B[t]^T
// It is a rank T*R LoRA with per-token column scaling. Small problems run it as whole-batch ATen
// GEMMs (soft_*_aten); larger ones as parallel regions over row tiles (soft_*_cpu below), each
// tile doing its GEMMs while its rows are in cache and writing its y (grad_x) rows once; the
// backward's weight gradients come from a second region of column-owning units.
#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/softmax.h>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <limits>

#include "cpu_blas.h"
#include "cpu_tiles.h"
#include "mftk.h"

namespace mftk {

namespace {

// (N, T*R) per-column coefficient p[n, t] * s[t].
at::Tensor column_coef(const at::Tensor& probs, const at::Tensor& scaling, int64_t rank) {
  return (probs * scaling.to(probs.scalar_type())).repeat_interleave(rank, 1);
}

// softmax(top_k_mask(logits / temperature)) for rows of raw logits (router bias included).
at::Tensor router_probs(const at::Tensor& logits, double temperature, int64_t top_k) {
  const int64_t t_count = logits.size(1);
  auto z = logits / temperature;
  if (top_k > 0 && top_k < t_count) {
    auto kept = std::get<1>(z.topk(top_k, -1));
    auto drop = at::ones_like(z, z.options().dtype(at::kBool)).scatter_(-1, kept, false);
    z = z.masked_fill(drop, -std::numeric_limits<double>::infinity());
  }
  return at::softmax(z, -1);
}

// [A_cat ; Wr] (T*R + T, D_in): the shrink and the router logits in one GEMM over x.
at::Tensor stacked_a(const at::Tensor& lora_a, const at::Tensor& router_weight,
                     at::ScalarType cdt) {
  const int64_t tr = lora_a.size(0) * lora_a.size(1);
  return at::cat({lora_a.to(cdt).reshape({tr, lora_a.size(2)}), router_weight.to(cdt)}, 0)
      .contiguous();
}

// B_cat (D_out, T*R): column (t, r) is B_t[:, r].
at::Tensor stacked_b(const at::Tensor& lora_b, at::ScalarType cdt) {
  const int64_t t_count = lora_b.size(0), d_out = lora_b.size(1), rank = lora_b.size(2);
  return lora_b.to(cdt).permute({1, 0, 2}).reshape({d_out, t_count * rank}).contiguous();
}

// The backward's outputs from grad_x, [dA ; dWr] (T*R + T, D_in), dB_cat (D_out, T*R) and dbr,
// in the inputs' dtypes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_grads(
    const at::Tensor& x, const at::Tensor& grad_x, const at::Tensor& grad_ar,
    const at::Tensor& grad_b_cat, const at::Tensor& grad_rb, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& router_weight) {
  const int64_t t_count = lora_a.size(0), rank = lora_a.size(1), tr = t_count * rank;
  auto grad_a = grad_ar.narrow(0, 0, tr).reshape({t_count, rank, lora_a.size(2)});
  auto grad_rw = grad_ar.narrow(0, tr, t_count).clone();  // outputs must not alias
  auto grad_b =
      grad_b_cat.reshape({lora_b.size(1), t_count, rank}).permute({1, 0, 2}).contiguous();
  return {grad_x.to(x.scalar_type()), grad_a.to(lora_a.scalar_type()),
          grad_b.to(lora_b.scalar_type()), grad_rw.to(router_weight.scalar_type()),
          grad_rb.to(router_weight.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_fwd_aten(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_bias,
    double temperature, int64_t top_k) {
  const auto cdt = compute_dtype(x);
  const int64_t t_count = lora_a.size(0), rank = lora_a.size(1), d_out = lora_b.size(1);
  const int64_t tr = t_count * rank;
  auto xc = x.to(cdt).contiguous();
  // One pass over x for the shrink and the router: x [A_cat ; Wr]^T = [S | logits]   [N, T*R + T]
  auto s_l = at::mm(xc, stacked_a(lora_a, router_weight, cdt).t());
  auto shrink = s_l.narrow(1, 0, tr).contiguous();  // [N, T*R]
  auto logits = s_l.narrow(1, tr, t_count);          // [N, T]
  if (router_bias.has_value() && router_bias->defined()) logits = logits + router_bias->to(cdt);
  auto probs = router_probs(logits, temperature, top_k);
  auto h = shrink * column_coef(probs, scaling, rank);
  auto y = base_forward(xc, weight, bias, d_out);
  y.addmm_(h, stacked_b(lora_b, cdt).t());
  return {y.to(x.scalar_type()), logits.to(x.scalar_type()).contiguous(), probs, shrink};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_bwd_aten(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_logits, const at::Tensor& x,
    const std::optional<at::Tensor>& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& scaling, const at::Tensor& router_weight, const at::Tensor& probs,
    const at::Tensor& shrink, double temperature) {
  const auto cdt = compute_dtype(x);
  const int64_t n = x.size(0), t_count = lora_a.size(0), rank = lora_a.size(1);
  const int64_t d_in = x.size(1), d_out = lora_b.size(1);
  auto xc = x.to(cdt).contiguous();
  auto dy = grad_y.to(cdt).contiguous();
  auto p = probs.to(cdt);
  auto sh = shrink.to(cdt);
  auto sc = scaling.to(cdt);
  auto b_cat = stacked_b(lora_b, cdt);
  auto coef = column_coef(p, sc, rank);
  auto dh = at::mm(dy, b_cat);                                     // [N, T*R]
  auto grad_b_cat = at::mm(dy.t(), sh * coef);                     // [D_out, T*R]
  auto dp = (dh * sh).reshape({n, t_count, rank}).sum(-1) * sc;   // [N, T]
  auto dz = p * (dp - (p * dp).sum(-1, true));                     // softmax backward
  auto dlogits = dz / temperature;
  if (grad_logits.has_value() && grad_logits->defined()) dlogits = dlogits + grad_logits->to(cdt);
  auto ds = dh * coef;                                             // [N, T*R]
  // [dS | dlogits] against [A_cat ; Wr]: one GEMM each for dx and for the weights' gradients,
  // so x and grad_x are each passed over once.
  auto ds_dl = at::cat({ds, dlogits}, 1);                          // [N, T*R + T]
  auto grad_x = base_grad_x(dy, weight, d_in);
  grad_x.addmm_(ds_dl, stacked_a(lora_a, router_weight, cdt));
  auto grad_ar = at::mm(ds_dl.t(), xc);                            // [T*R + T, D_in]
  return soft_grads(x, grad_x, grad_ar, grad_b_cat, dlogits.sum(0), lora_a, lora_b,
                    router_weight);
}

constexpr int64_t kSoftMaxTiles = 16;  // forward row tiles per call at most
constexpr int64_t kSoftSubRows = 256;  // rows per GEMM inside a tile
constexpr int64_t kUnitCols = 128;     // columns of dB_cat^T or [dA ; dWr] a backward unit owns

struct RowTiles {
  int64_t count, rows;  // `count` tiles of `rows` rows (the last one shorter)
};

// Independent of the thread count, so the result is too.
RowTiles row_tiles(int64_t n) {
  const int64_t want = std::clamp<int64_t>((n + 127) / 128, 1, kSoftMaxTiles);
  const int64_t rows = (n + want - 1) / want;
  return {(n + rows - 1) / rows, rows};
}

// The tiles read through raw pointers: shapes are checked here, not only by the Python entry.
void check_soft(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling,
                const at::Tensor& router_weight) {
  const int64_t t_count = lora_a.size(0), rank = lora_a.size(1), d_in = x.size(1);
  const int64_t d_out = lora_b.size(1);
  expect(lora_a, {t_count, rank, d_in}, "lora_a");
  expect(lora_b, {t_count, d_out, rank}, "lora_b");
  expect(scaling, {t_count}, "scaling");
  expect(router_weight, {t_count, d_in}, "router_weight");
  expect(weight, {d_out, d_in}, "weight");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_bias,
    double temperature, int64_t top_k) {
  const int64_t n = x.size(0), t_count = lora_a.size(0), rank = lora_a.size(1);
  const int64_t d_in = x.size(1), d_out = lora_b.size(1), tr = t_count * rank;
  if (n == 0 || n * d_in * d_out < kSerialMacs)
    return soft_fwd_aten(x, weight, bias, lora_a, lora_b, scaling, router_weight, router_bias,
                         temperature, top_k);
  check_soft(x, weight, lora_a, lora_b, scaling, router_weight);
  expect(bias, {d_out}, "bias");
  expect(router_bias, {t_count}, "router_bias");
  const auto cdt = compute_dtype(x);
  const int64_t ws = tr + t_count;  // [S | logits] width
  auto xc = x.to(cdt).contiguous();
  auto opt = xc.options();
  auto aw = stacked_a(lora_a, router_weight, cdt);
  auto b_cat = stacked_b(lora_b, cdt);
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  const bool has_rb = router_bias.has_value() && router_bias->defined();
  auto w = has_w ? weight->to(cdt).contiguous() : at::Tensor();
  auto bias_c = has_b ? bias->to(cdt).contiguous() : at::Tensor();
  auto rb = has_rb ? router_bias->to(cdt).contiguous() : at::Tensor();
  auto s = scaling.to(at::kDouble).contiguous();
  const double* sp = s.data_ptr<double>();
  auto y = at::empty({n, d_out}, opt);
  auto logits = at::empty({n, t_count}, opt);
  auto probs = at::empty({n, t_count}, opt);
  auto shrink = at::empty({n, tr}, opt);
  const int64_t threads = choose_threads(n, d_in, d_out);
  const RowTiles rt = row_tiles(n);
  auto slbuf = at::empty({threads, kSoftSubRows, ws}, opt);
  auto hbuf = at::empty({threads, kSoftSubRows, tr}, opt);
  AT_DISPATCH_FLOATING_TYPES(cdt, "soft_fwd_cpu", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* awp = aw.data_ptr<scalar_t>();
    const scalar_t* bcp = b_cat.data_ptr<scalar_t>();
    const scalar_t* wp = has_w ? w.data_ptr<scalar_t>() : nullptr;
    const scalar_t* biasp = has_b ? bias_c.data_ptr<scalar_t>() : nullptr;
    const scalar_t* rbp = has_rb ? rb.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* lgp = logits.data_ptr<scalar_t>();
    scalar_t* prp = probs.data_ptr<scalar_t>();
    scalar_t* shp = shrink.data_ptr<scalar_t>();
    run_tiles(rt.count, threads, [&](int64_t i, int64_t slot) {
      scalar_t* sl = slbuf.data_ptr<scalar_t>() + slot * kSoftSubRows * ws;
      scalar_t* h = hbuf.data_ptr<scalar_t>() + slot * kSoftSubRows * tr;
      const int64_t end = std::min(n, (i + 1) * rt.rows);
      for (int64_t r0 = i * rt.rows; r0 < end; r0 += kSoftSubRows) {
        const int64_t m = std::min(kSoftSubRows, end - r0);
        const scalar_t* xb = xp + r0 * d_in;
        // [S | logits] = x_blk [A_cat ; Wr]^T   [m, T*R + T]: one pass over the rows
        gemm<scalar_t>(false, true, m, ws, d_in, 1, xb, d_in, awp, d_in, 0, sl, ws);
        for (int64_t r = 0; r < m; ++r) {
          std::memcpy(shp + (r0 + r) * tr, sl + r * ws, tr * sizeof(scalar_t));
          for (int64_t t = 0; t < t_count; ++t)
            lgp[(r0 + r) * t_count + t] = sl[r * ws + tr + t] + (has_rb ? rbp[t] : scalar_t(0));
        }
        at::from_blob(prp + r0 * t_count, {m, t_count}, opt)
            .copy_(router_probs(at::from_blob(lgp + r0 * t_count, {m, t_count}, opt),
                                temperature, top_k));
        for (int64_t r = 0; r < m; ++r)  // h = S * (p s) per task's columns
          for (int64_t t = 0; t < t_count; ++t) {
            const scalar_t c = prp[(r0 + r) * t_count + t] * static_cast<scalar_t>(sp[t]);
            for (int64_t k = 0; k < rank; ++k)
              h[r * tr + t * rank + k] = shp[(r0 + r) * tr + t * rank + k] * c;
          }
        // y rows in column chunks that stay in L2: b, + x W^T, + h B_cat^T, written once
        for (int64_t c0 = 0; c0 < d_out; c0 += kColChunk) {
          const int64_t cols = std::min(kColChunk, d_out - c0);
          scalar_t* yb = yp + r0 * d_out + c0;
          for (int64_t r = 0; r < m; ++r) {
            if (has_b) {
              std::memcpy(yb + r * d_out, biasp + c0, cols * sizeof(scalar_t));
            } else {
              std::fill(yb + r * d_out, yb + r * d_out + cols, scalar_t(0));
            }
          }
          if (has_w)
            gemm<scalar_t>(false, true, m, cols, d_in, 1, xb, d_in, wp + c0 * d_in, d_in, 1, yb,
                           d_out);
          gemm<scalar_t>(false, true, m, cols, tr, 1, h, tr, bcp + c0 * tr, tr, 1, yb, d_out);
        }
      }
    });
  });
  return {y.to(x.scalar_type()), logits.to(x.scalar_type()), probs, shrink};
}

// Two parallel regions, no per-tile partials: (1) row blocks of kSoftSubRows make dH, the
// router's backward, [dS | dL] and S p s (kept, [N, T*R + T] and [N, T*R]) and write their dx
// rows once; (2) units each own kUnitCols columns of dB_cat^T or of [dA ; dWr] and make them in
// one GEMM over all N rows. Every GEMM has the same shape for any thread count: the same bits.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_bwd_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_logits, const at::Tensor& x,
    const std::optional<at::Tensor>& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& scaling, const at::Tensor& router_weight, const at::Tensor& probs,
    const at::Tensor& shrink, double temperature) {
  const int64_t n = x.size(0), t_count = lora_a.size(0), rank = lora_a.size(1);
  const int64_t d_in = x.size(1), d_out = lora_b.size(1), tr = t_count * rank;
  if (n == 0 || n * d_in * d_out < kSerialMacs)
    return soft_bwd_aten(grad_y, grad_logits, x, weight, lora_a, lora_b, scaling, router_weight,
                         probs, shrink, temperature);
  check_soft(x, weight, lora_a, lora_b, scaling, router_weight);
  expect(grad_y, {n, d_out}, "grad_y");
  expect(grad_logits, {n, t_count}, "grad_logits");
  expect(probs, {n, t_count}, "probs");
  expect(shrink, {n, tr}, "shrink");
  const auto cdt = compute_dtype(x);
  const int64_t ws = tr + t_count;  // [dS | dL] width
  auto xc = x.to(cdt).contiguous();
  auto dy = grad_y.to(cdt).contiguous();
  auto opt = xc.options();
  auto p = probs.to(cdt).contiguous();
  auto sh = shrink.to(cdt).contiguous();
  const bool has_gl = grad_logits.has_value() && grad_logits->defined();
  auto gl = has_gl ? grad_logits->to(cdt).contiguous() : at::Tensor();
  auto aw = stacked_a(lora_a, router_weight, cdt);
  auto b_cat = stacked_b(lora_b, cdt);
  const bool has_w = weight.has_value() && weight->defined();
  auto w = has_w ? weight->to(cdt).contiguous() : at::Tensor();
  auto s = scaling.to(at::kDouble).contiguous();
  const double* sp = s.data_ptr<double>();
  auto grad_x = at::empty({n, d_in}, opt);
  const int64_t threads = choose_threads(n, d_in, d_out);
  const int64_t blocks = (n + kSoftSubRows - 1) / kSoftSubRows;
  auto g_all = at::empty({n, ws}, opt);  // [dS | dL]
  auto hs_all = at::empty({n, tr}, opt);  // S p s
  auto dhbuf = at::empty({threads, kSoftSubRows, tr}, opt);
  auto grad_b_cat = at::empty({d_out, tr}, opt);
  auto grad_ar = at::empty({ws, d_in}, opt);
  auto grad_rb = at::empty({t_count}, opt);
  AT_DISPATCH_FLOATING_TYPES(cdt, "soft_bwd_cpu", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* shp = sh.data_ptr<scalar_t>();
    const scalar_t* glp = has_gl ? gl.data_ptr<scalar_t>() : nullptr;
    const scalar_t* awp = aw.data_ptr<scalar_t>();
    const scalar_t* bcp = b_cat.data_ptr<scalar_t>();
    const scalar_t* wp = has_w ? w.data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* gap = g_all.data_ptr<scalar_t>();
    scalar_t* hap = hs_all.data_ptr<scalar_t>();
    const scalar_t inv_temp = static_cast<scalar_t>(1.0 / temperature);
    run_tiles(blocks, threads, [&](int64_t i, int64_t slot) {
      scalar_t* dh = dhbuf.data_ptr<scalar_t>() + slot * kSoftSubRows * tr;
      const int64_t r0 = i * kSoftSubRows, m = std::min(kSoftSubRows, n - r0);
      const scalar_t* dyb = dyp + r0 * d_out;
      scalar_t* g = gap + r0 * ws;
      scalar_t* hs = hap + r0 * tr;
      // dH = dy_blk B_cat   [m, T*R]
      gemm<scalar_t>(false, false, m, tr, d_out, 1, dyb, d_out, bcp, tr, 0, dh, tr);
      for (int64_t r = 0; r < m; ++r) {
        const scalar_t* pr = pp + (r0 + r) * t_count;
        const scalar_t* shr = shp + (r0 + r) * tr;
        scalar_t* gr = g + r * ws;
        scalar_t pdp = 0;
        for (int64_t t = 0; t < t_count; ++t) {  // dp = s sum_k dH S, then sum_t p dp
          const scalar_t st = static_cast<scalar_t>(sp[t]), c = pr[t] * st;
          scalar_t acc = 0;
          for (int64_t k = 0; k < rank; ++k) {
            const int64_t j = t * rank + k;
            acc += dh[r * tr + j] * shr[j];
            hs[r * tr + j] = shr[j] * c;
            gr[j] = dh[r * tr + j] * c;  // dS = dH p s
          }
          gr[tr + t] = acc * st;
          pdp += pr[t] * gr[tr + t];
        }
        for (int64_t t = 0; t < t_count; ++t) {  // softmax backward, then dL
          scalar_t dl = pr[t] * (gr[tr + t] - pdp) * inv_temp;
          if (has_gl) dl += glp[(r0 + r) * t_count + t];
          gr[tr + t] = dl;
        }
      }
      // dx rows in column chunks: dy W + [dS | dL] [A_cat ; Wr], written once
      for (int64_t c0 = 0; c0 < d_in; c0 += kColChunk) {
        const int64_t cols = std::min(kColChunk, d_in - c0);
        scalar_t* dxb = gxp + r0 * d_in + c0;
        if (has_w) {
          gemm<scalar_t>(false, false, m, cols, d_out, 1, dyb, d_out, wp + c0, d_in, 0, dxb, d_in);
        } else {
          for (int64_t r = 0; r < m; ++r) std::fill(dxb + r * d_in, dxb + r * d_in + cols, 0);
        }
        gemm<scalar_t>(false, false, m, cols, ws, 1, g, ws, awp + c0, d_in, 1, dxb, d_in);
      }
    });
    const int64_t b_units = (d_out + kUnitCols - 1) / kUnitCols;
    const int64_t a_units = (d_in + kUnitCols - 1) / kUnitCols;
    scalar_t* gbp = grad_b_cat.data_ptr<scalar_t>();
    scalar_t* garp = grad_ar.data_ptr<scalar_t>();
    run_tiles(b_units + a_units, threads, [&](int64_t u, int64_t) {
      if (u < b_units) {  // dB_cat[c0 : c0 + cols] = dy[:, c0 : c0 + cols]^T (S p s)
        const int64_t c0 = u * kUnitCols, cols = std::min(kUnitCols, d_out - c0);
        gemm<scalar_t>(true, false, cols, tr, n, 1, dyp + c0, d_out, hap, tr, 0, gbp + c0 * tr, tr);
      } else {  // [dA ; dWr][:, c0 : c0 + cols] = [dS | dL]^T x[:, c0 : c0 + cols]
        const int64_t c0 = (u - b_units) * kUnitCols, cols = std::min(kUnitCols, d_in - c0);
        gemm<scalar_t>(true, false, ws, cols, n, 1, gap, ws, xp + c0, d_in, 0, garp + c0, d_in);
      }
    });
    scalar_t* grbp = grad_rb.data_ptr<scalar_t>();  // dbr: column sums of dL, in row order
    std::fill(grbp, grbp + t_count, scalar_t(0));
    for (int64_t r = 0; r < n; ++r)
      for (int64_t t = 0; t < t_count; ++t) grbp[t] += gap[r * ws + tr + t];
  });
  return soft_grads(x, grad_x, grad_ar, grad_b_cat, grad_rb, lora_a, lora_b, router_weight);
}

}  // namespace mftk
