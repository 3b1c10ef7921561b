// Device-generic drivers of the weighted cross-entropy ops: argument checks, allocation, the
// row x vocabulary chunk loop of the fused linear variant (GEMMs through ATen: MKL/oneDNN on CPU,
// cuBLAS on CUDA) and the backward's choice between rescaling precomputed gradients and one
// recomputation. The row kernels come from a kernel set K:
//
//   struct K {
//     static constexpr bool kUpcastOperands;   // GEMM operands in acc dtype (CPU) or native (CUDA)
//     static constexpr int64_t kDefaultChunk;  // default logits elements per chunk
//     static void stats(const StatsArgs&);
//     static void grad(const GradArgs&);
//     static void stats_grad(const StatsArgs&, const GradArgs&);  // both on one whole-row tile
//     static void colsum_add(const at::Tensor& g, at::Tensor& out);  // out[v] += sum_r g[r, v]
//     static void check_targets(const at::Tensor& targets, int64_t V, int64_t ignore_index);
//   };
//
// Fused linear variant, FLOPs (M rows, H hidden, V vocabulary):
//   forward, no gradient needed          2MHV  (logits chunks only)
//   forward computing unit gradients     6MHV  (+ dhidden_unit = G W and dweight_unit = G^T h,
//                                                with G the gradient at g = 1, gl = 0)
//   backward, g uniform on active rows and no gradient into lse: 0 GEMM FLOPs (rescale by g)
//   backward, otherwise: one recomputation, 2MHV + 2MHV per gradient it must still produce.
// So the usual training step (loss = sum(loss_rows) / norm, any row_weights) costs 6MHV, the
// minimum for a trainable head; the PyTorch way costs the same FLOPs but materializes [M, V]
// logits, log-probabilities and their gradient.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <tuple>

#include "weighted_ce_args.h"

namespace vsd_ext::wce {

using Tensor = at::Tensor;

inline Tensor value_or_undefined(const std::optional<Tensor>& t) {
  return t.has_value() ? *t : Tensor();
}

inline Tensor row_slice(const Tensor& t, int64_t r0, int64_t n) {
  return t.defined() ? t.narrow(0, r0, n) : Tensor();
}

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

// ---- Fused linear variant ------------------------------------------------------------------------

// The inputs of one fused call, prepared once: row tensors contiguous in acc dtype, GEMM operands
// (weight, bias) cast once where the device computes in acc dtype.
struct LinearInputs {
  Tensor hidden, weight_op, bias_acc, targets, row_weights, soft;
  int64_t M = 0, H = 0, V = 0, ignore_index = -100, budget = 0;
  double temperature = 1.0;
  at::ScalarType acc = at::kFloat;
  bool upcast = false;

  Tensor hidden_rows(int64_t r0, int64_t n) const {
    Tensor h = hidden.narrow(0, r0, n);
    return upcast ? h.to(acc) : h;
  }
};

template <class K>
LinearInputs prepare_linear(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                            const Tensor& row_weights, const std::optional<Tensor>& soft,
                            const std::optional<Tensor>& bias, int64_t ignore_index,
                            double temperature, int64_t chunk_size) {
  check_linear_inputs(hidden, weight, targets, row_weights, soft, bias, temperature, chunk_size);
  LinearInputs in;
  in.M = hidden.size(0);
  in.H = hidden.size(1);
  in.V = weight.size(0);
  in.acc = acc_dtype(hidden.scalar_type());
  in.upcast = K::kUpcastOperands;
  in.hidden = hidden;
  in.weight_op = in.upcast ? weight.to(in.acc) : weight;
  in.bias_acc = bias.has_value() ? bias->to(in.acc) : Tensor();
  in.targets = targets.contiguous();
  in.row_weights = row_weights.to(in.acc).contiguous();
  in.soft = soft.has_value() ? unit_col_stride(*soft) : Tensor();
  in.ignore_index = ignore_index;
  in.temperature = temperature;
  in.budget = chunk_size > 0 ? chunk_size : K::kDefaultChunk;
  return in;
}

// Gradient accumulators of one pass, in acc dtype; undefined = not wanted.
struct LinearGrads {
  Tensor dhidden;  // [M, H], each chunk writes its rows
  Tensor dweight;  // [V, H], zero-initialized, += G^T h per chunk
  Tensor dbias;    // [V], zero-initialized, += column sums of G per chunk
  bool any() const { return dhidden.defined() || dweight.defined() || dbias.defined(); }
};

// Upstream gradients of a pass that produces gradients: unit (g = 1, gl = 0: the forward's
// precomputation) or the actual ones (the backward's recomputation).
struct Upstream {
  Tensor grad_loss, grad_lse;
  bool unit = false;
};

// One pass over row chunks of `rows_per` rows. Each chunk's logits z = h_c W^T + b are
// materialized one [rows_per, cols_per] tile at a time (never [M, V]). With `stats`, the tiles
// stream into the row statistics (loss, lse, soft_lse); with gradients wanted, a chunk spans
// whole rows (cols_per = V) and its logits are overwritten by G = dL/dz (in place, or into a
// separate fp16/bf16 buffer for the GEMMs on CUDA), which feeds the GEMMs of the gradients.
template <class K>
void linear_pass(const LinearInputs& in, bool stats, Tensor& loss, Tensor& lse, Tensor& soft_lse,
                 const Upstream& up, LinearGrads& grads) {
  const int64_t M = in.M, V = in.V;
  if (M == 0) {
    return;
  }
  const bool want_grad = grads.any();
  const int64_t rows_per = std::clamp<int64_t>(in.budget / V, 1, M);
  const int64_t cols_per = want_grad ? V : std::clamp<int64_t>(in.budget / rows_per, 1, V);
  const auto opts = in.hidden.options().dtype(in.acc);
  Tensor zbuf = at::empty({rows_per * cols_per}, opts);
  const bool separate_g = want_grad && in.weight_op.scalar_type() != in.acc;
  Tensor gbuf = separate_g ? at::empty({rows_per * V}, opts.dtype(in.weight_op.scalar_type()))
                           : Tensor();
  Tensor state = (stats && cols_per < V) ? at::empty({rows_per, 6}, opts) : Tensor();

  for (int64_t r0 = 0; r0 < M; r0 += rows_per) {
    const int64_t rows = std::min(rows_per, M - r0);
    const Tensor hc = in.hidden_rows(r0, rows);
    const Tensor soft_c = row_slice(in.soft, r0, rows);
    const Tensor targets_c = in.targets.narrow(0, r0, rows);
    const Tensor weights_c = in.row_weights.narrow(0, r0, rows);
    Tensor z;
    StatsArgs row_stats;  // with gradients: the single whole-row tile, fused with the gradient
    for (int64_t c0 = 0; c0 < V; c0 += cols_per) {
      const int64_t n = std::min(cols_per, V - c0);
      z = zbuf.narrow(0, 0, rows * n).view({rows, n});
      const Tensor w_tile = in.weight_op.narrow(0, c0, n).t();
      if (in.bias_acc.defined()) {
        gemm_bias(z, in.bias_acc.narrow(0, c0, n), hc, w_tile);
      } else {
        gemm(z, hc, w_tile, /*accumulate=*/false);
      }
      if (stats) {
        StatsArgs a;
        a.logits = z;
        a.soft = soft_c.defined() ? soft_c.narrow(1, c0, n) : Tensor();
        a.targets = targets_c;
        a.row_weights = weights_c;
        a.state = row_slice(state, 0, rows);
        a.loss = loss.narrow(0, r0, rows);
        a.lse = lse.narrow(0, r0, rows);
        a.soft_lse = soft_c.defined() ? soft_lse.narrow(0, r0, rows) : Tensor();
        a.col0 = c0;
        a.vocab = V;
        a.first = c0 == 0;
        a.last = c0 + n == V;
        a.ignore_index = in.ignore_index;
        a.temperature = in.temperature;
        if (want_grad) {
          row_stats = a;
        } else {
          K::stats(a);
        }
      }
    }
    if (!want_grad) {
      continue;
    }
    GradArgs g;
    g.logits = z;
    g.soft = soft_c;
    g.targets = targets_c;
    g.row_weights = weights_c;
    g.grad_loss = row_slice(up.grad_loss, r0, rows);
    g.unit_grad_loss = up.unit;
    g.grad_lse = row_slice(up.grad_lse, r0, rows);
    g.lse = lse.narrow(0, r0, rows);
    g.soft_lse = soft_c.defined() ? soft_lse.narrow(0, r0, rows) : Tensor();
    g.out = separate_g ? gbuf.narrow(0, 0, rows * V).view({rows, V}) : z;
    g.ignore_index = in.ignore_index;
    g.temperature = in.temperature;
    if (stats) {
      K::stats_grad(row_stats, g);
    } else {
      K::grad(g);
    }
    const Tensor& G = g.out;
    if (grads.dhidden.defined()) {
      Tensor dh = grads.dhidden.narrow(0, r0, rows);
      gemm(dh, G, in.weight_op, /*accumulate=*/false);  // [rows, V] @ [V, H]
    }
    if (grads.dweight.defined()) {
      gemm(grads.dweight, G.t(), hc, /*accumulate=*/true);  // [V, rows] @ [rows, H]
    }
    if (grads.dbias.defined()) {
      K::colsum_add(G, grads.dbias);
    }
  }
}

inline LinearGrads alloc_grads(const LinearInputs& in, std::array<bool, 3> mask) {
  const auto opts = in.hidden.options().dtype(in.acc);
  LinearGrads g;
  g.dhidden = mask[0] ? at::empty({in.M, in.H}, opts) : Tensor();
  g.dweight = mask[1] ? at::zeros({in.V, in.H}, opts) : Tensor();
  g.dbias = mask[2] ? at::zeros({in.V}, opts) : Tensor();
  return g;
}

inline Tensor defined_or_empty(const Tensor& t, const at::TensorOptions& opts) {
  return t.defined() ? t : at::empty({0}, opts);
}

// Forward: (loss_rows, lse, soft_lse, dhidden_unit, dweight_unit, dbias_unit). The unit gradients
// (those of sum(loss_rows)) are computed for grad_mask = (hidden, weight, bias); [0] otherwise.
template <class K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_forward(
    const Tensor& hidden, const Tensor& weight, const Tensor& targets, const Tensor& row_weights,
    const std::optional<Tensor>& soft, const std::optional<Tensor>& bias, int64_t ignore_index,
    double temperature, int64_t chunk_size, std::array<bool, 3> grad_mask) {
  const LinearInputs in = prepare_linear<K>(hidden, weight, targets, row_weights, soft, bias,
                                            ignore_index, temperature, chunk_size);
  VSD_CHECK(!grad_mask[2] || bias.has_value(), "grad_mask", "asks for the bias gradient without a bias");
  if (!soft.has_value()) {
    K::check_targets(in.targets, in.V, ignore_index);
  }
  const auto opts = hidden.options().dtype(in.acc);
  Tensor loss = at::empty({in.M}, opts), lse = at::empty({in.M}, opts);
  Tensor soft_lse = at::empty({soft.has_value() ? in.M : 0}, opts);
  LinearGrads grads = alloc_grads(in, grad_mask);
  Upstream unit;
  unit.unit = true;
  linear_pass<K>(in, /*stats=*/true, loss, lse, soft_lse, unit, grads);
  return {loss, lse, soft_lse, defined_or_empty(grads.dhidden, opts),
          defined_or_empty(grads.dweight, opts), defined_or_empty(grads.dbias, opts)};
}

// g0 when the upstream gradient g equals g0 on every row whose unit gradient is nonzero (targets
// != ignore_index and row weight != 0; 0 when there is none), nullopt when it varies there. One
// host synchronization.
inline std::optional<double> uniform_grad(const Tensor& g, const LinearInputs& in) {
  if (!g.defined() || in.M == 0) {
    return 0.0;
  }
  const Tensor inactive = in.targets.ne(in.ignore_index).logical_and(in.row_weights.ne(0)).logical_not();
  const double inf = std::numeric_limits<double>::infinity();
  const Tensor range = at::stack({g.masked_fill(inactive, inf).min(), g.masked_fill(inactive, -inf).max()})
                           .to(at::kCPU, at::kDouble);
  const double lo = range[0].item<double>(), hi = range[1].item<double>();
  if (lo > hi) {
    return 0.0;  // no active row: the unit gradients are exactly zero
  }
  return lo == hi ? std::optional<double>(lo) : std::nullopt;
}

// Backward. Row-wise scaling is exact for dhidden (row m of G scales with g_m), but dweight and
// dbias sum over rows, so the unit ones rescale only when g is uniform over the contributing
// rows; a gradient into lse adds gl_m softmax(z_m), which was never stored. Whatever the
// precomputed buffers cannot give is recomputed in one pass (logits once more, plus one GEMM per
// remaining gradient).
template <class K>
std::tuple<Tensor, Tensor, Tensor> linear_backward(
    const std::optional<Tensor>& grad_loss, const std::optional<Tensor>& grad_lse,
    const Tensor& hidden, const Tensor& weight, const Tensor& targets, const Tensor& row_weights,
    const std::optional<Tensor>& soft, const std::optional<Tensor>& bias, const Tensor& lse,
    const Tensor& soft_lse, const Tensor& dhidden_unit, const Tensor& dweight_unit,
    const Tensor& dbias_unit, int64_t ignore_index, double temperature, int64_t chunk_size,
    std::array<bool, 3> output_mask) {
  const LinearInputs in = prepare_linear<K>(hidden, weight, targets, row_weights, soft, bias,
                                            ignore_index, temperature, chunk_size);
  VSD_CHECK(!output_mask[2] || bias.has_value(), "output_mask", "asks for the bias gradient without a bias");
  check_saved_stats(lse, soft_lse, soft.has_value(), in.M, hidden, "hidden");
  const bool have_dh = dhidden_unit.numel() > 0, have_dw = dweight_unit.numel() > 0,
             have_db = dbias_unit.numel() > 0;
  if (have_dh) check_shape(dhidden_unit, "dhidden_unit", {in.M, in.H});
  if (have_dw) check_shape(dweight_unit, "dweight_unit", {in.V, in.H});
  if (have_db) check_shape(dbias_unit, "dbias_unit", {in.V});

  const Tensor g = upstream(grad_loss, "grad_loss_rows", in.M, in.acc, lse);
  Tensor gl = upstream(grad_lse, "grad_lse", in.M, in.acc, lse);
  if (gl.defined() && !gl.ne(0).any().item<bool>()) {
    gl = Tensor();  // an all-zero gradient into lse (e.g. materialized by autograd) adds nothing
  }
  const auto opts = hidden.options().dtype(in.acc);
  Tensor dh, dw, db;
  if (!gl.defined()) {
    if (output_mask[0] && have_dh) {
      dh = g.defined() ? dhidden_unit.mul(g.unsqueeze(1)) : at::zeros({in.M, in.H}, opts);
    }
    const bool want_sum = (output_mask[1] && have_dw) || (output_mask[2] && have_db);
    const std::optional<double> g0 = want_sum ? uniform_grad(g, in) : std::nullopt;
    if (g0.has_value()) {
      if (output_mask[1] && have_dw) dw = dweight_unit.mul(*g0);
      if (output_mask[2] && have_db) db = dbias_unit.mul(*g0);
    }
  }
  LinearGrads rest = alloc_grads(in, {output_mask[0] && !dh.defined(), output_mask[1] && !dw.defined(),
                                      output_mask[2] && !db.defined()});
  if (rest.any() && (g.defined() || gl.defined())) {
    Upstream up;
    up.grad_loss = g;
    up.grad_lse = gl;
    Tensor lse_c = lse.contiguous(), soft_lse_c = soft_lse.contiguous();
    linear_pass<K>(in, /*stats=*/false, lse_c, lse_c, soft_lse_c, up, rest);
  } else if (rest.dhidden.defined()) {
    rest.dhidden.zero_();  // no upstream gradient at all
  }
  dh = dh.defined() ? dh : rest.dhidden;
  dw = dw.defined() ? dw : rest.dweight;
  db = db.defined() ? db : rest.dbias;
  const auto empty = at::empty({0}, opts);
  return {dh.defined() ? dh.to(hidden.scalar_type()) : empty,
          dw.defined() ? dw.to(weight.scalar_type()) : empty,
          db.defined() ? db.to(bias->scalar_type()) : empty};
}

}  // namespace vsd_ext::wce
