// The cross-entropy row family of the fused linear driver (weighted_ce_linear_driver.h) and the
// ops weighted_linear_cross_entropy_{forward,backward} (docs/design/OPS.md section 3) over a
// device kernel set K (weighted_ce_driver.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "weighted_ce_linear_driver.h"
#include "weighted_ce_math.h"

namespace vsd_ext::wce {

// Per-row statistics of the cross-entropy: written by a pass with statistics, read by one without.
struct CeStats {
  Tensor loss, lse, soft_lse;
};

// Upstream gradients of a pass that produces gradients: unit (g = 1, gl = 0: the forward's
// precomputation) or the actual ones (the backward's recomputation).
struct CeUpstream {
  Tensor grad_loss, grad_lse;
  bool unit = false;
};

template <class K>
struct CeRows {
  using Kernels = K;
  static constexpr bool kTiles = true;
  static constexpr int kStateFields = RowStats<float>::kFields;

  Tensor targets, row_weights, soft;  // [M] int64, [M] acc, [M, V] or undefined
  int64_t V = 0, ignore_index = -100;
  double temperature = 1.0;
  CeStats outs;   // written by a pass with statistics (lse defined); undefined otherwise
  CeStats saved;  // read by a pass without statistics
  CeUpstream up;

  struct Part {
    Tensor soft, targets, row_weights, grad_loss, grad_lse;
    CeStats stats;
  };

  bool writes_stats() const { return outs.lse.defined(); }

  Part take(const RowSet& set, int64_t r0, int64_t n) const {
    Part p{set.take(soft, r0, n),        set.take(targets, r0, n),
           set.take(row_weights, r0, n), set.take(up.grad_loss, r0, n),
           set.take(up.grad_lse, r0, n), {}};
    const bool with_soft = soft.defined();  // soft_lse is [0] without soft targets
    if (writes_stats()) {
      p.stats = {set.out(outs.loss, r0, n), set.out(outs.lse, r0, n),
                 with_soft ? set.out(outs.soft_lse, r0, n) : Tensor()};
    } else {
      p.stats = {Tensor(), set.take(saved.lse, r0, n),
                 with_soft ? set.take(saved.soft_lse, r0, n) : Tensor()};
    }
    return p;
  }

  void scatter(const RowSet& set, int64_t r0, int64_t n, const Part& p) const {
    Tensor loss = outs.loss, lse = outs.lse, soft_lse = outs.soft_lse;
    set.scatter(loss, r0, n, p.stats.loss);
    set.scatter(lse, r0, n, p.stats.lse);
    set.scatter(soft_lse, r0, n, p.stats.soft_lse);
  }

  // Statistics of the logits tile z = columns [c0, c0 + z.size(1)); `state` carries them across
  // the tiles of a row.
  StatsArgs stats_args(const Part& p, const Tensor& z, const Tensor& state, int64_t c0) const {
    const int64_t n = z.size(1);
    StatsArgs a;
    a.logits = z;
    a.soft = p.soft.defined() ? p.soft.narrow(1, c0, n) : Tensor();
    a.targets = p.targets;
    a.row_weights = p.row_weights;
    a.state = state;
    a.loss = p.stats.loss;
    a.lse = p.stats.lse;
    a.soft_lse = p.stats.soft_lse;
    a.col0 = c0;
    a.vocab = V;
    a.first = c0 == 0;
    a.last = c0 + n == V;
    a.ignore_index = ignore_index;
    a.temperature = temperature;
    return a;
  }

  // G = dL/dz of the chunk's whole-row logits z, written to `out` (z itself or a bf16 buffer).
  GradArgs grad_args(const Part& p, const Tensor& z, const Tensor& out) const {
    GradArgs g;
    g.logits = z;
    g.soft = p.soft;
    g.targets = p.targets;
    g.row_weights = p.row_weights;
    g.grad_loss = p.grad_loss;
    g.unit_grad_loss = up.unit;
    g.grad_lse = p.grad_lse;
    g.lse = p.stats.lse;
    g.soft_lse = p.stats.soft_lse;
    g.out = out;
    g.ignore_index = ignore_index;
    g.temperature = temperature;
    return g;
  }

  void stats(const Part& p, const Tensor& z, const Tensor& state, int64_t c0) const {
    K::stats(stats_args(p, z, state, c0));
  }
  void stats_grad(const Part& p, const Tensor& z, const Tensor& out) const {
    K::stats_grad(stats_args(p, z, Tensor(), 0), grad_args(p, z, out));
  }
  void grad(const Part& p, const Tensor& z, const Tensor& out) const {
    K::grad(grad_args(p, z, out));
  }

  // [M] bool: rows without a gradient from loss_rows (target == ignore_index or row weight 0).
  Tensor inactive() const { return targets.eq(ignore_index).logical_or(row_weights.eq(0)); }
};

// The rows of one call: checked inputs, per-row tensors contiguous in acc dtype.
template <class K>
CeRows<K> ce_rows(const LinearInputs& in, const Tensor& targets, const Tensor& row_weights,
                  const std::optional<Tensor>& soft, int64_t ignore_index, double temperature) {
  CeRows<K> rows;
  rows.targets = targets.contiguous();
  rows.row_weights = row_weights.to(in.acc).contiguous();
  rows.soft = soft.has_value() ? unit_col_stride(*soft) : Tensor();
  rows.V = in.V;
  rows.ignore_index = ignore_index;
  rows.temperature = temperature;
  return rows;
}

// Forward: (loss_rows, lse, soft_lse, dhidden_unit, dweight_unit, dbias_unit). The unit gradients
// (those of sum(loss_rows)) are computed for grad_mask = (hidden, weight, bias); [0] otherwise.
template <class K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_forward(
    const Tensor& hidden, const Tensor& weight, const Tensor& targets, const Tensor& row_weights,
    const std::optional<Tensor>& soft, const std::optional<Tensor>& bias, int64_t ignore_index,
    double temperature, int64_t chunk_size, std::array<bool, 3> grad_mask) {
  check_linear_inputs(hidden, weight, targets, row_weights, soft, bias, temperature, chunk_size);
  VSD_CHECK(!grad_mask[2] || bias.has_value(), "grad_mask",
            "asks for the bias gradient without a bias");
  const LinearInputs in = prepare_linear<K>(hidden, weight, bias, chunk_size);
  CeRows<K> rows = ce_rows<K>(in, targets, row_weights, soft, ignore_index, temperature);
  const auto opts = hidden.options().dtype(in.acc);
  rows.outs = {at::empty({in.M}, opts), at::empty({in.M}, opts),
               at::empty({soft.has_value() ? in.M : 0}, opts)};
  rows.up.unit = true;
  LinearGrads grads = alloc_grads(in, grad_mask);
  // One host read (one synchronization on CUDA) for the targets check and the active-row count.
  const bool check = !soft.has_value() && in.M > 0;
  const Tensor active = grads.any() ? rows.inactive().logical_not() : Tensor();
  std::vector<Tensor> reads;
  if (check) reads.push_back(first_bad_target(rows.targets, in.V, ignore_index));
  if (active.defined() && in.M > 0) reads.push_back(active.sum());
  const std::vector<int64_t> host = read_to_host(reads);
  if (check) raise_bad_target(rows.targets, host[0], in.V, ignore_index);
  forward_passes(in, rows, active, host.empty() ? 0 : host.back(), grads);
  return {rows.outs.loss,
          rows.outs.lse,
          rows.outs.soft_lse,
          defined_or_empty(grads.dhidden, opts),
          defined_or_empty(grads.dweight, opts),
          defined_or_empty(grads.dbias, opts)};
}

// Backward (linear_backward_grads): a gradient into lse adds gl_m softmax(z_m), never stored, so
// then the unit gradients do not rescale and the recomputation covers every row.
template <class K>
std::tuple<Tensor, Tensor, Tensor> linear_backward(
    const std::optional<Tensor>& grad_loss, const std::optional<Tensor>& grad_lse,
    const Tensor& hidden, const Tensor& weight, const Tensor& targets, const Tensor& row_weights,
    const std::optional<Tensor>& soft, const std::optional<Tensor>& bias, const Tensor& lse,
    const Tensor& soft_lse, const Tensor& dhidden_unit, const Tensor& dweight_unit,
    const Tensor& dbias_unit, int64_t ignore_index, double temperature, int64_t chunk_size,
    std::array<bool, 3> output_mask) {
  check_linear_inputs(hidden, weight, targets, row_weights, soft, bias, temperature, chunk_size);
  VSD_CHECK(!output_mask[2] || bias.has_value(), "output_mask",
            "asks for the bias gradient without a bias");
  const LinearInputs in = prepare_linear<K>(hidden, weight, bias, chunk_size);
  check_saved_stats(lse, soft_lse, soft.has_value(), in.M, hidden, "hidden");
  CeRows<K> rows = ce_rows<K>(in, targets, row_weights, soft, ignore_index, temperature);
  rows.saved = {Tensor(), lse.contiguous(), soft.has_value() ? soft_lse.contiguous() : Tensor()};
  rows.up.grad_loss = upstream(grad_loss, "grad_loss_rows", in.M, in.acc, lse);
  Tensor gl = upstream(grad_lse, "grad_lse", in.M, in.acc, lse);
  if (gl.defined() && !gl.ne(0).any().item<bool>()) {
    gl = Tensor();  // all zero (e.g. materialized by autograd): adds nothing
  }
  rows.up.grad_lse = gl;
  if (!soft.has_value()) {
    check_targets(rows.targets, in.V, ignore_index);  // direct calls of the backward op
  }
  BackwardPlan plan;
  plan.g = rows.up.grad_loss;
  plan.inactive = rows.inactive();
  plan.rescalable = !rows.up.grad_lse.defined();
  plan.all_rows = !plan.rescalable;
  const LinearGrads g = linear_backward_grads(
      in, rows, plan, UnitGrads{dhidden_unit, dweight_unit, dbias_unit}, output_mask);
  return cast_grads(g, hidden, weight, bias, in.acc);
}

}  // namespace vsd_ext::wce
