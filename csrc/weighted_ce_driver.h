// Device-generic drivers of the weighted cross-entropy ops (non-fused; the fused linear variant
// is in weighted_ce_linear_driver.h): argument checks, allocation and the calls of the device
// row kernels. The row kernels come from a kernel set K, which each device implements (CPU:
// weighted_ce_cpu.h, CUDA: cuda/weighted_ce_adapter.cpp over cuda/weighted_ce_kernel.cu):
//
//   struct K {
//     static constexpr bool kUpcastOperands;   // GEMM operands in acc dtype (CPU) or native (CUDA)
//     static constexpr int64_t kDefaultChunk;  // cap of the default chunk, in logits elements
//     static void stats(const StatsArgs&);
//     static void grad(const GradArgs&);
//     static void stats_grad(const StatsArgs&, const GradArgs&);  // both on one whole-row tile
//     static void colsum_add(const at::Tensor& g, at::Tensor& out);  // out[v] += sum_r g[r, v]
//     static void div_stats(const DivArgs&);       // the divergence rows (weighted_ce_div_math.h)
//     static void div_grad(const DivArgs&);
//     static void div_stats_grad(const DivArgs&);  // both on the same whole rows
//   };
//
// All per-row tensors (targets, row weights, upstream gradients, statistics) are contiguous; the
// accumulation dtype `acc` is float64 when the logits/hidden states are float64, else float32.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/where.h>

#include <optional>
#include <tuple>
#include <vector>

#include "weighted_ce_checks.h"

namespace vsd_ext::wce {

using Tensor = at::Tensor;

// ---- The kernel-set interface: arguments of the two row kernels ------------------------------

// Statistics of a [rows, n] tile of logits (columns col0 .. col0+n of a vocabulary of size
// `vocab`). A row may be streamed in several vocabulary tiles: the first tile starts fresh
// statistics, later ones merge into `state`, the last one writes loss, lse and soft_lse.
struct StatsArgs {
  at::Tensor logits;       // [rows, n] any float dtype, unit column stride
  at::Tensor soft;         // [rows, n] teacher logits (as logits) or undefined
  at::Tensor targets;      // [rows] int64
  at::Tensor row_weights;  // [rows] acc
  at::Tensor state;        // [rows, 6] acc (RowStats fields); undefined when first && last
  at::Tensor loss, lse;    // [rows] acc, written by the last tile
  at::Tensor soft_lse;     // [rows] acc, by the last tile; undefined without soft targets
  int64_t col0 = 0;
  int64_t vocab = 0;
  bool first = true;
  bool last = true;
  int64_t ignore_index = -100;
  double temperature = 1.0;
};

// out[m, v] = a_m exp(z[m, v] - lse_m) - c_m y[m, v] over whole rows (see weighted_ce_math.h),
// with a_m, c_m from the upstream gradients g_m (grad_loss) and gl_m (grad_lse).
struct GradArgs {
  at::Tensor logits;       // [rows, V] any float dtype, unit column stride
  at::Tensor soft;         // [rows, V] or undefined
  at::Tensor targets;      // [rows] int64
  at::Tensor row_weights;  // [rows] acc
  at::Tensor grad_loss;    // [rows] acc, or undefined: every g_m = (unit_grad_loss ? 1 : 0)
  bool unit_grad_loss = false;
  at::Tensor grad_lse;  // [rows] acc, or undefined: every gl_m = 0
  at::Tensor lse;       // [rows] acc
  at::Tensor soft_lse;  // [rows] acc or undefined without soft targets
  at::Tensor out;       // [rows, V] any float dtype, unit column stride; may be `logits` itself
  int64_t ignore_index = -100;
  double temperature = 1.0;
};

// The divergence rows of a [rows, V] chunk of whole rows (weighted_ce_div_math.h): div_stats
// writes the statistics, div_grad reads them (as saved by the forward) and writes out = dL/dz,
// div_stats_grad does both in one pass over each row.
struct DivArgs {
  at::Tensor logits;                  // [rows, V] acc dtype (the chunk's logits), unit col stride
  at::Tensor teacher;                 // [rows, V] any float dtype, unit column stride
  at::Tensor tv_weights, kl_weights;  // [rows] acc
  at::Tensor grad_loss;               // [rows] acc, or undefined: every g = unit_grad_loss ? 1 : 0
  bool unit_grad_loss = false;
  // [rows] acc: all written by div_stats; lse, soft_lse, q_less and kl read by div_grad.
  at::Tensor loss, beta, kl, lse, soft_lse, q_less;
  at::Tensor out;  // [rows, V]: the logits themselves, or a bf16 buffer (CUDA); undefined: none
  double temperature = 1.0;
};

// ---- Helpers of the drivers --------------------------------------------------------------

inline at::Tensor unit_col_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// out = alpha (a @ b) (accumulate: out += alpha (a @ b)), out in acc dtype; a, b in acc dtype or,
// on CUDA, in fp16/bf16 with fp32 accumulation and output (cuBLAS through the out_dtype
// overloads). With beta = 0 the old contents of out are not read.
inline void gemm(Tensor& out, const Tensor& a, const Tensor& b, bool accumulate,
                 double alpha = 1.0) {
  const bool mixed = a.scalar_type() != out.scalar_type();
  if (!accumulate && alpha == 1.0) {
    if (mixed) {
      at::mm_out(out, a, b, out.scalar_type());
    } else {
      at::mm_out(out, a, b);
    }
    return;
  }
  const double beta = accumulate ? 1.0 : 0.0;
  if (mixed) {
    at::addmm_out(out, out, a, b, out.scalar_type(), beta, alpha);
  } else {
    at::addmm_out(out, out, a, b, beta, alpha);
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

// ---- Host reads and the targets check ---------------------------------------------------------

// 0-dim int64 tensors (on the device of the call) read to the host together: one synchronization
// on CUDA, however many values a call needs.
inline std::vector<int64_t> read_to_host(const std::vector<Tensor>& scalars) {
  std::vector<int64_t> values;
  if (scalars.empty()) {
    return values;
  }
  const Tensor host = at::stack(scalars).to(at::kCPU);
  const int64_t* p = host.data_ptr<int64_t>();
  values.assign(p, p + host.numel());
  return values;
}

// 0-dim int64: the first row whose hard target is neither ignore_index nor in [0, V); M if none.
inline Tensor first_bad_target(const Tensor& targets, int64_t V, int64_t ignore_index) {
  const int64_t M = targets.size(0);
  const Tensor bad = targets.ne(ignore_index).logical_and(targets.lt(0).logical_or(targets.ge(V)));
  const Tensor rows = at::arange(M, targets.options());
  return at::where(bad, rows, at::full_like(rows, M)).min();
}

// Raises the ValueError of an out-of-range hard target at `row` (none when row == M).
inline void raise_bad_target(const Tensor& targets, int64_t row, int64_t V, int64_t ignore_index) {
  VSD_CHECK(row >= targets.size(0), "targets", "expected class indices in [0, ", V,
            ") or ignore_index (", ignore_index, "), got ", targets[row].item<int64_t>(),
            " at row ", row);
}

// Every hard target is ignore_index or in [0, V), on every device (one synchronization on CUDA):
// an out-of-range target would otherwise index outside the row on the CPU and give a NaN loss but
// a finite, wrong gradient on CUDA.
inline void check_targets(const Tensor& targets, int64_t V, int64_t ignore_index) {
  if (targets.size(0) > 0) {
    raise_bad_target(targets, read_to_host({first_bad_target(targets, V, ignore_index)})[0], V,
                     ignore_index);
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
    check_targets(a.targets, V, ignore_index);
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
  if (!soft.has_value()) {
    check_targets(a.targets, V, ignore_index);
  }
  if (M > 0) {
    K::grad(a);
  }
  return a.out;
}

}  // namespace vsd_ext::wce
