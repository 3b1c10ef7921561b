// Every schema of the vsd_ext op library, and nothing else. Kernels register per device with
// TORCH_LIBRARY_IMPL(vsd_ext, CPU/CUDA, m) next to their code; fake (meta) kernels and autograd
// live in vsd_ext/ops/. Contracts: docs/design/OPS.md.
#include <torch/library.h>

TORCH_LIBRARY(vsd_ext, m) {
  // ---- 2. Batched tree verification (lossless rejection sampling) --------------------------
  // mode: 0 = greedy, 1 = target_only, 2 = sampled (the Python wrapper maps the strings).
  m.def(
      "verify_tree(Tensor target_logits, Tensor draft_tokens, Tensor parents, Tensor uniforms, "
      "Tensor? draft_probs, int mode, float temperature) -> (Tensor, Tensor, Tensor)");

  // ---- 1. Tree-mask attention ---------------------------------------------------------------
  m.def(
      "tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor prefix_lens, "
      "Tensor k_tree, Tensor v_tree, Tensor tree_mask, float sm_scale) -> (Tensor, Tensor)");
  // Gradients w.r.t. (q, k_cache, v_cache, k_tree, v_tree) from the forward's saved out and lse;
  // grad_lse (the gradient of the lse output) may be None.
  m.def(
      "tree_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k_cache, "
      "Tensor v_cache, Tensor prefix_lens, Tensor k_tree, Tensor v_tree, Tensor tree_mask, "
      "Tensor out, Tensor lse, float sm_scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- 3. Fused weighted cross-entropy ----------------------------------------------------
  // Public API: vsd_ext.weighted_cross_entropy / weighted_linear_cross_entropy (Python wrappers
  // in vsd_ext/ops/cross_entropy.py, which own autograd). Every forward also returns soft_lse
  // (log-sum-exp of soft_targets / soft_temperature per row, [0] without soft targets) for the
  // backward. The fused forward computes, for grad_mask = (hidden, weight, bias), the gradients
  // of sum(loss_rows) ("unit" gradients, [0] when not asked); its backward rescales them or
  // recomputes (csrc/weighted_ce_driver.h). Absent upstream gradients are None.
  m.def(
      "weighted_cross_entropy_forward(Tensor logits, Tensor targets, Tensor row_weights, "
      "Tensor? soft_targets, int ignore_index, float soft_temperature) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "weighted_cross_entropy_backward(Tensor? grad_loss_rows, Tensor? grad_lse, Tensor logits, "
      "Tensor targets, Tensor row_weights, Tensor? soft_targets, Tensor lse, Tensor soft_lse, "
      "int ignore_index, float soft_temperature) -> Tensor");
  m.def(
      "weighted_linear_cross_entropy_forward(Tensor hidden, Tensor weight, Tensor targets, "
      "Tensor row_weights, Tensor? soft_targets, Tensor? bias, int ignore_index, "
      "float soft_temperature, int chunk_size, bool[3] grad_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "weighted_linear_cross_entropy_backward(Tensor? grad_loss_rows, Tensor? grad_lse, "
      "Tensor hidden, Tensor weight, Tensor targets, Tensor row_weights, Tensor? soft_targets, "
      "Tensor? bias, Tensor lse, Tensor soft_lse, Tensor dhidden_unit, Tensor dweight_unit, "
      "Tensor dbias_unit, int ignore_index, float soft_temperature, int chunk_size, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- 4. Fused divergence terms of the VSD objective ---------------------------------------
  // Public API: vsd_ext.weighted_linear_divergence (vsd_ext/ops/divergence.py, which owns
  // autograd). The forward returns (loss_rows, beta, kl) and what the backward needs (lse,
  // soft_lse, q_less per row), then the unit gradients for grad_mask = (hidden, weight, bias)
  // ([0] when not asked), as the fused cross-entropy (csrc/weighted_ce_div_driver.h).
  m.def(
      "weighted_linear_divergence_forward(Tensor hidden, Tensor weight, Tensor teacher_logits, "
      "Tensor tv_weights, Tensor kl_weights, Tensor? bias, float soft_temperature, int chunk_size, "
      "bool[3] grad_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "weighted_linear_divergence_backward(Tensor grad_loss_rows, Tensor hidden, Tensor weight, "
      "Tensor teacher_logits, Tensor tv_weights, Tensor kl_weights, Tensor? bias, Tensor lse, "
      "Tensor soft_lse, Tensor q_less, Tensor kl, Tensor dhidden_unit, Tensor dweight_unit, "
      "Tensor dbias_unit, float soft_temperature, int chunk_size, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
}
