// Argument checks of verify_tree shared by the CPU kernel and the CUDA adapter (shapes, dtypes,
// devices, mode, temperature). Data checks (tree structure, token ranges, uniforms in [0, 1),
// non-finite logits / invalid draft_probs in the rows the walk uses) run inside the kernels,
// which report the first offending entry; raise_row_error turns that report into a ValueError.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "checks.h"
#include "verify_tree_math.h"

namespace vsd_ext {

struct VerifyTreeDims {
  int64_t batch, nodes, vocab;
};

inline VerifyTreeDims check_verify_tree_args(const at::Tensor& target_logits,
                                             const at::Tensor& draft_tokens,
                                             const at::Tensor& parents, const at::Tensor& uniforms,
                                             const std::optional<at::Tensor>& draft_probs,
                                             int64_t mode, double temperature) {
  VSD_CHECK(mode == verify::kGreedy || mode == verify::kTargetOnly || mode == verify::kSampled,
            "mode", "expected 0 (greedy), 1 (target_only) or 2 (sampled), got ", mode);
  VSD_CHECK(mode == verify::kGreedy || (std::isfinite(temperature) && temperature > 0.0),
            "temperature", "expected a finite value > 0, got ", temperature);
  check_dim(target_logits, "target_logits", 3);
  check_dtype(target_logits, "target_logits", {at::kHalf, at::kBFloat16, at::kFloat});
  const int64_t B = target_logits.size(0), N = target_logits.size(1), V = target_logits.size(2);
  VSD_CHECK(N >= 1, "target_logits", "expected at least one node (the root), got shape ",
            shape_str(target_logits));
  VSD_CHECK(V >= 1, "target_logits", "expected a vocabulary of at least 1, got shape ",
            shape_str(target_logits));
  VSD_CHECK(V < (int64_t(1) << 31), "target_logits", "vocabulary size ", V,
            " exceeds the supported 2^31 - 1");
  VSD_CHECK(N < (int64_t(1) << 26), "target_logits", "node count ", N,
            " exceeds the supported 2^26");
  check_shape(draft_tokens, "draft_tokens", {B, N});
  check_dtype(draft_tokens, "draft_tokens", {at::kLong});
  check_same_device(draft_tokens, "draft_tokens", target_logits, "target_logits");
  check_shape(parents, "parents", {B, N});
  check_dtype(parents, "parents", {at::kLong});
  check_same_device(parents, "parents", target_logits, "target_logits");
  check_shape(uniforms, "uniforms", {B, N + 1});
  check_dtype(uniforms, "uniforms", {at::kFloat, at::kDouble});
  check_same_device(uniforms, "uniforms", target_logits, "target_logits");
  if (draft_probs.has_value()) {
    check_shape(*draft_probs, "draft_probs", {B, N, V});
    check_dtype(*draft_probs, "draft_probs", {at::kFloat, at::kBFloat16});
    check_same_device(*draft_probs, "draft_probs", target_logits, "target_logits");
  } else {
    VSD_CHECK(mode != verify::kSampled, "draft_probs",
              "required for mode 2 (sampled): the distributions the children were drafted from");
  }
  return {B, N, V};
}

// A [B, N, V] tensor whose rows can be read with strides (batch, node) and a unit last stride.
inline at::Tensor with_unit_last_stride(const at::Tensor& t) {
  return t.size(2) <= 1 || t.stride(2) == 1 ? t : t.contiguous();
}

inline void raise_row_error(uint64_t key, int64_t nodes, int64_t vocab) {
  if (key == verify::kNoError) return;
  const verify::ErrorText e = verify::error_text(key, nodes, vocab);
  VSD_CHECK(false, e.arg, e.text);
}

}  // namespace vsd_ext
