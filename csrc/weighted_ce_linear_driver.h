// Device-generic driver of the fused linear ops: the row x vocabulary chunk loop (GEMMs through
// ATen: MKL on CPU, cuBLAS on CUDA), the unit gradients of the forward and the backward's choice
// between rescaling them and one recomputation. One driver, two row-kernel families R, each over a
// device kernel set K (weighted_ce_driver.h):
//   CeRows<K>   weighted_linear_cross_entropy   weighted_ce_linear_ce_driver.h
//   DivRows<K>  weighted_linear_divergence      weighted_ce_div_driver.h
// A family is an object holding its per-row tensors for one pass (inputs; the statistics it
// writes, or the saved ones it reads; the upstream gradient) and provides:
//   static constexpr bool kTiles;        without gradients, rows may stream in vocabulary tiles
//   static constexpr int kStateFields;   per-row statistics carried from tile to tile
//   struct Part;                         its rows of one chunk
//   bool writes_stats() const;           a pass with statistics (forward) or without (backward)
//   Part take(const RowSet&, int64_t r0, int64_t rows) const;
//   void scatter(const RowSet&, int64_t r0, int64_t rows, const Part&) const;  // gathered rows
//   void stats(const Part&, const Tensor& z, const Tensor& state, int64_t c0) const;  // a tile
//   void stats_grad(const Part&, const Tensor& z, const Tensor& out) const;  // whole rows
//   void grad(const Part&, const Tensor& z, const Tensor& out) const;        // whole rows
// where z is the chunk's logits tile (acc dtype) and out receives G = dL/dz (z itself, or a bf16
// buffer for the GEMMs on CUDA).
//
// FLOPs (M rows, M_a of them active: a nonzero gradient is possible; H hidden; V vocab):
//   forward, no gradient needed          2MHV  (logits chunks only)
//   forward computing unit gradients     2MHV + 4 M_a HV  (dhidden_unit = G W,
//                                        dweight_unit = G^T h, with G = dL/dz at g = 1; inactive
//                                        rows have G = 0 and only get their statistics, in a pass
//                                        without gradients)
//   backward, g uniform on active rows (and, for the cross-entropy, no gradient into lse): no
//                                        GEMM (rescale by g)
//   backward, otherwise: one recomputation, 2 M' HV + 2 M' HV per gradient it must still
//                                        produce (M' = M_a, or M with a gradient into lse).
// So the usual training step (loss = sum(loss_rows) / norm) costs 6MHV with every row active, the
// minimum for a trainable head; the PyTorch way costs 6MHV whatever the mask and materializes
// [M, V] logits, probabilities and their gradient.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

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

// The GEMM side of one fused call, prepared once: the operands (weight, bias) cast once where the
// device computes in acc dtype, and the chunk budget.
struct LinearInputs {
  Tensor hidden, weight_op, bias_acc;
  int64_t M = 0, H = 0, V = 0, budget = 0;
  at::ScalarType acc = at::kFloat;
  bool upcast = false;
};

// hidden, weight and bias as checked by check_linear_head (weighted_ce_checks.h).
template <class K>
LinearInputs prepare_linear(const Tensor& hidden, const Tensor& weight,
                            const std::optional<Tensor>& bias, int64_t chunk_size) {
  LinearInputs in;
  in.M = hidden.size(0);
  in.H = hidden.size(1);
  in.V = weight.size(0);
  in.acc = acc_dtype(hidden.scalar_type());
  in.upcast = K::kUpcastOperands;
  in.hidden = hidden;
  in.weight_op = in.upcast ? weight.to(in.acc) : weight;
  in.bias_acc = bias.has_value() ? bias->to(in.acc) : Tensor();
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

// Rows whose gradient can be nonzero (active) and the others, from the active mask and its count
// (read to the host by the caller); no index when all are active.
inline std::pair<RowSet, RowSet> split_rows(const Tensor& active, int64_t n_active, int64_t M) {
  if (n_active == M) {
    return {RowSet::all(M), RowSet{Tensor(), 0}};
  }
  return {RowSet{active.nonzero().squeeze(1), n_active},
          RowSet{active.logical_not().nonzero().squeeze(1), M - n_active}};
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

// Rows [r0, r0 + rows) of a pass's row set, with their hidden states in the GEMM operand dtype.
struct Chunk {
  int64_t r0 = 0, rows = 0;
  Tensor hidden;
};

inline Chunk take_chunk(const LinearInputs& in, const RowSet& set, int64_t r0, int64_t rows) {
  const Tensor hc = set.take(in.hidden, r0, rows);
  return {r0, rows, in.upcast ? hc.to(in.acc) : hc};
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

// Buffers of one pass: the chunk logits, G in the GEMM operand dtype where it differs from the acc
// dtype (CUDA fp16/bf16: the bf16 one is written by the row kernels, the fp16 one by
// scale_for_fp16) and the per-row state carried across vocabulary tiles.
struct PassBuffers {
  Tensor z, g, state;
  bool fp16_g = false;
};

// One pass over chunks of the rows in `set`. Each chunk's logits z = h_c W^T + b are
// materialized one [rows_per, cols_per] tile at a time (never [M, V]). With statistics and no
// gradient, the tiles stream into the family's statistics (cross-entropy: online log-sum-exp
// across tiles; a family without tiles takes whole rows); with gradients, a chunk spans whole rows
// (cols_per = V) and its logits are overwritten by G = dL/dz (in place, or into the bf16 / scaled
// fp16 buffer for the GEMMs on CUDA), which feeds the GEMMs of the gradients.
template <class R>
void linear_pass(const LinearInputs& in, const R& rows, const RowSet& set, LinearGrads& grads) {
  using K = typename R::Kernels;
  const int64_t V = in.V;
  if (set.count == 0) {
    return;
  }
  const bool stats = rows.writes_stats(), want_grad = grads.any();
  const int64_t rows_per = std::clamp<int64_t>(in.budget / V, 1, set.count);
  const int64_t cols_per =
      (want_grad || !R::kTiles) ? V : std::clamp<int64_t>(in.budget / rows_per, 1, V);
  const auto opts = in.hidden.options().dtype(in.acc);
  const at::ScalarType op_dtype = in.weight_op.scalar_type();
  PassBuffers buf;
  buf.z = at::empty({rows_per * cols_per}, opts);
  buf.g = (want_grad && op_dtype != in.acc) ? at::empty({rows_per * V}, opts.dtype(op_dtype))
                                            : Tensor();
  buf.fp16_g = buf.g.defined() && op_dtype == at::kHalf;
  buf.state = (stats && cols_per < V) ? at::empty({rows_per, R::kStateFields}, opts) : Tensor();

  for (int64_t r0 = 0; r0 < set.count; r0 += rows_per) {
    const int64_t n_rows = std::min(rows_per, set.count - r0);
    const Chunk ch = take_chunk(in, set, r0, n_rows);
    const auto part = rows.take(set, r0, n_rows);
    Tensor z;
    for (int64_t c0 = 0; c0 < V; c0 += cols_per) {
      const int64_t n = std::min(cols_per, V - c0);
      z = buf.z.narrow(0, 0, n_rows * n).view({n_rows, n});
      chunk_logits(in, ch, c0, n, z);
      if (stats && !want_grad) {
        rows.stats(part, z, buf.state.defined() ? buf.state.narrow(0, 0, n_rows) : Tensor(), c0);
      }
    }
    if (want_grad) {
      Tensor g = buf.g.defined() ? buf.g.narrow(0, 0, n_rows * V).view({n_rows, V}) : Tensor();
      const Tensor out = (g.defined() && !buf.fp16_g) ? g : z;
      if (stats) {
        rows.stats_grad(part, z, out);
      } else {
        rows.grad(part, z, out);
      }
      add_chunk_grads<K>(in, set, ch, buf.fp16_g ? scale_for_fp16(z, g) : ChunkGrad{out, out},
                         grads);
    }
    if (stats) {
      rows.scatter(set, r0, n_rows, part);
    }
  }
}

// The forward's passes: with gradients wanted, one over the active rows (statistics and unit
// gradients, GEMMs only for rows that have a gradient) and one without gradients over the others;
// else one over all rows.
template <class R>
void forward_passes(const LinearInputs& in, const R& rows, const Tensor& active, int64_t n_active,
                    LinearGrads& grads) {
  if (!grads.any()) {
    linear_pass(in, rows, RowSet::all(in.M), grads);
    return;
  }
  const auto [act, inact] = split_rows(active, n_active, in.M);
  linear_pass(in, rows, act, grads);
  LinearGrads none;
  linear_pass(in, rows, inact, none);
}

inline Tensor defined_or_empty(const Tensor& t, const at::TensorOptions& opts) {
  return t.defined() ? t : at::empty({0}, opts);
}

// g0 when the upstream gradient g equals g0 on every active row (0 when there is none), nullopt
// when it varies there. One host synchronization.
inline std::optional<double> uniform_grad(const Tensor& g, const Tensor& inactive) {
  if (!g.defined() || g.numel() == 0) {
    return 0.0;
  }
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

// The forward's unit gradients (the gradients of sum(loss_rows)), [0] where not computed.
struct UnitGrads {
  Tensor dhidden, dweight, dbias;

  void check(const LinearInputs& in) const {
    if (dhidden.numel() > 0) check_shape(dhidden, "dhidden_unit", {in.M, in.H});
    if (dweight.numel() > 0) check_shape(dweight, "dweight_unit", {in.V, in.H});
    if (dbias.numel() > 0) check_shape(dbias, "dbias_unit", {in.V});
  }
};

// What a backward needs beyond the family's rows: the upstream gradient g of loss_rows ([M] acc,
// or undefined), whether the unit gradients can be rescaled (not with a gradient into the
// cross-entropy's lse, which adds gl_m softmax(z_m), never stored), and the inactive rows.
struct BackwardPlan {
  Tensor g, inactive;
  bool rescalable = true;
  bool all_rows = false;  // recompute over every row (a gradient into lse reaches inactive rows)
};

// The backward. Row-wise scaling is exact for dhidden (row m of G scales with g_m), but dweight
// and dbias sum over rows, so the unit ones rescale only when g is uniform over the active rows.
// Whatever the unit gradients cannot give is recomputed in one pass (logits once more, plus one
// GEMM per remaining gradient) over `rows` (a family without statistics: the saved ones and the
// upstream gradients), over the active rows only unless plan.all_rows. Gradients in acc dtype.
template <class R>
LinearGrads linear_backward_grads(const LinearInputs& in, const R& rows, const BackwardPlan& plan,
                                  const UnitGrads& units, std::array<bool, 3> mask) {
  units.check(in);
  const bool have_dh = units.dhidden.numel() > 0, have_dw = units.dweight.numel() > 0,
             have_db = units.dbias.numel() > 0;
  const Tensor& g = plan.g;
  const auto opts = in.hidden.options().dtype(in.acc);
  LinearGrads out;
  if (plan.rescalable) {
    if (mask[0] && have_dh) {
      // Inactive rows have zero unit gradients; mask g there so that a non-finite g stays out,
      // and a row with g = 0 gets exactly 0 (also where its unit gradient is not finite).
      const Tensor gm = g.defined() ? g.masked_fill(plan.inactive, 0).unsqueeze(1) : Tensor();
      out.dhidden = gm.defined() ? units.dhidden.mul(gm).masked_fill_(gm.eq(0), 0)
                                 : at::zeros({in.M, in.H}, opts);
    }
    const bool want_sum = (mask[1] && have_dw) || (mask[2] && have_db);
    const std::optional<double> g0 = want_sum ? uniform_grad(g, plan.inactive) : std::nullopt;
    if (g0.has_value()) {
      const auto scaled = [&](const Tensor& unit) {
        return *g0 == 0 ? at::zeros_like(unit) : unit.mul(*g0);
      };
      if (mask[1] && have_dw) out.dweight = scaled(units.dweight);
      if (mask[2] && have_db) out.dbias = scaled(units.dbias);
    }
  }
  LinearGrads rest =
      alloc_grads(in, {mask[0] && !out.dhidden.defined(), mask[1] && !out.dweight.defined(),
                       mask[2] && !out.dbias.defined()});
  if (rest.any() && (g.defined() || !plan.rescalable)) {
    RowSet set = RowSet::all(in.M);
    if (!plan.all_rows) {
      const Tensor active = plan.inactive.logical_not();
      set = split_rows(active, in.M == 0 ? 0 : read_to_host({active.sum()})[0], in.M).first;
    }
    linear_pass(in, rows, set, rest);
  }
  out.dhidden = out.dhidden.defined() ? out.dhidden : rest.dhidden;
  out.dweight = out.dweight.defined() ? out.dweight : rest.dweight;
  out.dbias = out.dbias.defined() ? out.dbias : rest.dbias;
  return out;
}

// The backward op's outputs: the gradients in the dtypes of their inputs, [0] where not wanted.
inline std::tuple<Tensor, Tensor, Tensor> cast_grads(const LinearGrads& g, const Tensor& hidden,
                                                     const Tensor& weight,
                                                     const std::optional<Tensor>& bias,
                                                     at::ScalarType acc) {
  const auto empty = at::empty({0}, hidden.options().dtype(acc));
  return {g.dhidden.defined() ? g.dhidden.to(hidden.scalar_type()) : empty,
          g.dweight.defined() ? g.dweight.to(weight.scalar_type()) : empty,
          g.dbias.defined() ? g.dbias.to(bias->scalar_type()) : empty};
}

}  // namespace vsd_ext::wce
