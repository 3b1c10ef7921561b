// Device-generic driver of the fused linear variant: the row x vocabulary chunk loop (GEMMs
// through ATen: MKL on CPU, cuBLAS on CUDA; row kernels from the kernel set K, see
// weighted_ce_driver.h) and the backward's choice between rescaling precomputed gradients and one
// recomputation.
//
// FLOPs (M rows, M_a of them active: target != ignore_index and row weight != 0; H hidden;
// V vocab):
//   forward, no gradient needed          2MHV  (logits chunks only)
//   forward computing unit gradients     2MHV + 4 M_a HV  (dhidden_unit = G W,
//                                        dweight_unit = G^T h, with G = dL/dz at g = 1, gl = 0;
//                                        inactive rows have G = 0 and only get their lse, in a
//                                        pass without gradients)
//   backward, g uniform on active rows and no gradient into lse: no GEMM (rescale by g)
//   backward, otherwise: one recomputation, 2 M' HV + 2 M' HV per gradient it must still
//                                        produce (M' = M_a, or M with a gradient into lse).
// So the usual training step (loss = sum(loss_rows) / norm, any row_weights) costs 6MHV with every
// row active, the minimum for a trainable head; the PyTorch way costs 6MHV whatever the mask and
// materializes [M, V] logits, log-probabilities and their gradient.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "weighted_ce_driver.h"

namespace vsd_ext::wce {

constexpr int64_t kDefaultRows = 1024;

// The inputs of one fused call, prepared once: row tensors contiguous in acc dtype, GEMM operands
// (weight, bias) cast once where the device computes in acc dtype.
struct LinearInputs {
  Tensor hidden, weight_op, bias_acc, targets, row_weights, soft;
  int64_t M = 0, H = 0, V = 0, ignore_index = -100, budget = 0;
  double temperature = 1.0;
  at::ScalarType acc = at::kFloat;
  bool upcast = false;
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
  // Default: 1,024 rows per chunk (K = 1,024 keeps the rank-K update of dweight compute-bound),
  // fewer when a row is long (at most K::kDefaultChunk logits).
  in.budget = chunk_size > 0 ? chunk_size : std::min(K::kDefaultChunk, kDefaultRows * in.V);
  return in;
}

// The rows one pass visits: all rows in order (no index: chunks are views of the inputs and
// outputs), or a subset given by an int64 index (chunks are gathered copies, results scattered).
struct RowSet {
  Tensor index;
  int64_t count = 0;

  static RowSet all(int64_t M) { return {Tensor(), M}; }

  // Rows r0 .. r0+n of the set of a per-row tensor (undefined stays undefined).
  Tensor take(const Tensor& t, int64_t r0, int64_t n) const {
    if (!t.defined()) {
      return t;
    }
    return index.defined() ? t.index_select(0, index.narrow(0, r0, n)) : t.narrow(0, r0, n);
  }
  // Where a chunk writes its rows of an output: a view of it, or a buffer for scatter().
  Tensor out(const Tensor& t, int64_t r0, int64_t n) const {
    if (!t.defined() || !index.defined()) {
      return t.defined() ? t.narrow(0, r0, n) : t;
    }
    std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
    sizes[0] = n;
    return at::empty(sizes, t.options());
  }
  void scatter(Tensor& t, int64_t r0, int64_t n, const Tensor& rows) const {
    if (rows.defined() && index.defined()) {
      t.index_copy_(0, index.narrow(0, r0, n), rows);
    }
  }
};

// [M] bool: rows without a gradient from loss_rows (target == ignore_index or row weight 0).
inline Tensor inactive_rows(const LinearInputs& in) {
  return in.targets.eq(in.ignore_index).logical_or(in.row_weights.eq(0));
}

// Rows whose gradient can be nonzero without a gradient into lse (active) and the others, from the
// active mask and its count (read to the host by the caller); no index when all are active.
inline std::pair<RowSet, RowSet> split_rows(const Tensor& active, int64_t n_active, int64_t M) {
  if (n_active == M) {
    return {RowSet::all(M), RowSet{Tensor(), 0}};
  }
  return {RowSet{active.nonzero().squeeze(1), n_active},
          RowSet{active.logical_not().nonzero().squeeze(1), M - n_active}};
}

// The same, counting the active rows itself (one host synchronization).
inline std::pair<RowSet, RowSet> split_active(const LinearInputs& in) {
  const Tensor active = inactive_rows(in).logical_not();
  const int64_t n_active = in.M == 0 ? 0 : read_to_host({active.sum()})[0];
  return split_rows(active, n_active, in.M);
}

// Gradient accumulators of one pass, in acc dtype; undefined = not wanted.
struct LinearGrads {
  Tensor dhidden;  // [M, H], each chunk writes its rows (rows outside the pass stay as they are)
  Tensor dweight;  // [V, H], zero-initialized, += G^T h per chunk
  Tensor dbias;    // [V], zero-initialized, += column sums of G per chunk
  bool any() const { return dhidden.defined() || dweight.defined() || dbias.defined(); }
};

inline LinearGrads alloc_grads(const LinearInputs& in, std::array<bool, 3> mask) {
  const auto opts = in.hidden.options().dtype(in.acc);
  LinearGrads g;
  g.dhidden = mask[0] ? at::zeros({in.M, in.H}, opts) : Tensor();
  g.dweight = mask[1] ? at::zeros({in.V, in.H}, opts) : Tensor();
  g.dbias = mask[2] ? at::zeros({in.V}, opts) : Tensor();
  return g;
}

// Upstream gradients of a pass that produces gradients: unit (g = 1, gl = 0: the forward's
// precomputation) or the actual ones (the backward's recomputation).
struct Upstream {
  Tensor grad_loss, grad_lse;
  bool unit = false;
};

// Per-row outputs of a pass with statistics (undefined in a pass without).
struct RowOutputs {
  Tensor loss, lse, soft_lse;
};

// One chunk of a pass, rows [r0, r0 + rows) of its row set: the inputs (hidden in the GEMM
// operand dtype) and its rows of the statistics, written by a pass with statistics (views of the
// outputs, or buffers for RowSet::scatter) or read by a pass without.
struct Chunk {
  int64_t r0 = 0, rows = 0;
  Tensor hidden, soft, targets, row_weights;
  RowOutputs stats;
};

inline Chunk take_chunk(const LinearInputs& in, const RowSet& set, int64_t r0, int64_t rows,
                        const RowOutputs& outs, const RowOutputs& stats_in) {
  const bool soft = in.soft.defined();
  Chunk ch;
  ch.r0 = r0;
  ch.rows = rows;
  const Tensor hc = set.take(in.hidden, r0, rows);
  ch.hidden = in.upcast ? hc.to(in.acc) : hc;
  ch.soft = set.take(in.soft, r0, rows);
  ch.targets = set.take(in.targets, r0, rows);
  ch.row_weights = set.take(in.row_weights, r0, rows);
  if (outs.lse.defined()) {
    ch.stats = {set.out(outs.loss, r0, rows), set.out(outs.lse, r0, rows),
                soft ? set.out(outs.soft_lse, r0, rows) : Tensor()};
  } else {
    ch.stats = {Tensor(), set.take(stats_in.lse, r0, rows),
                soft ? set.take(stats_in.soft_lse, r0, rows) : Tensor()};
  }
  return ch;
}

// z = h_c W^T + b over the vocabulary columns [c0, c0 + n) (z: [rows, n], acc dtype).
inline void chunk_logits(const LinearInputs& in, const Chunk& ch, int64_t c0, int64_t n,
                         Tensor& z) {
  const Tensor w_tile = in.weight_op.narrow(0, c0, n).t();
  if (in.bias_acc.defined()) {
    gemm_bias(z, in.bias_acc.narrow(0, c0, n), ch.hidden, w_tile);
  } else {
    gemm(z, ch.hidden, w_tile, /*accumulate=*/false);
  }
}

// Statistics of the logits tile z = columns [c0, c0 + n) of the chunk; `state` carries them
// across the tiles of a row.
inline StatsArgs tile_stats_args(const LinearInputs& in, const Chunk& ch, const Tensor& z,
                                 const Tensor& state, int64_t c0, int64_t n) {
  StatsArgs a;
  a.logits = z;
  a.soft = ch.soft.defined() ? ch.soft.narrow(1, c0, n) : Tensor();
  a.targets = ch.targets;
  a.row_weights = ch.row_weights;
  a.state = state.defined() ? state.narrow(0, 0, ch.rows) : Tensor();
  a.loss = ch.stats.loss;
  a.lse = ch.stats.lse;
  a.soft_lse = ch.stats.soft_lse;
  a.col0 = c0;
  a.vocab = in.V;
  a.first = c0 == 0;
  a.last = c0 + n == in.V;
  a.ignore_index = in.ignore_index;
  a.temperature = in.temperature;
  return a;
}

// G = dL/dz of the chunk's whole-row logits z, written to `out` (z itself or a separate buffer).
inline GradArgs chunk_grad_args(const LinearInputs& in, const RowSet& set, const Chunk& ch,
                                const Upstream& up, const Tensor& z, const Tensor& out) {
  GradArgs g;
  g.logits = z;
  g.soft = ch.soft;
  g.targets = ch.targets;
  g.row_weights = ch.row_weights;
  g.grad_loss = set.take(up.grad_loss, ch.r0, ch.rows);
  g.unit_grad_loss = up.unit;
  g.grad_lse = set.take(up.grad_lse, ch.r0, ch.rows);
  g.lse = ch.stats.lse;
  g.soft_lse = ch.stats.soft_lse;
  g.out = out;
  g.ignore_index = in.ignore_index;
  g.temperature = in.temperature;
  return g;
}

// G of a chunk as its GEMMs take it: `gemm` in the GEMM operand dtype, scaled by 1 / inv_scale
// (fp16: see scale_for_fp16), and `sum` (the same G, unscaled) for the column sums.
struct ChunkGrad {
  Tensor gemm, sum;
  double inv_scale = 1.0;
};

// The chunk's share of the wanted gradients, from G [rows, V].
template <class K>
void add_chunk_grads(const LinearInputs& in, const RowSet& set, const Chunk& ch, const ChunkGrad& G,
                     LinearGrads& grads) {
  if (grads.dhidden.defined()) {
    Tensor dh = set.out(grads.dhidden, ch.r0, ch.rows);
    gemm(dh, G.gemm, in.weight_op, /*accumulate=*/false, G.inv_scale);  // [rows, V] @ [V, H]
    set.scatter(grads.dhidden, ch.r0, ch.rows, dh);
  }
  if (grads.dweight.defined()) {
    gemm(grads.dweight, G.gemm.t(), ch.hidden, /*accumulate=*/true,
         G.inv_scale);  // [V, rows] @ [rows, H]
  }
  if (grads.dbias.defined()) {
    K::colsum_add(G.sum, grads.dbias);
  }
}

// fp16 GEMM operands: G (fp32, in z) rounded to fp16 would lose its small entries. At V = 128k a
// softmax entry is ~1e-5, times a row weight of 1e-3 (a mean over 1k rows) ~1e-8: below fp16's
// normal range (6.1e-5) and subnormal, or zero (below 3e-8), and a GradScaler cannot help (these
// unit gradients are computed at g = 1 in the forward). So G is scaled by 2^k before rounding,
// with k putting its largest magnitude in [2^14, 2^15) (exact: a power of two), and the GEMMs undo
// it through alpha = 2^-k (also exact). Costs one host read of max |G| per chunk (fp16 only).
inline ChunkGrad scale_for_fp16(const Tensor& z, Tensor& g16) {
  const double amax =
      at::linalg_vector_norm(z, std::numeric_limits<double>::infinity()).item<double>();
  int k = 0;
  if (amax > 0 && std::isfinite(amax)) {
    int e = 0;
    std::frexp(amax, &e);  // amax = f 2^e, f in [0.5, 1)
    k = std::clamp(15 - e, -120, 120);
  }
  const double scale = std::ldexp(1.0, k);
  at::mul_out(g16, z, at::scalar_tensor(scale, at::kDouble));
  return {g16, z, 1.0 / scale};
}

// One pass over chunks of the rows in `set`. Each chunk's logits z = h_c W^T + b are
// materialized one [rows_per, cols_per] tile at a time (never [M, V]). With statistics, the tiles
// stream into loss, lse and soft_lse (online log-sum-exp across tiles); with gradients wanted, a
// chunk spans whole rows (cols_per = V) and its logits are overwritten by G = dL/dz (in place, or
// into a separate bf16 / scaled fp16 buffer for the GEMMs on CUDA), which feeds the GEMMs of the
// gradients.
// A pass without statistics (the backward's) reads lse and soft_lse from `stats_in`.
template <class K>
void linear_pass(const LinearInputs& in, const RowSet& set, RowOutputs& outs,
                 const RowOutputs& stats_in, const Upstream& up, LinearGrads& grads) {
  const int64_t V = in.V;
  if (set.count == 0) {
    return;
  }
  const bool stats = outs.lse.defined(), want_grad = grads.any();
  const int64_t rows_per = std::clamp<int64_t>(in.budget / V, 1, set.count);
  const int64_t cols_per = want_grad ? V : std::clamp<int64_t>(in.budget / rows_per, 1, V);
  const auto opts = in.hidden.options().dtype(in.acc);
  Tensor zbuf = at::empty({rows_per * cols_per}, opts);
  // GEMM operands in fp16/bf16 (CUDA): G goes to a buffer of that dtype; bf16 is written by the
  // row kernels directly, fp16 after scaling (scale_for_fp16).
  const at::ScalarType op_dtype = in.weight_op.scalar_type();
  const bool separate_g = want_grad && op_dtype != in.acc;
  const bool fp16_g = separate_g && op_dtype == at::kHalf;
  Tensor gbuf = separate_g ? at::empty({rows_per * V}, opts.dtype(op_dtype)) : Tensor();
  Tensor state = (stats && cols_per < V) ? at::empty({rows_per, 6}, opts) : Tensor();

  for (int64_t r0 = 0; r0 < set.count; r0 += rows_per) {
    const int64_t rows = std::min(rows_per, set.count - r0);
    const Chunk ch = take_chunk(in, set, r0, rows, outs, stats_in);
    Tensor z;
    StatsArgs row_stats;  // with gradients: the single whole-row tile, fused with the gradient
    for (int64_t c0 = 0; c0 < V; c0 += cols_per) {
      const int64_t n = std::min(cols_per, V - c0);
      z = zbuf.narrow(0, 0, rows * n).view({rows, n});
      chunk_logits(in, ch, c0, n, z);
      if (!stats) {
        continue;
      }
      const StatsArgs a = tile_stats_args(in, ch, z, state, c0, n);
      if (want_grad) {
        row_stats = a;
      } else {
        K::stats(a);
      }
    }
    if (want_grad) {
      Tensor g_half = separate_g ? gbuf.narrow(0, 0, rows * V).view({rows, V}) : Tensor();
      const Tensor out = (separate_g && !fp16_g) ? g_half : z;
      const GradArgs g = chunk_grad_args(in, set, ch, up, z, out);
      if (stats) {
        K::stats_grad(row_stats, g);
      } else {
        K::grad(g);
      }
      const ChunkGrad G = fp16_g ? scale_for_fp16(z, g_half) : ChunkGrad{out, out, 1.0};
      add_chunk_grads<K>(in, set, ch, G, grads);
    }
    if (stats) {
      set.scatter(outs.loss, r0, rows, ch.stats.loss);
      set.scatter(outs.lse, r0, rows, ch.stats.lse);
      set.scatter(outs.soft_lse, r0, rows, ch.stats.soft_lse);
    }
  }
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
  VSD_CHECK(!grad_mask[2] || bias.has_value(), "grad_mask",
            "asks for the bias gradient without a bias");
  const auto opts = hidden.options().dtype(in.acc);
  RowOutputs outs{at::empty({in.M}, opts), at::empty({in.M}, opts),
                  at::empty({soft.has_value() ? in.M : 0}, opts)};
  LinearGrads grads = alloc_grads(in, grad_mask);
  Upstream unit;
  unit.unit = true;
  // One host read (one synchronization on CUDA) for the targets check and the active-row count.
  const bool check = !soft.has_value() && in.M > 0;
  const Tensor active = grads.any() ? inactive_rows(in).logical_not() : Tensor();
  std::vector<Tensor> reads;
  if (check) reads.push_back(first_bad_target(in.targets, in.V, ignore_index));
  if (active.defined() && in.M > 0) reads.push_back(active.sum());
  const std::vector<int64_t> host = read_to_host(reads);
  if (check) raise_bad_target(in.targets, host[0], in.V, ignore_index);
  if (grads.any()) {
    // Gradient GEMMs only for the rows that have a gradient; the others only need their lse.
    const auto [act, inact] = split_rows(active, in.M > 0 ? host.back() : 0, in.M);
    linear_pass<K>(in, act, outs, RowOutputs(), unit, grads);
    LinearGrads none;
    linear_pass<K>(in, inact, outs, RowOutputs(), unit, none);
  } else {
    linear_pass<K>(in, RowSet::all(in.M), outs, RowOutputs(), unit, grads);
  }
  return {outs.loss,
          outs.lse,
          outs.soft_lse,
          defined_or_empty(grads.dhidden, opts),
          defined_or_empty(grads.dweight, opts),
          defined_or_empty(grads.dbias, opts)};
}

// g0 when the upstream gradient g equals g0 on every active row (0 when there is none), nullopt
// when it varies there. One host synchronization.
inline std::optional<double> uniform_grad(const Tensor& g, const LinearInputs& in) {
  if (!g.defined() || in.M == 0) {
    return 0.0;
  }
  const Tensor inactive = inactive_rows(in);
  const double inf = std::numeric_limits<double>::infinity();
  const Tensor range =
      at::stack({g.masked_fill(inactive, inf).min(), g.masked_fill(inactive, -inf).max()})
          .to(at::kCPU, at::kDouble);
  const double lo = range[0].item<double>(), hi = range[1].item<double>();
  if (lo > hi) {
    return 0.0;  // no active row: the unit gradients are exactly zero
  }
  return lo == hi ? std::optional<double>(lo) : std::nullopt;
}

// Backward. Row-wise scaling is exact for dhidden (row m of G scales with g_m), but dweight and
// dbias sum over rows, so the unit ones rescale only when g is uniform over the active rows; a
// gradient into lse adds gl_m softmax(z_m), which was never stored. Whatever the precomputed
// buffers cannot give is recomputed in one pass (logits once more, plus one GEMM per remaining
// gradient), over the active rows only unless a gradient flows into lse.
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
  VSD_CHECK(!output_mask[2] || bias.has_value(), "output_mask",
            "asks for the bias gradient without a bias");
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
      // Inactive rows have zero unit gradients; mask g there so that a non-finite g stays out.
      dh = g.defined() ? dhidden_unit.mul(g.masked_fill(inactive_rows(in), 0).unsqueeze(1))
                       : at::zeros({in.M, in.H}, opts);
    }
    const bool want_sum = (output_mask[1] && have_dw) || (output_mask[2] && have_db);
    const std::optional<double> g0 = want_sum ? uniform_grad(g, in) : std::nullopt;
    if (g0.has_value()) {
      if (output_mask[1] && have_dw) dw = dweight_unit.mul(*g0);
      if (output_mask[2] && have_db) db = dbias_unit.mul(*g0);
    }
  }
  LinearGrads rest =
      alloc_grads(in, {output_mask[0] && !dh.defined(), output_mask[1] && !dw.defined(),
                       output_mask[2] && !db.defined()});
  if (rest.any() && (g.defined() || gl.defined())) {
    Upstream up;
    up.grad_loss = g;
    up.grad_lse = gl;
    if (!soft.has_value()) {
      check_targets(in.targets, in.V, ignore_index);  // direct calls of the backward op
    }
    const RowOutputs saved{Tensor(), lse.contiguous(), soft_lse.contiguous()};
    RowOutputs none;
    const RowSet rows = gl.defined() ? RowSet::all(in.M) : split_active(in).first;
    linear_pass<K>(in, rows, none, saved, up, rest);
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
