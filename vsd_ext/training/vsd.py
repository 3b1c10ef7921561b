"""The `vsd` objective: one EM step of Variational Speculative Decoding (docs/design/METHOD.md).

E-step, per sequence of the micro-batch (C = anchors, S = paths, K = depth, τ = sample
temperature; the sequence's target KV cache comes from the target's pass):
 1. C anchor positions a (the first predicted token x_{a+1} is a target); the root is the
    drafter's step-0 state at column a − 1 (pair (x_a, f_{a−1})).
 2. The drafter samples S i.i.d. paths z_1..z_K from q at τ, level by level: a tree of S
    chains under the root, run with `tree_level` for all sequences at once (tree attention
    over each sequence's step-0 keys/values, Bc = 1 per sequence). The levels are computed
    with autograd on: the M-step reuses them.
    Paths are i.i.d. draws from q (not EAGLE-2's without-replacement slots) so that each one,
    verified as a chain, yields an exact target sample.
 3. The target scores all C trees (1 + S·K nodes each) in one `tree_verify` forward over the
    cached prefix (`prefix_lens = a`, one cache row shared by the C rows).
 4. `verify_tree` (mode "sampled", temperature τ) runs lossless speculative sampling on the
    C·S chains: accepted counts n_s and emitted tokens e_{s,1..n_s+1} (exact target samples).
    α_{s,i} = min(1, p(z_i)/q(z_i)), utility U_s, ARW weights w_s (ESS ≥ ρS) and reach
    weights r_{s,i} = max(r_min, Π_{j<i} α_{s,j}).
M-step:
    L = Σ ω_{s,i} CE(e_{s,i}, q(· | x, e_{s,<i})) / Σ ω                (ARW, ω = w_s r_{s,i})
      + λ_CAR Σ_t c_t CE(p_t, q_t) / Σ_t c_t                          (CAR, c_t = conf^β)
      + λ_tok · eagle3 loss                                           (optional)
The emitted token e_{s,i} is predicted at the path's node of depth i − 1 (the root for
i = 1); accepted prefixes coincide with the sampled path, so every row reads a hidden state
the E-step already computed. CAR's CE differs from the KL(p‖q) it stands for by the teacher
entropy, a constant: metrics report the KL. Both terms are fused weighted CE calls (no logits).
docs/design/METHOD.md, "Known problems", says where this misses the objective it aims at.

Option `arw_target="soft"` (default "emitted"): each ARW row's hard
emitted token is replaced by the target's whole distribution at that node (already scored in
step 3) — the conditional expectation of the emitted token's one-hot given the path prefix,
a lower-variance (Rao-Blackwellized) estimate of the same likelihood term when the weights
do not depend on the emitted token; with ARW weights it is a weighted on-policy distillation
on the drafter's own accepted paths. `arw_positions="all"` (soft targets only) trains every
node of the sampled paths, weighted by the probability r_{s,i} that decoding reaches it —
the expectation over the verification outcome of the emitted-only rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.verify import verify_tree
from ..tree import chain_mask
from .drafting import causal_pass, draft_logits, step_rows, tree_level
from .eagle3 import eagle3_loss
from .weights import arw_path_weights, arw_position_weights, car_confidence, path_utility


def sample_anchors(ids: torch.Tensor, mask: torch.Tensor, count: int, gen):
    """`count` anchors a (with replacement) among 1 ≤ a ≤ T−2 with mask[a+1]; returns
    (anchors `[count]`, ok `[count]` bool — False when the sequence has no valid anchor)."""
    candidates = torch.nonzero(mask[2:]).flatten() + 1
    if candidates.numel() == 0:
        ones = torch.ones(count, dtype=torch.int64, device=ids.device)
        return ones, torch.zeros(count, dtype=torch.bool, device=ids.device)
    pick = torch.randint(0, candidates.numel(), (count,), generator=gen, device=ids.device)
    return candidates[pick], torch.ones(count, dtype=torch.bool, device=ids.device)


def sample_paths(step, h0, kv, anchors, cfg, gen):
    """Step 2 for every sequence at once (rows: B·C anchors, grouped by sequence; each group
    reads its sequence's step-0 keys/values). h0 `[B, L, H]`, kv: (k, v) `[B, L, Hkv, D]`,
    anchors `[B, C]`. Returns (z `[B, C, S, K]` draft ids, q `[B, C, S, K, Vd]` the
    distribution each z_i was drawn from, hidden `[B, C, S, K+1, H]`: the root state then
    the level-i node states, with gradient)."""
    drafter, vocab = step.drafter, step.vocab
    B, C = anchors.shape
    S, K, tau = cfg.paths, cfg.depth, cfg.sample_temperature
    R = B * C
    rows = torch.arange(B, device=anchors.device)[:, None]
    root = h0[rows, anchors - 1].reshape(R, -1)                        # [R, H]
    prefix = anchors.reshape(R)
    q = torch.softmax(draft_logits(drafter, root) / tau, -1)           # [R, Vd]
    z = torch.multinomial(q, S, replacement=True, generator=gen)       # [R, S]
    zs, qs, hs = [z], [q[:, None].expand(R, S, -1)], [root[:, None].expand(R, S, -1)]
    past = None
    for d in range(1, K + 1):
        positions = (prefix - 1 + d)[:, None].expand(R, S)
        h, past = tree_level(drafter, vocab.target_ids[z], hs[-1], positions, kv,
                             prefix, chain_mask(d, anchors.device, S), past)
        hs.append(h)
        if d < K:
            q = torch.softmax(draft_logits(drafter, h) / tau, -1)      # [R, S, Vd]
            z = torch.multinomial(q.reshape(R * S, -1), 1, generator=gen).view(R, S)
            zs.append(z)
            qs.append(q)
    return (torch.stack(zs, 2).view(B, C, S, K), torch.stack(qs, 2).view(B, C, S, K, -1),
            torch.stack(hs, 2).view(B, C, S, K + 1, -1))


@torch.no_grad()
def score_and_verify(step, batch, b, anchors, z, q, cfg, gen):
    """Steps 3–4 for sequence b: (alphas `[C, S, K]`, num_accepted `[C, S]`, emitted
    `[C, S, K+1]` target ids, −1 padded, teacher `[C, S, K+1, Vd]`: the target's logits
    after chain node i, on the draft vocabulary)."""
    vocab, target = step.vocab, step.target
    C, S, K = z.shape
    tau = cfg.sample_temperature
    device = z.device
    ztok = vocab.target_ids[z]                                         # [C, S, K]
    roots = batch.input_ids[b, anchors]                                # x_a
    # The tree, level-major: node (l, s) (z_{l+1} of path s) at index 1 + l·S + s.
    tokens = torch.cat((roots[:, None], ztok.transpose(1, 2).reshape(C, S * K)), 1)
    node = 1 + torch.arange(K, device=device)[None] * S + torch.arange(S, device=device)[:, None]
    parent = torch.cat((torch.zeros(S, 1, dtype=torch.int64, device=device), node[:, :-1]), 1)
    parents = torch.full((S * K + 1,), -1, dtype=torch.int64, device=device)
    parents[node.flatten()] = parent.flatten()
    with torch.autocast(device.type, enabled=False):  # the target runs in its own dtype
        scored = target.tree_verify(tokens, parents.expand(C, -1).contiguous(),
                                    batch.cache.row(b), prefix_lens=anchors)
    # Each path as a chain: root, z_1..z_K; q at chain node i drew node i + 1.
    chain = torch.cat((torch.zeros(S, 1, dtype=torch.int64, device=device), node), 1)
    logits = scored.logits[:, chain]                                   # [C, S, K+1, V]
    chain_tokens = torch.cat((roots[:, None, None].expand(C, S, 1), ztok), 2)
    draft_probs = vocab.expand_probs(torch.cat((q, q.new_zeros(C, S, 1, q.shape[-1])), 2))
    V = logits.shape[-1]
    chain_parents = torch.arange(-1, K, device=device).expand(C * S, K + 1).contiguous()
    _, emitted, num = verify_tree(
        logits.reshape(C * S, K + 1, V), chain_tokens.reshape(C * S, K + 1), chain_parents,
        draft_probs=draft_probs.reshape(C * S, K + 1, V).float(), mode="sampled",
        temperature=tau, generator=gen)
    logp = torch.log_softmax(logits[:, :, :K].float() / tau, -1)
    p_z = logp.gather(-1, ztok[..., None])[..., 0].exp()
    q_z = q.gather(-1, z[..., None])[..., 0]
    alphas = (p_z / q_z).clamp(max=1.0)
    return alphas, num.view(C, S), emitted.view(C, S, K + 1), vocab.restrict(logits)


def car_term(step, batch, head, h0, cfg):
    """(loss, KL for metrics): Σ_t c_t CE(p_t, q_t) / Σ_t c_t on the step-0 columns."""
    valid = step_rows(batch.input_ids, batch.loss_mask, 0)
    teacher = batch.logits[:, 1:][valid]                               # l_{c+1}, [M, V]
    if teacher.shape[0] == 0:
        return h0.sum() * 0.0, 0.0
    conf = car_confidence(teacher, cfg.car_beta, cfg.confidence)
    weights = conf / conf.sum().clamp_min(1e-12)
    soft = step.vocab.restrict(teacher)
    rows = head(h0[valid], torch.zeros_like(conf, dtype=torch.int64), weights, soft)
    logp = torch.log_softmax(soft.float(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    loss = rows.sum()
    return loss, float(loss.detach() - (weights * entropy).sum())


@dataclass
class PathRecord:
    """The E-step of one sequence (row b of the micro-batch): anchors `[C]`, ok `[C]`
    (False: the sequence had no valid anchor), z `[C, S, K]` draft ids, q `[C, S, K, Vd]`,
    hidden `[C, S, K+1, H]` (root then levels, with gradient), alphas `[C, S, K]`,
    num_accepted `[C, S]`, emitted `[C, S, K+1]` target ids (−1 padded), teacher
    `[C, S, K+1, Vd]` the target's logits after each chain node (`score_and_verify`)."""

    b: int
    anchors: torch.Tensor
    ok: torch.Tensor
    z: torch.Tensor
    q: torch.Tensor
    hidden: torch.Tensor
    alphas: torch.Tensor
    num_accepted: torch.Tensor
    emitted: torch.Tensor
    teacher: torch.Tensor


def e_step(step, batch, h0, kv, gen) -> list[PathRecord]:
    """Steps 1–4 for every sequence of the micro-batch (h0, kv: the step-0 causal pass)."""
    cfg = step.config.vsd
    picks = [sample_anchors(batch.input_ids[b], batch.loss_mask[b], cfg.anchors, gen)
             for b in range(batch.input_ids.shape[0])]
    anchors = torch.stack([a for a, _ in picks])
    z, q, hidden = sample_paths(step, h0, kv, anchors, cfg, gen)
    records = []
    for b, (_, ok) in enumerate(picks):
        scored = score_and_verify(step, batch, b, anchors[b], z[b], q[b], cfg, gen)
        records.append(PathRecord(b, anchors[b], ok, z[b], q[b], hidden[b], *scored))
    return records


def arw_rows(record: PathRecord, vocab, cfg):
    """(targets `[C, S, K+1]` draft ids, −100 = ignored; ω = w_s · r_{s,i} `[C, S, K+1]`,
    unnormalized). Row (s, i) is the emitted token e_{s,i+1}, predicted at depth i. With
    `arw_target="soft"` every emitted position is a row (target 0, a placeholder: the row's
    soft target is `record.teacher`), tokens outside the draft vocabulary included, and with
    `arw_positions="all"` every depth 0..K of every path is a row (weighted by its reach
    probability r_{s,i}), not only the emitted ones."""
    utility = path_utility(record.alphas, cfg.utility, accepted=record.num_accepted)
    w = arw_path_weights(utility, cfg.rho, cfg.min_temperature)                  # [C, S]
    ones = torch.ones_like(record.alphas[..., :1])
    r = arw_position_weights(torch.cat((record.alphas, ones), -1), cfg.r_min)    # [C, S, K+1]
    targets = vocab.draft_targets(record.emitted)
    if cfg.arw_target == "soft":
        rows = record.emitted >= 0
        if cfg.arw_positions == "all":
            rows = torch.ones_like(rows)
        targets = torch.where(rows, 0, -100)
    targets = torch.where(record.ok[:, None, None], targets, torch.full_like(targets, -100))
    return targets, w[..., None] * r


def m_step(step, batch, head, h0, kv, records, gen):
    """(loss, metrics): ARW + λ_CAR · CAR + λ_tok · eagle3 (module docstring)."""
    cfg = step.config.vsd
    rows_h, rows_t, rows_w, rows_soft = [], [], [], []
    for record in records:
        targets, omega = arw_rows(record, step.vocab, cfg)
        keep = targets >= 0
        rows_h.append(record.hidden[keep])
        rows_t.append(targets[keep])
        rows_w.append(omega[keep])
        rows_soft.append(record.teacher[keep])
    omega = torch.cat(rows_w).float()
    omega = omega / omega.sum().clamp_min(1e-12)  # normalized to mean one, then / count
    soft = torch.cat(rows_soft) if cfg.arw_target == "soft" else None
    arw = head(torch.cat(rows_h), torch.cat(rows_t), omega, soft).sum()
    loss = arw
    metrics = {"arw": float(arw.detach()), "rows": int(omega.shape[0])}
    if cfg.lambda_car > 0:
        car, car_kl = car_term(step, batch, head, h0, cfg)
        loss = loss + cfg.lambda_car * car
        metrics["car_kl"] = car_kl
    if cfg.lambda_tok > 0:
        tok, _ = eagle3_loss(step, batch, head, gen, False, cfg.eagle3, (h0, kv))
        loss = loss + cfg.lambda_tok * tok
        metrics["tok"] = float(tok.detach())
    metrics["loss"] = float(loss.detach())
    ok = [r.ok for r in records]
    ell = torch.cat([path_utility(r.alphas)[r.ok] for r in records])
    if ell.numel():
        # One-step τ estimate at the sample temperature: 1 + expected accepted length ℓ of one
        # sampled chain of depth K, averaged over anchors and paths.
        metrics["tau_est"] = 1.0 + float(ell.mean())
        metrics["accepted"] = float(torch.cat([r.num_accepted[o].float()
                                               for r, o in zip(records, ok)]).mean())
    return loss, metrics


def vsd_loss(step, batch, head, gen, want_metrics: bool):
    h0, kv = causal_pass(step.drafter, batch.input_ids[:, 1:],
                         batch.features[:, :-1])
    records = e_step(step, batch, h0, kv, gen)
    return m_step(step, batch, head, h0, kv, records, gen)
