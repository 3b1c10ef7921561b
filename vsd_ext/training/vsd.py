"""The `vsd` objective (docs/design/METHOD.md): an E-step at the decoding temperature over the
nodes decoding would reach, an M-step on what decoding rewards there, and EAGLE-3's token
loss as an anchor.

    L = λ_tok · eagle3 (unrolled to the tree depth) + λ_tree · tree terms / anchors

Tree terms: T > 0 — `vsd_sampled` (acceptance mass × reach × future value, a score-function
term with a per-context baseline, KL(q ‖ p)); T = 0 — `vsd_greedy` (the target's greedy path
inside the drafter's own top-k tree, cross-entropy on its next greedy token).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .drafting import causal_pass
from .eagle3 import eagle3_loss
from .vsd_greedy import greedy_tree_loss
from .vsd_sampled import sampled_tree_loss


def sample_anchors(ids: torch.Tensor, mask: torch.Tensor, count: int, gen):
    """`count` anchors a (with replacement) among 1 ≤ a ≤ T−2 with mask[a+1]; returns
    (anchors `[count]`, ok `[count]` bool — False when the sequence has no valid anchor)."""
    candidates = torch.nonzero(mask[2:]).flatten() + 1
    if candidates.numel() == 0:
        ones = torch.ones(count, dtype=torch.int64, device=ids.device)
        return ones, torch.zeros(count, dtype=torch.bool, device=ids.device)
    pick = torch.randint(0, candidates.numel(), (count,), generator=gen, device=ids.device)
    return candidates[pick], torch.ones(count, dtype=torch.bool, device=ids.device)


def vsd_loss(step, batch, head, gen, want_metrics: bool):
    """(loss, metrics) of one micro-batch (module docstring)."""
    cfg = step.config.vsd
    h0, kv = causal_pass(step.drafter, batch.input_ids[:, 1:], batch.features[:, :-1])
    picks = [sample_anchors(batch.input_ids[b], batch.loss_mask[b], cfg.anchors, gen)
             for b in range(batch.input_ids.shape[0])]
    anchors = torch.stack([a for a, _ in picks])
    ok = torch.stack([o for _, o in picks])
    tree_terms = sampled_tree_loss if cfg.temperature > 0 else greedy_tree_loss
    tree, metrics = tree_terms(step, batch, head, h0, kv, anchors, ok, gen)
    anchor_cfg = replace(step.config.eagle3, steps=cfg.unroll_steps)
    tok, _ = eagle3_loss(step, batch, head, gen, False, anchor_cfg, (h0, kv))
    loss = cfg.lambda_tok * tok + cfg.lambda_tree * tree
    metrics.update(loss=float(loss.detach()), tok=float(tok.detach()),
                   tree=float(tree.detach()))
    return loss, metrics
