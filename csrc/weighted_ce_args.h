// Arguments of the two row kernels of the weighted cross-entropy (statistics and gradient), which
// each device implements (CPU: csrc/weighted_ce_rows.cpp, CUDA: csrc/cuda/weighted_ce.cu via its
// adapter), and the argument checks shared by every op of the family.
//
// All per-row tensors (targets, row weights, upstream gradients, statistics) are contiguous; the
// accumulation dtype `acc` is float64 when the logits/hidden states are float64, else float32.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>

#include "common.h"

namespace vsd_ext::wce {

// Statistics of a [rows, n] tile of logits (columns col0 .. col0+n of a vocabulary of size
// `vocab`). A row may be streamed in several vocabulary tiles: the first tile starts fresh
// statistics, later ones merge into `state`, the last one writes loss, lse and soft_lse.
struct StatsArgs {
  at::Tensor logits;       // [rows, n] any float dtype, unit column stride
  at::Tensor soft;         // [rows, n] teacher logits (any float dtype, unit column stride) or undefined
  at::Tensor targets;      // [rows] int64
  at::Tensor row_weights;  // [rows] acc
  at::Tensor state;        // [rows, 6] acc (RowStats fields); undefined when first && last
  at::Tensor loss, lse;    // [rows] acc, written by the last tile
  at::Tensor soft_lse;     // [rows] acc (written by the last tile) or undefined without soft targets
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
  at::Tensor grad_lse;     // [rows] acc, or undefined: every gl_m = 0
  at::Tensor lse;          // [rows] acc
  at::Tensor soft_lse;     // [rows] acc or undefined without soft targets
  at::Tensor out;          // [rows, V] any float dtype, unit column stride; may be `logits` itself
  int64_t ignore_index = -100;
  double temperature = 1.0;
};

inline at::ScalarType acc_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::Tensor unit_col_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

inline void check_float(const at::Tensor& t, const char* name) {
  check_dtype(t, name, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble});
}

// targets, row_weights and soft_targets for M rows and V classes, on the device of `ref`.
inline void check_row_inputs(const at::Tensor& targets, const at::Tensor& row_weights,
                             const std::optional<at::Tensor>& soft, int64_t M, int64_t V,
                             const at::Tensor& ref, const char* ref_name, double temperature) {
  check_shape(targets, "targets", {M});
  check_dtype(targets, "targets", {at::kLong});
  check_same_device(targets, "targets", ref, ref_name);
  check_shape(row_weights, "row_weights", {M});
  check_dtype(row_weights, "row_weights", {at::kFloat});
  check_same_device(row_weights, "row_weights", ref, ref_name);
  if (soft.has_value()) {
    check_shape(*soft, "soft_targets", {M, V});
    check_float(*soft, "soft_targets");
    check_same_device(*soft, "soft_targets", ref, ref_name);
  }
  VSD_CHECK(std::isfinite(temperature) && temperature > 0, "soft_temperature",
            "expected a finite value > 0, got ", temperature);
}

inline void check_logits_inputs(const at::Tensor& logits, const at::Tensor& targets,
                                const at::Tensor& row_weights,
                                const std::optional<at::Tensor>& soft, double temperature) {
  check_dim(logits, "logits", 2);
  check_float(logits, "logits");
  VSD_CHECK(logits.size(1) >= 1, "logits", "expected at least one class, got shape ",
            shape_str(logits));
  check_row_inputs(targets, row_weights, soft, logits.size(0), logits.size(1), logits, "logits",
                   temperature);
}

inline void check_linear_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                                const at::Tensor& targets, const at::Tensor& row_weights,
                                const std::optional<at::Tensor>& soft,
                                const std::optional<at::Tensor>& bias, double temperature,
                                int64_t chunk_size) {
  check_dim(hidden, "hidden", 2);
  check_float(hidden, "hidden");
  check_dim(weight, "weight", 2);
  check_same_dtype(weight, "weight", hidden, "hidden");
  check_same_device(weight, "weight", hidden, "hidden");
  const int64_t M = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  VSD_CHECK(weight.size(1) == H, "weight", "expected shape [V, ", H, "] (H from 'hidden' ",
            shape_str(hidden), "), got ", shape_str(weight));
  VSD_CHECK(V >= 1, "weight", "expected at least one class (V >= 1), got shape ",
            shape_str(weight));
  if (bias.has_value()) {
    check_shape(*bias, "bias", {V});
    check_same_dtype(*bias, "bias", weight, "weight");
    check_same_device(*bias, "bias", weight, "weight");
  }
  check_row_inputs(targets, row_weights, soft, M, V, hidden, "hidden", temperature);
  VSD_CHECK(chunk_size >= 0, "chunk_size", "expected >= 0 (0 = default), got ", chunk_size);
}

}  // namespace vsd_ext::wce
