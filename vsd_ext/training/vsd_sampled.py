"""VSD's tree terms at a decoding temperature T > 0 (docs/design/METHOD.md, "T > 0").

E-step (no gradient except the drafter's states, which the M-step reuses): at every anchor
a the drafter's root state is its step-0 state at column a − 1 (the pair (x_a, f_{a−1}));
it samples S i.i.d. chains z_1..z_K from q_T level by level (`tree_level`, all sequences at
once, each reading its own step-0 keys/values); the target scores all chains of a sequence
in one `tree_verify` forward over its cached prefix; each chain is verified ("sampled").

M-step rows: node k of chain s (k = 0..K−1; the root, shared by the S chains, once per
anchor) with q_T and the target's p_T there:
    (1 − β) weighted λ_accept · r · (1 + Ŵ)   (root: the mean of 1 + Ŵ_{s,0} over s, b)
    KL(q_T ‖ p_T) weighted λ_kl · r
    root only, baseline "mean": CE(z_{s,1}) weighted 1[q(z) < p(z)] (1 + Ŵ_{s,0} − b) / S
(r: reach, Ŵ: future value, `training.weights`). The sum is divided by the number of
anchors. Both row kinds go through fused kernels that never form the drafter's logits.
"""
from __future__ import annotations

import torch

from ..ops.verify import verify_tree
from ..tree import chain_mask
from .drafting import draft_logits, tree_level
from .weights import future_values, path_length, reach_weights


def sample_paths(step, h0, kv, anchors, cfg, gen):
    """The S chains of every anchor (rows: B·C anchors, grouped by sequence). Returns
    (z `[B, C, S, K]` draft ids, q `[B, C, S, K, Vd]` the distribution (at T) each z_i was
    drawn from, hidden `[B, C, S, K+1, H]`: the root state then the level states, with
    gradient)."""
    drafter, vocab = step.drafter, step.vocab
    B, C = anchors.shape
    S, K, T = cfg.paths, cfg.depth, cfg.temperature
    R = B * C
    rows = torch.arange(B, device=anchors.device)[:, None]
    root = h0[rows, anchors - 1].reshape(R, -1)                        # [R, H]
    prefix = anchors.reshape(R)
    q = torch.softmax(draft_logits(drafter, root) / T, -1)             # [R, Vd]
    z = torch.multinomial(q, S, replacement=True, generator=gen)       # [R, S]
    zs, qs, hs = [z], [q[:, None].expand(R, S, -1)], [root[:, None].expand(R, S, -1)]
    past = None
    for d in range(1, K):
        positions = (prefix - 1 + d)[:, None].expand(R, S)
        h, past = tree_level(drafter, vocab.target_ids[z], hs[-1], positions, kv,
                             prefix, chain_mask(d, anchors.device, S), past)
        hs.append(h)
        q = torch.softmax(draft_logits(drafter, h) / T, -1)            # [R, S, Vd]
        z = torch.multinomial(q.reshape(R * S, -1), 1, generator=gen).view(R, S)
        zs.append(z)
        qs.append(q)
    return (torch.stack(zs, 2).view(B, C, S, K), torch.stack(qs, 2).view(B, C, S, K, -1),
            torch.stack(hs, 2).view(B, C, S, K, -1))


def chains_tree(roots: torch.Tensor, ztok: torch.Tensor):
    """One tree per anchor holding its S chains, level-major (node (l, s), the token
    z_{l+1} of chain s, at index 1 + l·S + s): (tokens `[C, 1 + S·K]`, parents, and the
    chain's node indices `[S, K + 1]` root first)."""
    C, S, K = ztok.shape
    device = ztok.device
    tokens = torch.cat((roots[:, None], ztok.transpose(1, 2).reshape(C, S * K)), 1)
    node = 1 + torch.arange(K, device=device)[None] * S + torch.arange(S, device=device)[:, None]
    parent = torch.cat((torch.zeros(S, 1, dtype=torch.int64, device=device), node[:, :-1]), 1)
    parents = torch.full((S * K + 1,), -1, dtype=torch.int64, device=device)
    parents[node.flatten()] = parent.flatten()
    chain = torch.cat((torch.zeros(S, 1, dtype=torch.int64, device=device), node), 1)
    return tokens, parents.expand(C, -1).contiguous(), chain


@torch.no_grad()
def score_and_verify(step, batch, b, anchors, z, q, T, gen):
    """Target scoring and verification of sequence b's chains: (alphas `[C, S, K]` at T,
    num_accepted `[C, S]`, teacher `[C, S, K, Vd]`: the target's raw logits at chain node
    k, on the draft vocabulary — the distribution of z_{k+1})."""
    vocab, target = step.vocab, step.target
    C, S, K = z.shape
    ztok = vocab.target_ids[z]                                         # [C, S, K]
    roots = batch.input_ids[b, anchors]                                # x_a
    tokens, parents, chain = chains_tree(roots, ztok)
    with torch.autocast(z.device.type, enabled=False):  # the target runs in its own dtype
        scored = target.tree_verify(tokens, parents, batch.cache.row(b), prefix_lens=anchors)
    logits = scored.logits[:, chain]                                   # [C, S, K+1, V]
    chain_tokens = torch.cat((roots[:, None, None].expand(C, S, 1), ztok), 2)
    draft_probs = vocab.expand_probs(torch.cat((q, q.new_zeros(C, S, 1, q.shape[-1])), 2))
    V = logits.shape[-1]
    chain_parents = torch.arange(-1, K, device=z.device).expand(C * S, K + 1).contiguous()
    _, _, num = verify_tree(
        logits.reshape(C * S, K + 1, V), chain_tokens.reshape(C * S, K + 1), chain_parents,
        draft_probs=draft_probs.reshape(C * S, K + 1, V).float(), mode="sampled",
        temperature=T, generator=gen)
    logp = torch.log_softmax(logits[:, :, :K].float() / T, -1)
    p_z = logp.gather(-1, ztok[..., None])[..., 0].exp()
    q_z = q.gather(-1, z[..., None])[..., 0]
    alphas = (p_z / q_z).clamp(max=1.0)
    return alphas, num.view(C, S), vocab.restrict(logits[:, :, :K])


def node_weights(alphas, num, ok, cfg):
    """(β weights, KL weights) `[B, C, S, K]` of every node (k = 0: the root, counted in
    column s = 0 only) and the baseline b `[B, C]` (module docstring)."""
    K = alphas.shape[-1]
    if cfg.reach == "expected":
        reach = reach_weights(alphas)
    else:  # node k is reached iff the chain's first k tokens were accepted
        reach = (torch.arange(K, device=num.device) <= num[..., None]).to(alphas.dtype)
    value = 1.0 + future_values(alphas) if cfg.future_value else torch.ones_like(alphas)
    base = value[..., 0].mean(-1)                                      # [B, C]
    root_once = torch.zeros_like(alphas[..., 0])                       # [B, C, S]
    root_once[..., 0] = 1.0
    beta_w = reach * value
    beta_w[..., 0] = root_once * base[..., None]
    kl_w = reach.clone()
    kl_w[..., 0] = root_once
    live = ok[..., None, None].to(alphas.dtype)
    return cfg.lambda_accept * beta_w * live, cfg.lambda_kl * kl_w * live, base


def root_score_rows(step, head, hidden, z, q, teacher, alphas, base, ok, cfg):
    """The score-function term at the root (baseline "mean"): Σ rows of CE(z_{s,1})."""
    T = cfg.temperature
    p = torch.softmax(teacher[:, :, 0, 0].float() / T, -1)             # [B, C, Vd]
    z1 = z[..., 0]                                                      # [B, C, S]
    q_z = q[:, :, :, 0].gather(-1, z1[..., None])[..., 0]
    p_z = p.gather(-1, z1)
    value = (1.0 + future_values(alphas)[..., 0] if cfg.future_value
             else torch.ones_like(q_z))
    weight = (q_z < p_z).to(q_z.dtype) * (value - base[..., None]) / cfg.paths
    weight = weight * ok[..., None]
    rows = hidden[:, :, :, 0].reshape(-1, hidden.shape[-1])
    return head(rows, z1.reshape(-1), weight.reshape(-1), temperature=T).sum()


def sampled_tree_loss(step, batch, head, h0, kv, anchors, ok, gen):
    """(tree loss, metrics) at T = `vsd.temperature` > 0 (module docstring)."""
    cfg = step.config.vsd
    z, q, hidden = sample_paths(step, h0, kv, anchors, cfg, gen)
    scored = [score_and_verify(step, batch, b, anchors[b], z[b], q[b], cfg.temperature, gen)
              for b in range(anchors.shape[0])]
    alphas, num, teacher = (torch.stack(t) for t in zip(*scored))
    beta_w, kl_w, base = node_weights(alphas, num, ok, cfg)
    keep = (beta_w != 0) | (kl_w != 0)
    loss, beta, kl = head.divergence(hidden[keep], teacher[keep], beta_w[keep], kl_w[keep],
                                     cfg.temperature)
    total = loss.sum()
    if cfg.baseline == "mean":
        total = total + root_score_rows(step, head, hidden, z, q, teacher, alphas, base, ok,
                                        cfg)
    anchors_ok = ok.sum().clamp_min(1)
    ell = path_length(alphas)[ok]
    metrics = {"rows": int(keep.sum()), "tau_est": 1.0 + float(ell.mean()) if ell.numel()
               else float("nan"), "accepted": float(num[ok].float().mean()) if ell.numel()
               else float("nan"), "beta": float(beta.mean()) if beta.numel() else float("nan"),
               "kl_qp": float(kl.mean()) if kl.numel() else float("nan")}
    return total / anchors_ok, metrics
