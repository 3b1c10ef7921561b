"""`DrafterProposer`: drafts the trees of `vsd_ext.decoding.generate` with an EAGLE-3
`vsd_ext.Drafter` (its KV cache, the (token, feature) pairs that feed it), through the
tree builder of `vsd_ext.decoding.draft_tree`."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..tree import append_child, append_nodes, chain_mask, padded_chain
from .draft_tree import DraftTree, TreeConfig, build_tree, child_slots


class DrafterProposer:
    """Drafts trees with an EAGLE-3 `vsd_ext.Drafter` for `vsd_ext.decoding.generate`.

    Feature alignment (EAGLE): the drafter reads pairs ``(token at position t + 1, target
    features at position t)`` and predicts the token at ``t + 2``. Its KV cache holds the
    pairs of committed positions; the newest pairs — those whose token was just emitted — wait
    in ``pending`` (a chain per row, ragged) and are run at the start of the next draft, as
    the first nodes of the drafter's tree: the chain's last node is the root pair, whose
    logits give level 1. After the tree is built the chain's keys/values are written to the
    cache, so every pair is computed once. Drafter forwards per step: ``depth``.

    Per-step overhead is kept off the drafter's forwards, which at decode sizes cost about as
    much in small ops as in GEMMs: the tree's mask and depths grow level by level
    (`vsd_ext.tree.append_nodes`, through the unchecked `Drafter.grow_tree`), the LM head
    runs only on the chain's root and on the frontier nodes, and the prompt's prefill skips it.

    The decoding loop's proposer interface: ``num_nodes`` (N of every proposed tree),
    ``start`` (after the target's prefill), ``propose`` (one tree per row), ``advance`` (the
    verified step), ``keep`` (drop finished rows).
    """

    def __init__(self, drafter, config: TreeConfig, temperature: float = 0.0,
                 generator: torch.Generator | None = None):
        self.drafter = drafter
        self.draft_temperature = temperature
        self.generator = generator
        self.cache = None
        self.pending = None  # (tokens [B, m], features [B, m, F], lengths [B])
        # on_level(logits [B, k, Vd]): called with the drafter's logits at the parents of
        # each level, level 1 (the root) first (`vsd_ext.decoding.calibrate` records them).
        self.on_level = None
        # A `vsd_ext.decoding.policy.StepPolicy` sizing each greedy tree (None: the config's).
        self.policy = None
        self.d2t_ids = drafter.to_target_ids(torch.arange(drafter.draft_vocab_size,
                                                          device=drafter.d2t.device))
        self.configure(config)

    def configure(self, config: TreeConfig) -> None:
        """Draft trees of this (sized) shape from the next `propose` on."""
        self.config = config
        self.sampled = bool(config.sampled) and self.draft_temperature > 0
        self.temperature = self.draft_temperature if self.sampled else 1.0
        self.num_nodes = config.num_nodes
        self.tree_config = replace(config, sampled=self.sampled)

    def start(self, prompt_ids: torch.Tensor, lengths: torch.Tensor, features: torch.Tensor,
              first_tokens: torch.Tensor, capacity: int) -> None:
        """prompt_ids ``[B, T]`` (right-padded with -1), lengths ``[B]``, the target's prefill
        features ``[B, T, F]`` and the first generated token ``[B]``: cache the pairs
        ``(x_{t+1}, f_t)`` for ``t < lengths − 1``; the pair ``(first, f_{lengths−1})`` waits."""
        B, T = prompt_ids.shape
        self.cache = self.drafter.new_cache(B, capacity + self.config.depth + 2)
        rows = torch.arange(B, device=prompt_ids.device)
        if T > 1:
            shifted = prompt_ids[:, 1:]
            self.drafter.prefill(shifted, features[:, :T - 1], self.cache, lengths - 1,
                                 logits=False)
        self.pending = (first_tokens[:, None], features[rows, lengths - 1][:, None],
                        torch.ones(B, dtype=torch.int64, device=prompt_ids.device))

    def propose(self, roots: torch.Tensor) -> DraftTree:
        """One dynamic tree per row (module docstring); roots ``[B]`` are the last emitted
        tokens (the pending chains end with them)."""
        chain_tokens, _, chain_len = self.pending
        m = chain_tokens.shape[1]
        state = self._run_pending()
        chain = self.config.topk == 1 and not self.sampled
        tree = (self._grow_chain if chain else self._grow_tree)(state, roots)
        # The chain's pairs are final: store their keys/values, past the committed prefix.
        k, v = state["past"][0]
        self.cache.reserve(m)
        positions = self.cache.lengths[:, None] + torch.arange(m, device=chain_len.device)
        self.cache.write(0, k, v, positions)
        self.cache.advance(chain_len)
        self.pending = None
        return tree

    def _run_pending(self) -> dict:
        """Run the pending chains: the drafter's tree so far (``mask``, ``depths``, ``past``
        keys/values of its m nodes) and, at each row's root pair (its last real node,
        ``root`` ``[B]``), ``hidden`` ``[B, 1, H]`` and ``logits`` ``[B, Vd]``."""
        chain_tokens, chain_feats, chain_len = self.pending
        B, m = chain_tokens.shape
        device = chain_tokens.device
        idx = torch.arange(m, device=device)
        real = idx < chain_len[:, None]
        root = chain_len - 1
        # The drafter's tree (chain, then one frontier per level) is grown here, so its mask
        # and depths are extended level by level instead of being rebuilt from parents.
        mask = torch.where(real[..., None], chain_mask(m, device).expand(B, -1, -1), 0)
        depths = torch.where(real, idx, -1)
        out = self.drafter.grow_tree(torch.where(real, chain_tokens, -1), chain_feats, depths,
                                     mask, self.cache, logits_at=root[:, None])
        hidden = out.hidden[torch.arange(B, device=device), root][:, None]
        return {"mask": mask, "depths": depths, "past": out.tree_kv, "hidden": hidden,
                "logits": out.logits[:, 0], "root": root}

    def _grow_tree(self, state: dict, roots: torch.Tensor) -> DraftTree:
        """`build_tree` below the root pairs of `_run_pending`'s ``state``."""
        state = dict(state, start=None)

        def expand(tokens, parent_slot, valid):
            if state["start"] is None:  # level 1: children of the root pair
                par = state["root"][:, None].expand_as(tokens)
                hidden = state["hidden"].expand(-1, tokens.shape[1], -1)
            else:
                par = state["start"] + parent_slot
                hidden = state["hidden"].gather(
                    1, parent_slot[..., None].expand(-1, -1, state["hidden"].shape[-1]))
            start = state["depths"].shape[1]
            mask, depths = append_nodes(state["mask"], state["depths"],
                                        torch.where(valid, par, -1))
            ids = torch.where(valid, self.d2t_ids[tokens], -1)  # draft → target ids
            step = self.drafter.grow_tree(ids, hidden,
                                          depths[:, start:], mask, self.cache,
                                          past=state["past"])
            state.update(mask=mask, depths=depths, past=step.tree_kv, hidden=step.hidden,
                         start=start)
            if self.on_level is not None:
                self.on_level(step.logits)
            return step.logits

        if self.on_level is not None:
            self.on_level(state["logits"][:, None])
        return build_tree(state["logits"], expand, self.tree_config, roots, self.temperature,
                          self.generator, self.d2t_ids, self.drafter.model_config.vocab_size,
                          None if self.sampled else self.policy)

    def _grow_chain(self, state: dict, roots: torch.Tensor) -> DraftTree:
        """`_grow_tree` for deterministic trees with topk = 1, which are chains: each level
        is the top draft token below the previous one. Scores only decrease along a chain,
        so `build_tree`'s ranking keeps the first ``total_tokens`` levels in order: this is
        the same tree, without the ranking's bookkeeping (dozens of small ops per level),
        and levels past ``total_tokens`` are not drafted at all (nor, with a ``policy``,
        levels or nodes that do not pay)."""
        mask, depths, past, hidden = state["mask"], state["depths"], state["past"], state["hidden"]
        logits, policy = state["logits"], self.policy
        levels = min(self.config.depth, self.config.total_tokens)
        drafts, scores = [], []
        for level in range(levels):
            if self.on_level is not None:
                self.on_level(logits[:, None])
            log_s, ids = child_slots(logits, 1, False,
                                     ranking_temperature=self.config.ranking_temperature_at(
                                         level + 1))[:2]
            drafts.append(ids)  # [B, 1] draft ids
            scores.append(log_s if level == 0 else scores[-1] + log_s)
            if level + 1 == levels or (policy is not None
                                       and not policy.keep_expanding(scores[-1], level + 1)):
                break
            start = depths.shape[1]
            if level == 0:  # below each row's root pair
                mask, depths = append_nodes(mask, depths, state["root"][:, None])
            else:           # below the previous level's node, node start - 1 in every row
                mask, depths = append_child(mask, depths, start - 1)
            step = self.drafter.grow_tree(self.d2t_ids[drafts[-1]], hidden, depths[:, start:],
                                          mask, self.cache, past=past)
            logits, hidden, past = step.logits[:, 0], step.hidden, step.tree_kv
        return self._chain_tree(drafts, scores, roots)

    def _chain_tree(self, drafts: list, scores: list, roots: torch.Tensor) -> DraftTree:
        """The `DraftTree` of the drafted chain levels (cut where the policy says)."""
        levels, total = len(drafts), self.config.total_tokens
        if self.policy is not None:
            total = levels = min(levels, self.policy.columns(torch.cat(scores, 1)))
            self.policy.record(len(drafts), levels)
            drafts = drafts[:levels]
        B = roots.shape[0]
        ids = (self.d2t_ids[torch.cat(drafts, 1)] if drafts
               else roots.new_zeros(B, 0))
        pad = ids.new_full((B, total - levels), -1)
        chain = torch.arange(-1, levels, device=ids.device).expand(B, -1)
        mask, depths = padded_chain(levels, total + 1, ids.device)
        return DraftTree(torch.cat((roots[:, None], ids, pad), 1), torch.cat((chain, pad), 1),
                         tree_mask=mask.expand(B, -1, -1), depths=depths.expand(B, -1))

    def advance(self, emitted: torch.Tensor, num_accepted: torch.Tensor,
                features: torch.Tensor) -> None:
        """After verification: emitted ``[B, N]`` (accepted tokens then the final one),
        num_accepted ``[B]``, features ``[B, N, F]`` of the accepted nodes (root first). The
        next chain pairs emitted token i with the features of accepted node i."""
        m = int(num_accepted.max()) + 1
        self.pending = (emitted[:, :m], features[:, :m], num_accepted + 1)
        if self.policy is not None:
            self.policy.update(int(num_accepted.sum()) + num_accepted.shape[0])

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the given rows (indices into the current batch)."""
        self.cache.keep_rows(rows)
        if self.policy is not None:
            self.policy.B = rows.shape[0]
        if self.pending is not None:
            self.pending = tuple(t[rows] for t in self.pending)
