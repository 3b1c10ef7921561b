// The divergence row family of the fused linear driver (weighted_ce_linear_driver.h) and the ops
// weighted_linear_divergence_{forward,backward} (docs/design/OPS.md section 4) over a device
// kernel set K (weighted_ce_driver.h: DivArgs, K::div_stats / div_grad / div_stats_grad). Math:
// weighted_ce_div_math.h.
//
// The rows need three passes over their logits (log-sum-exps; beta, Q_< and KL; the gradient),
// so chunks always hold whole rows (no vocabulary tiles): at least one row per chunk. The forward
// saves lse, soft_lse, Q_< and KL per row, which is all a recomputation of the gradient needs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <array>
#include <optional>
#include <tuple>

#include "weighted_ce_linear_driver.h"

namespace vsd_ext::wce {

// Per-row statistics of the divergence, in the order of the forward op's outputs.
enum DivStat : int { kDivLoss, kDivBeta, kDivKl, kDivLse, kDivSoftLse, kDivQLess, kDivStats };
using DivStats = std::array<Tensor, kDivStats>;

template <class K>
struct DivRows {
  using Kernels = K;
  static constexpr bool kTiles = false;
  static constexpr int kStateFields = 0;

  Tensor teacher, tv_weights, kl_weights;  // [M, V] any float dtype; [M] acc; [M] acc
  double temperature = 1.0;
  DivStats stats_out;  // all written by a pass with statistics (loss defined)
  DivStats saved;      // lse, soft_lse, q_less and kl read by a pass without
  Tensor grad_loss;    // [M] acc or undefined (g = unit ? 1 : 0)
  bool unit = false;

  struct Part {
    Tensor teacher, tv_weights, kl_weights, grad_loss;
    DivStats stats;
  };

  bool writes_stats() const { return stats_out[kDivLoss].defined(); }

  Part take(const RowSet& set, int64_t r0, int64_t n) const {
    Part p{set.take(teacher, r0, n),
           set.take(tv_weights, r0, n),
           set.take(kl_weights, r0, n),
           set.take(grad_loss, r0, n),
           {}};
    for (int i = 0; i < kDivStats; ++i) {
      p.stats[i] = writes_stats() ? set.out(stats_out[i], r0, n) : set.take(saved[i], r0, n);
    }
    return p;
  }

  void scatter(const RowSet& set, int64_t r0, int64_t n, const Part& p) const {
    for (int i = 0; i < kDivStats; ++i) {
      Tensor t = stats_out[i];
      set.scatter(t, r0, n, p.stats[i]);
    }
  }

  DivArgs args(const Part& p, const Tensor& z, const Tensor& out) const {
    DivArgs a;
    a.logits = z;
    a.teacher = p.teacher;
    a.tv_weights = p.tv_weights;
    a.kl_weights = p.kl_weights;
    a.grad_loss = p.grad_loss;
    a.unit_grad_loss = unit;
    a.loss = p.stats[kDivLoss];
    a.beta = p.stats[kDivBeta];
    a.kl = p.stats[kDivKl];
    a.lse = p.stats[kDivLse];
    a.soft_lse = p.stats[kDivSoftLse];
    a.q_less = p.stats[kDivQLess];
    a.out = out;
    a.temperature = temperature;
    return a;
  }

  void stats(const Part& p, const Tensor& z, const Tensor&, int64_t) const {
    K::div_stats(args(p, z, Tensor()));
  }
  void stats_grad(const Part& p, const Tensor& z, const Tensor& out) const {
    K::div_stats_grad(args(p, z, out));
  }
  void grad(const Part& p, const Tensor& z, const Tensor& out) const {
    K::div_grad(args(p, z, out));
  }

  // [M] bool: rows without a gradient (both weights 0).
  Tensor inactive() const { return tv_weights.eq(0).logical_and(kl_weights.eq(0)); }
};

template <class K>
DivRows<K> div_rows(const LinearInputs& in, const Tensor& teacher, const Tensor& tv_weights,
                    const Tensor& kl_weights, double temperature) {
  DivRows<K> rows;
  rows.teacher = unit_col_stride(teacher);
  rows.tv_weights = tv_weights.to(in.acc).contiguous();
  rows.kl_weights = kl_weights.to(in.acc).contiguous();
  rows.temperature = temperature;
  return rows;
}

// Forward: (loss_rows, beta, kl, lse, soft_lse, q_less, dhidden_unit, dweight_unit, dbias_unit).
// The unit gradients (those of sum(loss_rows)) for grad_mask = (hidden, weight, bias); [0] else.
template <class K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> div_forward(
    const Tensor& hidden, const Tensor& weight, const Tensor& teacher, const Tensor& tv_weights,
    const Tensor& kl_weights, const std::optional<Tensor>& bias, double temperature,
    int64_t chunk_size, std::array<bool, 3> grad_mask) {
  check_div_inputs(hidden, weight, teacher, tv_weights, kl_weights, bias, temperature, chunk_size);
  VSD_CHECK(!grad_mask[2] || bias.has_value(), "grad_mask",
            "asks for the bias gradient without a bias");
  const LinearInputs in = prepare_linear<K>(hidden, weight, bias, chunk_size);
  DivRows<K> rows = div_rows<K>(in, teacher, tv_weights, kl_weights, temperature);
  const auto opts = hidden.options().dtype(in.acc);
  for (Tensor& t : rows.stats_out) t = at::empty({in.M}, opts);
  rows.unit = true;
  LinearGrads grads = alloc_grads(in, grad_mask);
  const Tensor active = grads.any() ? rows.inactive().logical_not() : Tensor();
  const int64_t n_active =
      (active.defined() && in.M > 0) ? read_to_host({active.sum()})[0] : 0;  // one sync
  forward_passes(in, rows, active, n_active, grads);
  const DivStats& s = rows.stats_out;
  return {s[kDivLoss],
          s[kDivBeta],
          s[kDivKl],
          s[kDivLse],
          s[kDivSoftLse],
          s[kDivQLess],
          defined_or_empty(grads.dhidden, opts),
          defined_or_empty(grads.dweight, opts),
          defined_or_empty(grads.dbias, opts)};
}

// Backward (linear_backward_grads): the unit gradients rescale when g is uniform over the rows
// with a nonzero weight; else one recomputation from the saved statistics.
template <class K>
std::tuple<Tensor, Tensor, Tensor> div_backward(
    const Tensor& grad_loss, const Tensor& hidden, const Tensor& weight, const Tensor& teacher,
    const Tensor& tv_weights, const Tensor& kl_weights, const std::optional<Tensor>& bias,
    const Tensor& lse, const Tensor& soft_lse, const Tensor& q_less, const Tensor& kl,
    const Tensor& dhidden_unit, const Tensor& dweight_unit, const Tensor& dbias_unit,
    double temperature, int64_t chunk_size, std::array<bool, 3> output_mask) {
  check_div_inputs(hidden, weight, teacher, tv_weights, kl_weights, bias, temperature, chunk_size);
  VSD_CHECK(!output_mask[2] || bias.has_value(), "output_mask",
            "asks for the bias gradient without a bias");
  const LinearInputs in = prepare_linear<K>(hidden, weight, bias, chunk_size);
  check_div_saved_stats({lse, soft_lse, q_less, kl}, in.M, hidden);
  DivRows<K> rows = div_rows<K>(in, teacher, tv_weights, kl_weights, temperature);
  rows.saved[kDivLse] = lse.contiguous();
  rows.saved[kDivSoftLse] = soft_lse.contiguous();
  rows.saved[kDivQLess] = q_less.contiguous();
  rows.saved[kDivKl] = kl.contiguous();
  rows.grad_loss = upstream(grad_loss, "grad_loss_rows", in.M, in.acc, lse);
  BackwardPlan plan;
  plan.g = rows.grad_loss;
  plan.inactive = rows.inactive();
  const LinearGrads g = linear_backward_grads(
      in, rows, plan, UnitGrads{dhidden_unit, dweight_unit, dbias_unit}, output_mask);
  return cast_grads(g, hidden, weight, bias, in.acc);
}

}  // namespace vsd_ext::wce
