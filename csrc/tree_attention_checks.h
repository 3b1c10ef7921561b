// Argument checks of tree_attention and its backward, shared by the CPU kernel and the CUDA
// adapter. Every failure is a ValueError naming the argument, expected vs actual.
#pragma once

#include "checks.h"
#include "tree_attention_math.h"

#include <cmath>
#include <optional>
#include <vector>

namespace vsd_ext::tree_attn {

// lse (and its gradient) is float32, float64 for float64 inputs.
inline at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

struct Dims {
  int64_t B, N, Hq, Hkv, D, Bc, L, W, group;
};

// Every argument of the forward (the backward gets the same ones): shapes, dtypes, devices,
// strides, and a finite sm_scale. B = 0 and N = 0 are valid (empty results); Hq = 0 and D = 0
// are not (there would be no head to attend with, and no default scale 1 / sqrt(D)).
inline Dims check_forward_args(const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& prefix_lens,
                               const at::Tensor& k_tree, const at::Tensor& v_tree,
                               const at::Tensor& tree_mask, double sm_scale) {
  check_dim(q, "q", 4);
  check_dtype(q, "q", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  VSD_CHECK(q.size(2) >= 1, "q", "expected at least one query head (Hq >= 1), got shape ",
            shape_str(q));
  VSD_CHECK(q.size(3) >= 1, "q", "expected a head dim D >= 1, got shape ", shape_str(q));
  VSD_CHECK(std::isfinite(sm_scale), "sm_scale", "expected a finite softmax scale, got ", sm_scale);
  check_dim(k_cache, "k_cache", 4);
  Dims d{};
  d.B = q.size(0);
  d.N = q.size(1);
  d.Hq = q.size(2);
  d.D = q.size(3);
  d.Bc = k_cache.size(0);
  d.L = k_cache.size(1);
  d.Hkv = k_cache.size(2);
  d.W = mask_words(d.N);
  VSD_CHECK(d.Bc == 1 || d.Bc == d.B, "k_cache",
            "expected batch size 1 (shared cache) or B = ", d.B, ", got shape ",
            shape_str(k_cache));
  VSD_CHECK(k_cache.size(3) == d.D, "k_cache", "expected head dim D = ", d.D,
            " (that of 'q'), got shape ", shape_str(k_cache));
  VSD_CHECK(d.Hkv >= 1 && d.Hq % d.Hkv == 0, "k_cache",
            "expected a number of kv heads that divides Hq = ", d.Hq, ", got shape ",
            shape_str(k_cache));
  d.group = d.Hq / d.Hkv;
  check_shape(v_cache, "v_cache", {d.Bc, d.L, d.Hkv, d.D});
  check_shape(k_tree, "k_tree", {d.B, d.N, d.Hkv, d.D});
  check_shape(v_tree, "v_tree", {d.B, d.N, d.Hkv, d.D});
  check_shape(tree_mask, "tree_mask", {d.B, d.N, d.W});
  check_shape(prefix_lens, "prefix_lens", {d.B});
  check_dtype(tree_mask, "tree_mask", {at::kLong});
  check_dtype(prefix_lens, "prefix_lens", {at::kInt, at::kLong});
  const std::pair<const at::Tensor*, const char*> same[] = {
      {&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&k_tree, "k_tree"}, {&v_tree, "v_tree"}};
  for (const auto& [t, name] : same) {
    check_same_dtype(*t, name, q, "q");
    check_same_device(*t, name, q, "q");
    check_last_dim_contiguous(*t, name);
  }
  check_same_device(tree_mask, "tree_mask", q, "q");
  check_same_device(prefix_lens, "prefix_lens", q, "q");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(tree_mask, "tree_mask");
  return d;
}

// Host-side value check of prefix_lens (a [B] tensor already on the CPU).
inline void check_prefix_range(int64_t min_len, int64_t max_len, int64_t L) {
  VSD_CHECK(min_len >= 0 && max_len <= L, "prefix_lens", "expected values in [0, L = ", L,
            "], got values in [", min_len, ", ", max_len, "]");
}

// prefix_lens of a CPU call as host integers, range-checked (defined in tree_attention_cpu.cpp).
std::vector<int64_t> host_prefix_lens(const at::Tensor& prefix_lens, int64_t L);

inline void check_backward_args(const Dims& d, const at::Tensor& q, const at::Tensor& grad_out,
                                const std::optional<at::Tensor>& grad_lse, const at::Tensor& out,
                                const at::Tensor& lse) {
  check_shape(grad_out, "grad_out", {d.B, d.N, d.Hq, d.D});
  check_shape(out, "out", {d.B, d.N, d.Hq, d.D});
  check_shape(lse, "lse", {d.B, d.N, d.Hq});
  check_same_dtype(grad_out, "grad_out", q, "q");
  check_same_dtype(out, "out", q, "q");
  check_dtype(lse, "lse", {lse_dtype(q)});
  check_same_device(grad_out, "grad_out", q, "q");
  check_same_device(out, "out", q, "q");
  check_same_device(lse, "lse", q, "q");
  check_last_dim_contiguous(grad_out, "grad_out");
  check_last_dim_contiguous(out, "out");
  if (grad_lse.has_value()) {
    check_shape(*grad_lse, "grad_lse", {d.B, d.N, d.Hq});
    check_dtype(*grad_lse, "grad_lse", {lse_dtype(q)});
    check_same_device(*grad_lse, "grad_lse", q, "q");
  }
}

}  // namespace vsd_ext::tree_attn
