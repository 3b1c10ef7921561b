"""VSD's tree terms at T = 0: the target's greedy path inside the drafter's own tree
(docs/design/METHOD.md, "T = 0").

E-step, without gradients: at every anchor a the drafter builds the top-k tree the decoder
would build below the root pair (x_a, f_{a−1}) — `vsd_ext.decoding.build_tree` with the run's
depth, top-k, node budget and ranking temperature, its levels run by `tree_level` over each
sequence's step-0 keys/values; the target scores each sequence's trees in one `tree_verify`
forward; greedy verification returns y_1..y_n (the greedy tokens found in the tree) and
y_{n+1} (the target's next greedy token).

M-step: the drafter's states along y (the root, then y_1..y_n: the nodes decoding reached),
recomputed with gradients as one chain per anchor, each trained to predict the next greedy
token (cross-entropy, fused), weighted by 1 + Ŵ (`training.weights.greedy_row_weights`);
the sum is divided by the number of anchors.
"""
from __future__ import annotations

import torch

from ..decoding import TreeConfig, build_tree
from ..ops.verify import verify_tree
from ..tree import append_nodes, chain_mask
from .drafting import draft_logits, tree_level
from .weights import greedy_row_weights


class _TreeGrower:
    """The `expand` callback of `build_tree` for R anchor rows: runs each level's frontier
    with `tree_level` (level 1 below the root, which lives in the cache), keeping the
    drafter nodes' keys/values, bitmask and depths so far."""

    def __init__(self, step, kv, prefix, root_hidden, ranking_temperature):
        self.step, self.kv, self.prefix = step, kv, prefix
        self.hidden = root_hidden[:, None]                    # [R, 1, H] states of the frontier
        self.t_r = ranking_temperature
        self.past = self.mask = self.depths = None
        self.start = 0

    def __call__(self, tokens, parent_slot, valid):
        drafter, vocab = self.step.drafter, self.step.vocab
        R, k = tokens.shape
        device = tokens.device
        if self.mask is None:  # level 1: children of the root, one single-node chain each
            mask = chain_mask(1, device, k).expand(R, -1, -1)
            depths = torch.ones(R, k, dtype=torch.int64, device=device)
            hidden = self.hidden.expand(-1, k, -1)
        else:
            parents = torch.where(valid, self.start + parent_slot, -1)
            mask, depths = append_nodes(self.mask, self.depths, parents)
            hidden = self.hidden.gather(1, parent_slot.clamp(min=0)[..., None].expand(
                -1, -1, self.hidden.shape[-1]))
        new_depths = depths[:, -k:]
        positions = self.prefix[:, None] - 1 + new_depths.clamp(min=1)
        ids = torch.where(valid, vocab.target_ids[tokens], -1)
        h, self.past = tree_level(drafter, ids, hidden, positions, self.kv, self.prefix, mask,
                                  self.past)
        self.start = 0 if self.mask is None else self.mask.shape[1]
        self.mask, self.depths, self.hidden = mask, depths, h
        return draft_logits(drafter, h) / self.t_r


@torch.no_grad()
def draft_trees(step, h0, kv, anchors, cfg):
    """The decoder's top-k tree below every anchor: `DraftTree` of R = B·C rows (target ids,
    node 0 the root x_a filled in by the caller)."""
    B, C = anchors.shape
    R = B * C
    rows = torch.arange(B, device=anchors.device)[:, None]
    root = h0[rows, anchors - 1].reshape(R, -1)
    prefix = anchors.reshape(R)
    grower = _TreeGrower(step, kv, prefix, root, cfg.ranking_temperature)
    tree = TreeConfig(depth=cfg.depth, topk=cfg.tree_topk, total_tokens=cfg.tree_nodes)
    root_logits = draft_logits(step.drafter, root) / cfg.ranking_temperature
    placeholder = torch.zeros(R, dtype=torch.int64, device=anchors.device)
    return build_tree(root_logits, grower, tree, placeholder,
                      draft_to_target=step.vocab.target_ids,
                      vocab_size=step.vocab.vocab_size)


@torch.no_grad()
def greedy_paths(step, batch, anchors, tree):
    """(num_accepted `[B, C]`, emitted `[B, C, N]` target ids: y_1..y_{n+1}, −1 padded)."""
    B, C = anchors.shape
    tokens = tree.tokens.view(B, C, -1).clone()
    tokens[:, :, 0] = batch.input_ids.gather(1, anchors)              # the roots x_a
    parents = tree.parents.view(B, C, -1)
    nums, emitted = [], []
    for b in range(B):
        with torch.autocast(anchors.device.type, enabled=False):
            scored = step.target.tree_verify(tokens[b], parents[b], batch.cache.row(b),
                                             prefix_lens=anchors[b])
        _, out, num = verify_tree(scored.logits, tokens[b], parents[b], mode="greedy")
        nums.append(num)
        emitted.append(out)
    return torch.stack(nums), torch.stack(emitted)


def path_states(step, h0, kv, anchors, emitted, levels):
    """The drafter's states along each greedy path, with gradients: `[R, levels + 1, H]`,
    entry k the state after y_1..y_k (entry 0: the root's step-0 state)."""
    B, C = anchors.shape
    R = B * C
    rows = torch.arange(B, device=anchors.device)[:, None]
    states = [h0[rows, anchors - 1].reshape(R, 1, -1)]
    prefix = anchors.reshape(R)
    ys = emitted.reshape(R, -1)
    past = None
    for j in range(1, levels + 1):
        positions = (prefix - 1 + j)[:, None]
        h, past = tree_level(step.drafter, ys[:, j - 1:j], states[-1], positions, kv, prefix,
                             chain_mask(j, anchors.device), past)
        states.append(h)
    return torch.cat(states, 1)


def greedy_tree_loss(step, batch, head, h0, kv, anchors, ok, gen):
    """(tree loss, metrics) at T = 0 (module docstring)."""
    cfg = step.config.vsd
    tree = draft_trees(step, h0, kv, anchors, cfg)
    num, emitted = greedy_paths(step, batch, anchors, tree)
    levels = int(num[ok].max()) if bool(ok.any()) else 0
    states = path_states(step, h0, kv, anchors, emitted, levels)      # [R, levels + 1, H]
    targets = step.vocab.draft_targets(emitted.reshape(-1, emitted.shape[-1])[:, :levels + 1])
    mean_n = float(num[ok].float().mean()) if bool(ok.any()) else 0.0
    weights = greedy_row_weights(num.reshape(-1), levels, cfg.future_value, mean_n)
    weights = weights * ok.reshape(-1, 1) * (targets >= 0)
    keep = weights > 0
    loss = head(states[keep], targets[keep], weights[keep]).sum()
    metrics = {"rows": int(keep.sum()), "tau_est": 1.0 + mean_n,
               "accepted": mean_n}
    return loss / ok.sum().clamp_min(1), metrics
