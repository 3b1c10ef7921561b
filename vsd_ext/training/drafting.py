"""The drafter's training-time passes, shared by every objective (no logits are formed here).

Alignment (the same as `vsd_ext.decoding.proposer.DrafterProposer`): for a sequence x_0..x_{T−1}
with target features f_t and target logits l_t (l_t is the distribution of x_{t+1}), the
drafter's column c (c = 0..T−2) is the pair (token x_{c+1}, feature f_c) at position c;
its step-0 output predicts x_{c+2}, whose target distribution is l_{c+1}.

- `causal_pass`: step 0 over every column, causal attention (SDPA); returns the hidden
  states and the keys/values, which later passes read as a cache shared by their rows.
- `tree_level`: one level of draft nodes under many roots of one sequence (the rows), all
  reading that sequence's step-0 keys/values as a cache with `Bc = 1`
  (`vsd_ext.tree_attention`, differentiable w.r.t. the cache too); earlier levels' keys and
  values are passed as `past` and stay in the graph.
- `unroll`: EAGLE-3's training-time test. Step j (j ≥ 1) at column c reads the token
  x_{c+1+j}, the drafter's own step-(j−1) hidden state at column c, sits at position c + j
  and attends to step-0 columns 0..c plus steps 1..j of its own column — exactly what a
  depth-j draft node below the root pair c sees at decoding time. It predicts x_{c+2+j}.

Loss heads never materialize logits: objectives pass `head_inputs(...)` (the final-normed
hidden rows) and the LM head weight to `vsd_ext.weighted_linear_cross_entropy`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import KVCache
from ..models.layers import AttentionContext
from ..tree import chain_mask


def causal_pass(drafter, tokens: torch.Tensor, features: torch.Tensor):
    """Step 0: tokens `[B, L]` (x_{c+1}), features `[B, L, F]` (f_c) at positions 0..L−1 →
    (hidden `[B, L, H]` pre-norm, (k, v) `[B, L, Hkv, D]`)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
    ctx = AttentionContext(keep_kv=True)
    hidden = drafter.layer(tokens, drafter.features(features), positions, ctx)
    return hidden, ctx.kv[0]


def tree_level(drafter, tokens, hidden, positions, cache, prefix_lens, mask, past=None):
    """One level of n new draft nodes for R rows: G sequences × R/G rows each.

    tokens `[R, n]` (target ids), hidden `[R, n, H]` (the parents' drafter states),
    positions `[R, n]`, cache: (k, v) `[G, L, Hkv, D]` (each sequence's step-0 keys/values;
    rows g·R/G .. (g+1)·R/G − 1 read row g), prefix_lens `[R]`, mask `[R or 1, P + n, W]`
    over past + new nodes, past: (k, v) `[R, P, Hkv, D]` or None. Returns (hidden
    `[R, n, H]`, (k, v) of the P + n nodes).
    """
    k0, v0 = cache
    ctx = AttentionContext(mode="tree", cache=KVCache.wrap(k0[None], v0[None]),
                           prefix_lens=prefix_lens, tree_mask=mask.expand(tokens.shape[0], -1, -1),
                           past=None if past is None else [past], keep_kv=True)
    return drafter.layer(tokens, hidden, positions, ctx), ctx.kv[0]


def unroll(drafter, input_ids: torch.Tensor, features: torch.Tensor, steps: int,
           step0=None) -> list[torch.Tensor]:
    """EAGLE-3 training-time test (module docstring) over a batch `[B, T]`.

    Returns `steps` hidden tensors `[B, T−1, H]`; entry j at column c predicts x_{c+2+j}
    (meaningful while c + 2 + j ≤ T − 1). step0: a `causal_pass` result to reuse.
    """
    B, T = input_ids.shape
    L = T - 1
    h, (k0, v0) = step0 if step0 is not None else causal_pass(
        drafter, input_ids[:, 1:], features[:, :-1])
    outs = [h]
    device = input_ids.device
    columns = torch.arange(L, device=device)
    positions = columns.repeat(B)[:, None]                 # rows: (sequence, column)
    prefix = columns.repeat(B) + 1
    past = None
    shifted = torch.cat((input_ids, torch.full((B, steps), -1, dtype=torch.int64,
                                               device=device)), 1)
    for j in range(1, steps):
        tokens = shifted[:, 1 + j:1 + j + L].reshape(B * L, 1)
        hj, past = tree_level(drafter, tokens, outs[-1].reshape(B * L, 1, -1),
                              positions + j, (k0, v0), prefix, chain_mask(j, device), past)
        outs.append(hj.view(B, L, -1))
    return outs


class DraftVocab:
    """Maps between target ids and draft ids of a drafter (`d2t`/`t2d`)."""

    def __init__(self, drafter):
        Vd, V = drafter.draft_vocab_size, drafter.model_config.vocab_size
        device = drafter.d2t.device
        self.target_ids = drafter.to_target_ids(torch.arange(Vd, device=device))  # [Vd]
        self.to_draft = torch.full((V,), -100, dtype=torch.int64, device=device)
        self.to_draft[self.target_ids] = torch.arange(Vd, device=device)
        self.size, self.vocab_size = Vd, V

    def draft_targets(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Target ids → draft ids; −100 (ignore) for ids outside the draft vocabulary and for
        negative ids (padding)."""
        return torch.where(target_ids >= 0, self.to_draft[target_ids.clamp(min=0)],
                           torch.full_like(target_ids, -100))

    def restrict(self, target_logits: torch.Tensor) -> torch.Tensor:
        """`[..., V]` target logits → `[..., Vd]` (the draft vocabulary's entries; a softmax
        of them is the target distribution renormalized on the draft vocabulary)."""
        if self.size == self.vocab_size:
            return target_logits
        return target_logits.index_select(-1, self.target_ids)

    def expand_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """`[..., Vd]` draft probabilities → `[..., V]` (zeros outside the draft vocabulary)."""
        if self.size == self.vocab_size:
            return probs
        out = probs.new_zeros(*probs.shape[:-1], self.vocab_size)
        out[..., self.target_ids] = probs
        return out


def head_inputs(drafter, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's input rows: final RMSNorm of pre-norm hidden states `[..., H]`."""
    return drafter.norm(hidden)


@torch.no_grad()
def draft_logits(drafter, hidden: torch.Tensor) -> torch.Tensor:
    """Logits `[..., Vd]` (fp32, no gradient) for the few rows that sampling or greedy
    matching needs (anchors, tree levels); training losses never call this."""
    return F.linear(drafter.norm(hidden), drafter.lm_head.weight).float()


@torch.no_grad()
def draft_argmax(drafter, hidden: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Greedy draft ids of hidden rows `[M, H]`, in row chunks (at most
    `chunk_rows · Vd` logits exist at a time)."""
    out = [draft_logits(drafter, hidden[i:i + chunk_rows]).argmax(-1)
           for i in range(0, hidden.shape[0], chunk_rows)]
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.int64)


def step_rows(input_ids: torch.Tensor, loss_mask: torch.Tensor, step: int) -> torch.Tensor:
    """`[B, T−1]` bool: columns c whose step-`step` prediction x_{c+2+step} is a target."""
    B, T = input_ids.shape
    valid = torch.zeros(B, T - 1, dtype=torch.bool, device=input_ids.device)
    n = T - 2 - step
    if n > 0:
        valid[:, :n] = loss_mask[:, 2 + step:]
    return valid
