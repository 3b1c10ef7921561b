"""The `eagle3` objective: training-time test with soft targets (docs/design/METHOD.md, baselines).

    L = Σ_{j<K} decay^j · (1/n_j) Σ_{c valid at j} CE( softmax(l_{c+1+j}|_{Vd} / τ_s), q_j(c) )

q_j(c) is the drafter's step-j distribution at column c (`drafting.unroll`: fed its own
step-(j−1) hidden state), l the target's logits restricted to the draft vocabulary (so the
teacher is the target renormalized on it), n_j the number of columns whose predicted token
x_{c+2+j} is a target (loss mask). All K steps' rows go through one fused weighted CE call;
the row weight decay^j / n_j carries both the step weight and the mean.
"""
from __future__ import annotations

import torch

from .drafting import draft_argmax, step_rows, unroll


def gather_step_rows(batch, hiddens, vocab, with_soft: bool = True):
    """Per unrolled step j: (valid `[B, T−1]`, hidden rows `[n_j, H]`, teacher logits rows
    `[n_j, Vd]` restricted to the draft vocabulary, or None)."""
    ids, mask, logits = batch.input_ids, batch.loss_mask, batch.logits
    T = ids.shape[1]
    out = []
    for j, h in enumerate(hiddens):
        valid = step_rows(ids, mask, j)
        soft = None
        if with_soft:
            soft = vocab.restrict(logits[:, 1 + j:][valid[:, :T - 1 - j]])
        out.append((valid, h[valid], soft))
    return out


def greedy_tau_estimate(step, batch, rows) -> float:
    """One-step τ estimate at T = 0 from an unroll: 1 + the mean number of leading steps whose
    greedy draft token equals the target's greedy token (on the draft vocabulary), over the
    columns valid at every step. Teacher-forced on the data's tokens, so it equals a chain
    draft's τ only where the data is the target's greedy continuation."""
    T = batch.input_ids.shape[1]
    leading, alive = None, None
    for j, (valid, hidden, _) in enumerate(rows):
        match = torch.zeros_like(valid)
        if hidden.shape[0]:
            target_greedy = step.vocab.restrict(batch.logits[:, 1 + j:][valid[:, :T - 1 - j]]
                                                ).argmax(-1)
            match[valid] = draft_argmax(step.drafter, hidden) == target_greedy
        alive = match if alive is None else alive & match
        leading = alive.long() if leading is None else leading + alive.long()
    columns = rows[-1][0]
    if not bool(columns.any()):
        return float("nan")
    return 1.0 + float(leading[columns].float().mean())


def eagle3_loss(step, batch, head, gen, want_metrics: bool, cfg=None, step0=None):
    """(loss, metrics) of one micro-batch (module docstring). cfg: an `Eagle3Config`
    (default: the run's `eagle3`); step0: a `causal_pass` result to reuse (VSD's λ_tok)."""
    cfg = cfg or step.config.eagle3
    hiddens = unroll(step.drafter, batch.input_ids, batch.features, cfg.steps, step0)
    rows = gather_step_rows(batch, hiddens, step.vocab)
    weights = []
    for j, (_, hidden, _) in enumerate(rows):
        n = hidden.shape[0]
        weights.append(torch.full((n,), cfg.step_decay ** j / max(n, 1),
                                  device=hidden.device))
    hidden = torch.cat([r[1] for r in rows])
    soft = torch.cat([r[2] for r in rows])
    targets = torch.zeros(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    loss_rows = head(hidden, targets, torch.cat(weights), soft, cfg.soft_temperature)
    loss = loss_rows.sum()
    metrics = {"loss": float(loss.detach()), "rows": hidden.shape[0]}
    if want_metrics:
        sizes = [r[1].shape[0] for r in rows]
        per_step = torch.split(loss_rows.detach(), sizes)
        # step 0's rows weigh 1/n_0 each: their sum is the mean CE of step 0
        metrics["ce_step0"] = float(per_step[0].sum()) if sizes[0] else float("nan")
        metrics["tau_est"] = greedy_tau_estimate(step, batch, rows)
    return loss, metrics
