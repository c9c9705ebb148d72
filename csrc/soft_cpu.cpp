// Soft routing on CPU: a learned softmax router blends all adapters per token.
//   p = softmax(topk_mask((x Wr^T + br) / temperature))
//   y = x W^T + b + sum_t p[:, t] s[t] (x A[t]^T) B[t]^T
// It is a rank T*R LoRA with per-token column scaling, so it runs as whole-batch GEMMs.
#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/softmax.h>

#include <limits>

#include "mftk.h"

namespace mftk {

namespace {

// (N, T*R) per-column coefficient p[n, t] * s[t].
at::Tensor column_coef(const at::Tensor& probs, const at::Tensor& scaling, int64_t rank) {
  return (probs * scaling.to(probs.scalar_type())).repeat_interleave(rank, 1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_bias,
    double temperature, int64_t top_k) {
  const auto cdt = compute_dtype(x);
  const int64_t t_count = lora_a.size(0), rank = lora_a.size(1), d_in = x.size(1);
  const int64_t d_out = lora_b.size(1);
  const int64_t tr = t_count * rank;
  auto xc = x.to(cdt).contiguous();
  auto a_cat = lora_a.to(cdt).reshape({tr, d_in});
  // One pass over x for the shrink and the router: x [A_cat ; Wr]^T = [S | logits]   [N, T*R + T]
  auto s_l = at::mm(xc, at::cat({a_cat, router_weight.to(cdt)}, 0).t());
  auto shrink = s_l.narrow(1, 0, tr).contiguous();  // [N, T*R]
  auto logits = s_l.narrow(1, tr, t_count);          // [N, T]
  if (router_bias.has_value() && router_bias->defined()) logits = logits + router_bias->to(cdt);
  auto z = logits / temperature;
  if (top_k > 0 && top_k < t_count) {
    auto kept = std::get<1>(z.topk(top_k, -1));
    auto drop = at::ones_like(z, z.options().dtype(at::kBool)).scatter_(-1, kept, false);
    z = z.masked_fill(drop, -std::numeric_limits<double>::infinity());
  }
  auto probs = at::softmax(z, -1);
  auto b_cat = lora_b.to(cdt).permute({1, 0, 2}).reshape({d_out, tr});
  auto h = shrink * column_coef(probs, scaling, rank);
  auto y = base_forward(xc, weight, bias, d_out);
  y.addmm_(h, b_cat.t());
  return {y.to(x.scalar_type()), logits.to(x.scalar_type()).contiguous(), probs, shrink};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_bwd_cpu(
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
  auto a_cat = lora_a.to(cdt).reshape({t_count * rank, d_in});
  auto b_cat = lora_b.to(cdt).permute({1, 0, 2}).reshape({d_out, t_count * rank});
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
  grad_x.addmm_(ds_dl, at::cat({a_cat, router_weight.to(cdt)}, 0));
  auto grad_ar = at::mm(ds_dl.t(), xc);                            // [T*R + T, D_in]
  auto grad_a = grad_ar.narrow(0, 0, t_count * rank).reshape({t_count, rank, d_in});
  auto grad_b = grad_b_cat.reshape({d_out, t_count, rank}).permute({1, 0, 2}).contiguous();
  auto grad_rw = grad_ar.narrow(0, t_count * rank, t_count).clone();  // outputs must not alias
  auto grad_rb = dlogits.sum(0);
  return {grad_x.to(x.scalar_type()), grad_a.to(lora_a.scalar_type()),
          grad_b.to(lora_b.scalar_type()), grad_rw.to(router_weight.scalar_type()),
          grad_rb.to(router_weight.scalar_type())};
}

}  // namespace mftk
