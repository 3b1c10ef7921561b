// Argument checks of the weighted cross-entropy family, shared by the CPU kernels and the CUDA
// adapter (through the device-generic drivers, weighted_ce_driver.h). Every failure is a
// ValueError naming the argument, expected vs actual.
//
// The accumulation dtype `acc` is float64 when the logits/hidden states are float64, else float32.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <initializer_list>
#include <optional>
#include <utility>

#include "checks.h"

namespace vsd_ext::wce {

inline at::ScalarType acc_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
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

// hidden [M, H], weight [V, H] (V >= 1) and bias [V] of a fused op.
inline void check_linear_head(const at::Tensor& hidden, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t chunk_size) {
  check_dim(hidden, "hidden", 2);
  check_float(hidden, "hidden");
  check_dim(weight, "weight", 2);
  check_same_dtype(weight, "weight", hidden, "hidden");
  check_same_device(weight, "weight", hidden, "hidden");
  const int64_t H = hidden.size(1), V = weight.size(0);
  VSD_CHECK(weight.size(1) == H, "weight", "expected shape [V, ", H, "] (H from 'hidden' ",
            shape_str(hidden), "), got ", shape_str(weight));
  VSD_CHECK(V >= 1, "weight", "expected at least one class (V >= 1), got shape ",
            shape_str(weight));
  if (bias.has_value()) {
    check_shape(*bias, "bias", {V});
    check_same_dtype(*bias, "bias", weight, "weight");
    check_same_device(*bias, "bias", weight, "weight");
  }
  VSD_CHECK(chunk_size >= 0, "chunk_size", "expected >= 0 (0 = default), got ", chunk_size);
}

inline void check_linear_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                                const at::Tensor& targets, const at::Tensor& row_weights,
                                const std::optional<at::Tensor>& soft,
                                const std::optional<at::Tensor>& bias, double temperature,
                                int64_t chunk_size) {
  check_linear_head(hidden, weight, bias, chunk_size);
  check_row_inputs(targets, row_weights, soft, hidden.size(0), weight.size(0), hidden, "hidden",
                   temperature);
}

// The inputs of weighted_linear_divergence.
inline void check_div_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                             const at::Tensor& teacher, const at::Tensor& tv_weights,
                             const at::Tensor& kl_weights, const std::optional<at::Tensor>& bias,
                             double temperature, int64_t chunk_size) {
  check_linear_head(hidden, weight, bias, chunk_size);
  const int64_t M = hidden.size(0), V = weight.size(0);
  check_shape(teacher, "teacher_logits", {M, V});
  check_float(teacher, "teacher_logits");
  check_same_device(teacher, "teacher_logits", hidden, "hidden");
  for (const auto& [w, name] :
       {std::pair{&tv_weights, "tv_weights"}, std::pair{&kl_weights, "kl_weights"}}) {
    check_shape(*w, name, {M});
    check_dtype(*w, name, {at::kFloat});
    check_same_device(*w, name, hidden, "hidden");
  }
  VSD_CHECK(std::isfinite(temperature) && temperature > 0, "soft_temperature",
            "expected a finite value > 0, got ", temperature);
}

// The per-row statistics a divergence backward reads: lse, soft_lse, q_less, kl ([M], acc).
inline void check_div_saved_stats(std::initializer_list<at::Tensor> stats, int64_t M,
                                  const at::Tensor& hidden) {
  const char* names[] = {"lse", "soft_lse", "q_less", "kl"};
  int i = 0;
  for (const at::Tensor& t : stats) {
    check_shape(t, names[i], {M});
    check_dtype(t, names[i], {acc_dtype(hidden.scalar_type())});
    check_same_device(t, names[i], hidden, "hidden");
    ++i;
  }
}

inline void check_saved_stats(const at::Tensor& lse, const at::Tensor& soft_lse, bool has_soft,
                              int64_t M, const at::Tensor& ref, const char* ref_name) {
  check_shape(lse, "lse", {M});
  check_dtype(lse, "lse", {acc_dtype(ref.scalar_type())});
  check_same_device(lse, "lse", ref, ref_name);
  check_shape(soft_lse, "soft_lse", {has_soft ? M : 0});
  check_same_dtype(soft_lse, "soft_lse", lse, "lse");
  check_same_device(soft_lse, "soft_lse", ref, ref_name);
}

}  // namespace vsd_ext::wce
