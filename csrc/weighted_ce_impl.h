// Device-generic drivers of the weighted cross-entropy ops: argument checks, allocation and the
// calls of the device row kernels for the non-fused op; the GEMM helpers of the fused op
// (weighted_ce_linear_impl.h). The row kernels come from a kernel set K:
//
//   struct K {
//     static constexpr bool kUpcastOperands;   // GEMM operands in acc dtype (CPU) or native (CUDA)
//     static constexpr int64_t kDefaultChunk;  // cap of the default chunk, in logits elements
//     static void stats(const StatsArgs&);
//     static void grad(const GradArgs&);
//     static void stats_grad(const StatsArgs&, const GradArgs&);  // both on one whole-row tile
//     static void colsum_add(const at::Tensor& g, at::Tensor& out);  // out[v] += sum_r g[r, v]
//     static void check_targets(const at::Tensor& targets, int64_t V, int64_t ignore_index);
//   };
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <optional>
#include <tuple>

#include "weighted_ce_args.h"

namespace vsd_ext::wce {

using Tensor = at::Tensor;

// out = a @ b (accumulate: out += a @ b), out in acc dtype; a, b in acc dtype or, on CUDA, in
// fp16/bf16 with fp32 accumulation and output (cuBLAS through the out_dtype overloads).
inline void gemm(Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
  if (a.scalar_type() == out.scalar_type()) {
    if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
  } else if (accumulate) {
    at::addmm_out(out, out, a, b, out.scalar_type());
  } else {
    at::mm_out(out, a, b, out.scalar_type());
  }
}

// out = bias + a @ b with bias [n] (acc dtype) broadcast over rows.
inline void gemm_bias(Tensor& out, const Tensor& bias, const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::addmm_out(out, bias, a, b);
  } else {
    at::addmm_out(out, bias, a, b, out.scalar_type());
  }
}

// ---- Non-fused variant: logits given ------------------------------------------------------------

template <class K>
std::tuple<Tensor, Tensor, Tensor> ce_forward(const Tensor& logits, const Tensor& targets,
                                              const Tensor& row_weights,
                                              const std::optional<Tensor>& soft,
                                              int64_t ignore_index, double temperature) {
  check_logits_inputs(logits, targets, row_weights, soft, temperature);
  const int64_t M = logits.size(0), V = logits.size(1);
  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  StatsArgs a;
  a.logits = unit_col_stride(logits);
  a.soft = soft.has_value() ? unit_col_stride(*soft) : Tensor();
  a.targets = targets.contiguous();
  a.row_weights = row_weights.to(opts.dtype()).contiguous();
  a.loss = at::empty({M}, opts);
  a.lse = at::empty({M}, opts);
  Tensor soft_lse = at::empty({soft.has_value() ? M : 0}, opts);
  a.soft_lse = soft.has_value() ? soft_lse : Tensor();
  a.vocab = V;
  a.ignore_index = ignore_index;
  a.temperature = temperature;
  if (!soft.has_value()) {
    K::check_targets(a.targets, V, ignore_index);
  }
  if (M > 0) {
    K::stats(a);
  }
  return {a.loss, a.lse, soft_lse};
}

// Upstream gradient of a per-row output: undefined when absent, else [M] in acc dtype.
inline Tensor upstream(const std::optional<Tensor>& g, const char* name, int64_t M,
                       at::ScalarType acc, const Tensor& ref) {
  if (!g.has_value() || !g->defined()) {
    return Tensor();
  }
  check_shape(*g, name, {M});
  check_same_device(*g, name, ref, "lse");
  return g->to(acc).contiguous();
}

inline void check_saved_stats(const Tensor& lse, const Tensor& soft_lse, bool has_soft, int64_t M,
                              const Tensor& ref, const char* ref_name) {
  check_shape(lse, "lse", {M});
  check_dtype(lse, "lse", {acc_dtype(ref.scalar_type())});
  check_same_device(lse, "lse", ref, ref_name);
  check_shape(soft_lse, "soft_lse", {has_soft ? M : 0});
  check_same_dtype(soft_lse, "soft_lse", lse, "lse");
  check_same_device(soft_lse, "soft_lse", ref, ref_name);
}

template <class K>
Tensor ce_backward(const std::optional<Tensor>& grad_loss, const std::optional<Tensor>& grad_lse,
                   const Tensor& logits, const Tensor& targets, const Tensor& row_weights,
                   const std::optional<Tensor>& soft, const Tensor& lse, const Tensor& soft_lse,
                   int64_t ignore_index, double temperature) {
  check_logits_inputs(logits, targets, row_weights, soft, temperature);
  const int64_t M = logits.size(0), V = logits.size(1);
  const auto acc = acc_dtype(logits.scalar_type());
  check_saved_stats(lse, soft_lse, soft.has_value(), M, logits, "logits");
  GradArgs a;
  a.logits = unit_col_stride(logits);
  a.soft = soft.has_value() ? unit_col_stride(*soft) : Tensor();
  a.targets = targets.contiguous();
  a.row_weights = row_weights.to(acc).contiguous();
  a.grad_loss = upstream(grad_loss, "grad_loss_rows", M, acc, lse);
  a.grad_lse = upstream(grad_lse, "grad_lse", M, acc, lse);
  a.lse = lse.contiguous();
  a.soft_lse = soft.has_value() ? soft_lse.contiguous() : Tensor();
  a.out = at::empty({M, V}, logits.options());
  a.ignore_index = ignore_index;
  a.temperature = temperature;
  if (M > 0) {
    K::grad(a);
  }
  return a.out;
}

}  // namespace vsd_ext::wce
