// Every schema of the vsd_ext op library, and nothing else. Kernels register per device with
// TORCH_LIBRARY_IMPL(vsd_ext, CPU/CUDA, m) next to their code; fake (meta) kernels and autograd
// live in vsd_ext/ops/. Contracts: shared/design/OPS.md.
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
}
