// Torch-free logic of verify_tree shared by the CPU kernel (verify_tree_cpu.cpp) and the CUDA
// kernel (cuda/verify_tree_kernel.cu), so both make every decision with the same float64
// arithmetic.
// The rule itself is specified, readably, in vsd_ext/reference/verify_tree.py.
//
// Notation at the current node (logits row x, temperature T, M = max_v x_v):
//   e(v) = exp((x_v - M) / T)            unnormalized target probability, S = sum_v e(v),
//                                        p(v) = e(v) / S  (M-shift: no overflow for any T > 0)
//   target_only: r = p with rejected tokens zeroed; kept as the scalar m = rejected e-mass, so
//                r(v) = e(v) / (S - m) and no O(V) work is done per rejection.
//   sampled:     r_k, q_k after k rejections, unnormalized with sums R_k, Q_k.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "host_device.h"

namespace vsd_ext::verify {

enum Mode : int { kGreedy = 0, kTargetOnly = 1, kSampled = 2 };

// ---- per-element arithmetic (identical on host and device) ----------------------------------

// e(v) = exp((x - M) / T). x = -inf (a masked token) gives exactly 0.
VSD_HD double exp_term(double x, double max_logit, double temperature) {
  return exp((x - max_logit) / temperature);
}

// target_only: accept child token with unnormalized mass e_c iff u < r(c) = e_c / (S - m).
// Written without the division: S - m can only reach <= 0 through rounding when every token was
// rejected, and a token with r(c) = 0 is never accepted.
VSD_HD bool accept_target_only(double u, double e_c, double total, double rejected) {
  return e_c > 0.0 && u * (total - rejected) < e_c;
}

// sampled: accept iff u < min(1, r(x) / q(x))  <=>  u * q(x) < r(x)  (u < 1), with r, q
// normalized. q(x) = 0 (or an exhausted q, Q = 0) accepts iff r(x) > 0; r(x) = 0 never accepts.
VSD_HD double normalized_q(double q, double q_total) { return q_total > 0.0 ? q / q_total : 0.0; }

VSD_HD bool accept_sampled(double u, double r_x, double r_total, double q_x, double q_total) {
  return u * normalized_q(q_x, q_total) < r_x / r_total;
}

// One rejection: r_{k+1}(v) = max(r_k(v)/R_k - q_k(v)/Q_k, 0) (unnormalized; its sum is R_{k+1}).
VSD_HD double residual_step(double r, double r_total, double q, double q_total) {
  const double d = r / r_total - normalized_q(q, q_total);
  return d > 0.0 ? d : 0.0;
}

// ---- errors ----------------------------------------------------------------------------------
// Each row reports at most its first error in a canonical order (structure node by node, then
// uniforms, then the one error the walk can meet), as a key; over the batch the smallest
// (row, key) wins. CPU and CUDA therefore raise the same message for the same input.
//   key in [0, 4N):        node i = key / 4; sub 0: draft token out of range, 1: bad parent index,
//                          2: parent is a padding node
//   key in [4N, 5N + 1):   uniforms[b, key - 4N] outside [0, 1)
//   key in [5N + 1, ...):  node i = (key - 5N - 1) / 2; 0: logits row non-finite,
//                          1: draft_probs row invalid
constexpr uint64_t kNoError = ~uint64_t(0);

VSD_HD uint32_t key_token(int64_t i) { return uint32_t(4 * i); }
VSD_HD uint32_t key_parent(int64_t i) { return uint32_t(4 * i + 1); }
VSD_HD uint32_t key_parent_padding(int64_t i) { return uint32_t(4 * i + 2); }
VSD_HD uint32_t key_uniform(int64_t n, int64_t i) { return uint32_t(4 * n + i); }
VSD_HD uint32_t key_logits(int64_t n, int64_t i) { return uint32_t(5 * n + 1 + 2 * i); }
VSD_HD uint32_t key_draft_probs(int64_t n, int64_t i) { return uint32_t(5 * n + 2 + 2 * i); }
VSD_HD uint64_t batch_key(int64_t b, uint32_t key) { return (uint64_t(b) << 32) | key; }

// Structural check of node i of one row (`tokens`: that row's N draft tokens, `parent`: its
// parents[b, i]); returns the node's error key or kNoError.
template <typename Token>
VSD_HD uint64_t check_node(int64_t i, int64_t vocab, const Token* tokens, int64_t parent) {
  const int64_t tok = tokens[i];
  if (i == 0) {
    if (tok < 0 || tok >= vocab) return key_token(0);
    return parent == -1 ? kNoError : key_parent(0);
  }
  if (tok == -1) return kNoError;  // padding: never a child, its parent is ignored
  if (tok < 0 || tok >= vocab) return key_token(i);
  if (parent < 0 || parent >= i) return key_parent(i);
  return tokens[parent] == -1 ? key_parent_padding(i) : kNoError;
}

VSD_HD bool uniform_ok(double u) { return u >= 0.0 && u < 1.0; }  // false for NaN

// Host-side message for a batch key: {argument name, text}.
struct ErrorText {
  const char* arg;
  std::string text;
};

inline ErrorText error_text(uint64_t bkey, int64_t n, int64_t vocab) {
  const int64_t b = int64_t(bkey >> 32);
  const int64_t key = int64_t(bkey & 0xffffffffu);
  const std::string row = "row b=" + std::to_string(b);
  if (key < 4 * n) {
    const int64_t i = key / 4;
    const std::string at = "[" + std::to_string(b) + ", " + std::to_string(i) + "]";
    switch (key % 4) {
      case 0:
        return {"draft_tokens",
                "draft_tokens" + at + " must be a token id in [0, " + std::to_string(vocab) + ")" +
                    (i == 0 ? " (the root is always a real node)" : " or -1 (padding)")};
      case 1:
        return {"parents", i == 0 ? "parents" + at + " must be -1 (node 0 is the root)"
                                  : "parents" + at + " must be in [0, " + std::to_string(i) +
                                        ") (topological order: a parent precedes its child)"};
      default:
        return {"parents", "parents" + at + " points to a padding node (draft_tokens == -1); " +
                               "a real node's parent must be real"};
    }
  }
  if (key < 5 * n + 1) {
    return {"uniforms", "uniforms[" + std::to_string(b) + ", " + std::to_string(key - 4 * n) +
                            "] must be in [0, 1)"};
  }
  const int64_t i = (key - 5 * n - 1) / 2;
  const std::string at = "[" + std::to_string(b) + ", " + std::to_string(i) + "]";
  if ((key - 5 * n - 1) % 2 == 0) {
    return {"target_logits", "target_logits" + at +
                                 " (a row the walk uses) contains NaN or +inf, or has no finite "
                                 "entry (-inf alone masks a token)"};
  }
  return {"draft_probs", "draft_probs" + at +
                             " (a row the walk uses) must be finite and nonnegative with a "
                             "positive sum"};
}

}  // namespace vsd_ext::verify
