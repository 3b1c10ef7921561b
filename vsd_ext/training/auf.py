"""The `auf` objective: Accept-Until-Fail (docs/design/METHOD.md, baselines).

The same training-time-test unroll as eagle3, with hard targets. At column c the greedy
draft ĝ_j(c) = argmax q_j(c) either matches the ground truth x_{c+2+j} or not; step j is
trained only while every earlier step matched:

    keep_j(c) = Π_{i<j} [ĝ_i(c) = x_{c+2+i}]          (keep_0 = 1: up to and including the
    L = Σ_{j,c} keep_j(c) · CE(x_{c+2+j}, q_j(c)) / Σ_{j,c} keep_j(c)      first mismatch)

over columns whose predicted token is a target. Greedy ids come from row-chunked logits
without gradient (`draft_argmax`); the loss itself is one fused weighted CE call. A ground
truth token outside the draft vocabulary counts as a mismatch and is not trained.
"""
from __future__ import annotations

import torch

from .drafting import draft_argmax, step_rows, unroll
from .eagle3 import gather_step_rows, greedy_tau_estimate


def auf_loss(step, batch, head, gen, want_metrics: bool):
    cfg = step.config.auf
    ids, mask = batch.input_ids, batch.loss_mask
    T = ids.shape[1]
    hiddens = unroll(step.drafter, ids, batch.features, cfg.steps)
    alive = None  # [B, T−1]: every step so far matched (match only exists on kept rows)
    kept_hidden, kept_targets = [], []
    for j, h in enumerate(hiddens):
        valid = step_rows(ids, mask, j)
        truth = torch.full(valid.shape, -100, dtype=torch.int64, device=ids.device)
        if T - 2 - j > 0:
            truth[:, :T - 2 - j] = step.vocab.draft_targets(ids[:, 2 + j:])
        keep = valid & (truth >= 0)
        if alive is not None:
            keep &= alive
        match = torch.zeros_like(valid)
        if bool(keep.any()):
            match[keep] = draft_argmax(step.drafter, h[keep]) == truth[keep]
        kept_hidden.append(h[keep])
        kept_targets.append(truth[keep])
        alive = match
    hidden = torch.cat(kept_hidden)
    targets = torch.cat(kept_targets)
    n = hidden.shape[0]
    weights = torch.full((n,), 1.0 / max(n, 1), device=hidden.device)
    loss = head(hidden, targets, weights).sum()
    metrics = {"loss": float(loss.detach()), "rows": n}
    if want_metrics:
        metrics["tau_est"] = greedy_tau_estimate(step, batch,
                                                 gather_step_rows(batch, hiddens, step.vocab))
        metrics["kept_per_column"] = n / max(int(step_rows(ids, mask, 0).sum()), 1)
    return loss, metrics
