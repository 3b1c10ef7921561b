"""Draft trees: EAGLE-2 style dynamic trees, deterministic (top-k) or sampled (Gumbel-top-k).

A draft tree is what one speculative step proposes for every row of a batch:

- ``tokens`` ``[B, N]`` int64: node 0 is the root (the last emitted token, whose target
  keys/values are not cached yet), nodes 1.. are draft tokens (target vocabulary ids), ``-1``
  marks padding nodes; ``N = total_tokens + 1``.
- ``parents`` ``[B, N]`` int64: ``-1`` for the root and for padding, else ``< i``
  (topological order). Children of a node appear in the order they were drafted, which is
  the order `vsd_ext.verify_tree` tries them.
- ``draft_probs`` ``[B, N, V]`` fp32 (sampled trees only): ``q`` at node i, the drafter's
  distribution (at the sampling temperature, over the target vocabulary) that the children
  of node i were drawn from; zero rows for nodes that were never expanded.

Growth (EAGLE-2, `build_tree`), with k = topk and D = depth:

    level 1: the root's k child slots;  level l + 1: k slots under each of the k frontier
    nodes of level l (the level's k best slots), so D·k² − (k² − k) candidates in all;
    keep the best ``total_tokens`` candidates of every level by cumulative score.

The score of slot j under node n is ``score(n) + log s_j(n)``, where ``s_1 ≥ s_2 ≥ ...`` are
the sorted probabilities of the drafter's distribution at n (for deterministic trees that of
the calibrated ``logits / t_r``, see `TreeConfig.ranking_temperature`), and candidates are ranked by
(score descending, creation order ascending) — one total order for the frontier choices
and the final cut. A child never outranks its parent (its score is no larger and it is
created later), so the kept set is closed under ancestors, and listing the kept nodes in rank
order is a topological order in which siblings stay in slot order.

The two flavours differ only in which token fills slot j:

- deterministic: the j-th most probable draft token (so ``s_j`` is the probability of the
  token itself, EAGLE-2's cumulative log-probability). Verify with ``mode="target_only"``
  (or ``"greedy"`` at T = 0).
- sampled: the j-th of k draws without replacement from ``q`` (Gumbel-top-k: the k largest
  ``log q + Gumbel`` in decreasing order are sequential draws without replacement). Verify
  with ``mode="sampled"`` and ``draft_probs``.

Why sampled slots are scored by ``s_j`` and not by the drawn token's own probability: the
recursive rejection of ``mode="sampled"`` is lossless only if, given the earlier siblings,
the j-th child is a draw from ``q`` with them removed — so whether slot j is kept must not
depend on the token drawn into it. With slot scores fixed before the draw this holds: every
candidate that outranks slot j is created and ranked from earlier draws only (by induction
over levels: a node's frontier rank and final rank depend only on candidates that outrank
it, and the draw in slot j influences only its own descendants, which rank below it). The
deterministic flavour has ``s_j`` = the drawn token's probability, so both share the code.

Everything is vectorized over the batch and the slots; the only Python loop is over levels.
`vsd_ext.decoding.proposer.DrafterProposer` drives an EAGLE-3 `vsd_ext.Drafter` through this
builder; `vsd_ext.decoding.generate` uses it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..tree import unchecked_mask_and_depths

__all__ = ["TreeConfig", "DraftTree", "child_slots", "build_tree"]


@dataclass(frozen=True)
class TreeConfig:
    """Shape of the dynamic draft tree. Fields left None are chosen by `generate`'s cost model
    (`vsd_ext.decoding.planner`): ``TreeConfig()`` is the fast default, and any field given
    is kept as given (all three sizes given: exactly this tree, as before the cost model).

    depth: levels of draft tokens below the root (drafter forwards per step, root included).
    topk: children per expanded node, and nodes expanded per level.
    total_tokens: draft nodes kept (the verified tree has ``total_tokens + 1`` nodes with the
        root); rows with fewer valid candidates are padded.
    sampled: at T > 0, draw children without replacement from the drafter (verified against
        ``q``) instead of taking its top-k (verified against the target alone); None: the
        cost model picks the one that pays more. Ignored at T = 0, where trees are top-k.
    ranking_temperature: t_r of the calibrated ranking of deterministic trees, a float or one
        per depth (the last repeats): candidates rank by the cumulative
        ``log softmax(logits / t_r)`` of their path. None: the drafter's decode settings
        (`vsd_ext.models.decode_settings`), 1 without. Never changes the output at T = 0.
    adaptive: at T = 0, size each step's tree within the planned one by what the drafter
        expects of this context (`vsd_ext.decoding.policy`): None (default) does so when the
        cost model planned the tree, False never, True also for a fully sized tree.

    Measurements of tree shapes on the development CPU: docs/results/. On a GPU, where
    verification is memory-bound, EAGLE-style larger trees pay off (e.g. depth 6, topk 8,
    48–64 nodes).
    """

    depth: int | None = None
    topk: int | None = None
    total_tokens: int | None = None
    sampled: bool | None = None
    ranking_temperature: float | tuple[float, ...] | None = None
    adaptive: bool | None = None

    def __post_init__(self):
        for name in ("depth", "topk", "total_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ValueError(f"TreeConfig: {name} must be an integer >= 1 or None, got "
                                 f"{value!r}")
        for name in ("sampled", "adaptive"):  # not 0 / 1, which equal False / True
            if not (getattr(self, name) is None or isinstance(getattr(self, name), bool)):
                raise ValueError(f"TreeConfig: {name} must be True, False or None, got "
                                 f"{getattr(self, name)!r}")
        t = self.ranking_temperature
        if t is not None:
            values = tuple(t) if isinstance(t, (tuple, list)) else (t,)
            if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                     and math.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"TreeConfig: ranking_temperature must be a number > 0, a "
                                 f"non-empty tuple of them, or None, got {t!r}")
            if isinstance(t, list):
                object.__setattr__(self, "ranking_temperature", tuple(t))

    @property
    def is_sized(self) -> bool:
        """Whether depth, topk and total_tokens are all given."""
        return None not in (self.depth, self.topk, self.total_tokens)

    def _sizes(self) -> tuple[int, int, int]:
        if not self.is_sized:
            raise ValueError(f"TreeConfig: {self} has sizes left to the cost model; "
                             f"`generate` resolves them")
        return self.depth, self.topk, self.total_tokens

    @property
    def num_nodes(self) -> int:
        """N of the verified tree: the kept draft nodes plus the root."""
        return self._sizes()[2] + 1

    @property
    def num_candidates(self) -> int:
        """Candidates the growth creates: k at level 1, k² at each deeper level."""
        depth, topk, _ = self._sizes()
        return topk + (depth - 1) * topk ** 2

    def ranking_temperature_at(self, depth: int) -> float:
        """t_r at ``depth`` (1 = the root's children); 1 when None."""
        t = self.ranking_temperature
        if t is None:
            return 1.0
        if not isinstance(t, tuple):
            return float(t)
        return float(t[min(max(depth, 1), len(t)) - 1])


@dataclass
class DraftTree:
    """One step's proposal (module docstring): tokens ``[B, N]``, parents ``[B, N]`` (int64)
    and, for sampled trees, draft_probs ``[B, N, V]`` fp32. ``tree_mask`` / ``depths``: the
    tree's `vsd_ext.tree.build_tree_mask` / `tree_depths` when its builder knows them (the
    target's verify then skips rebuilding and re-checking them), else None."""

    tokens: torch.Tensor
    parents: torch.Tensor
    draft_probs: torch.Tensor | None = None
    tree_mask: torch.Tensor | None = None
    depths: torch.Tensor | None = None


def gumbel_noise(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log u)``, u ~ U(0, 1) in float64 on the generator's
    device (clamped away from 0 so no draw is infinite), returned on ``device``."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=gen_device)
    return (-torch.log(-torch.log(u.clamp_min(1e-300)))).to(device)


def child_slots(logits: torch.Tensor, k: int, sampled: bool, temperature: float = 1.0,
                generator: torch.Generator | None = None, ranking_temperature: float = 1.0):
    """The k child slots of every distribution in ``logits`` ``[..., Vd]``.

    Returns ``(log_s, tokens, probs)``: ``log_s`` ``[..., k]`` fp32, the sorted top-k
    log-probabilities (``-inf`` for slots beyond the support); ``tokens`` ``[..., k]`` int64
    draft-vocabulary ids, the top-k (deterministic) or k draws without replacement in draw
    order (sampled, via Gumbel-top-k); ``probs`` ``[..., Vd]`` fp32, the distribution drawn
    from (sampled only, else None). Sampled slots use ``softmax(logits / temperature)``,
    deterministic ones ``softmax(logits / ranking_temperature)`` (the calibrated ranking: the
    same tokens in the same order, other scores).
    """
    k = min(k, logits.shape[-1])
    if not sampled:
        scaled = logits.float()
        if ranking_temperature != 1:
            scaled = scaled / ranking_temperature
        logq = torch.log_softmax(scaled, dim=-1)
        log_s, top = torch.topk(logq, k, dim=-1)
        return log_s, top, None
    # Draw from exactly the fp32 q handed to verification: a token whose probability
    # underflows to 0 is never drawn, and a slot is valid iff q has that many nonzero tokens.
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    logq = probs.log()
    log_s = torch.topk(logq, k, dim=-1).values
    tokens = torch.topk(logq.double() + gumbel_noise(logq.shape, generator, logq.device), k,
                        dim=-1).indices
    return log_s, tokens, probs


# expand(tokens [B, k] draft ids, parent_slot [B, k], valid [B, k]) -> logits [B, k, Vd]:
# run the drafter on the k frontier nodes of a level. parent_slot is -1 at level 1 (their
# parent is the root), else the index of the parent among the previously expanded frontier.
ExpandFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def build_tree(root_logits: torch.Tensor, expand: ExpandFn, config: TreeConfig,
               root_tokens: torch.Tensor, temperature: float = 1.0,
               generator: torch.Generator | None = None,
               draft_to_target: torch.Tensor | None = None,
               vocab_size: int | None = None, policy=None) -> DraftTree:
    """Grow one dynamic draft tree per row (module docstring).

    root_logits ``[B, Vd]``: the drafter's logits at the root. expand: runs the drafter on a
    level's frontier (see `ExpandFn`); called ``depth − 1`` times. root_tokens ``[B]``: the
    root's target id. draft_to_target ``[Vd]`` int64: target id of every draft id (default:
    identity); vocab_size: V of ``draft_probs`` (default Vd). Sampled trees
    (``config.sampled``) draw at ``temperature`` with ``generator``. policy: a
    `vsd_ext.decoding.policy.StepPolicy` (deterministic trees only) that may stop before
    ``depth`` levels and keep fewer than ``total_tokens`` nodes (N then shrinks).
    """
    B, Vd = root_logits.shape
    device = root_logits.device
    k, sampled = min(config.topk, Vd), config.sampled
    log_s, tokens, probs = child_slots(root_logits, k, sampled, temperature, generator,
                                       config.ranking_temperature_at(1))
    # Candidate arrays in creation order: level 1 (k), then k*k per deeper level.
    scores, cand_tokens = [log_s], [tokens]
    cand_parents = [torch.full((B, k), -1, dtype=torch.int64, device=device)]
    q_rows = [probs[:, None]] if sampled else []  # q of the root, then of each frontier
    expanded = []                                  # candidate ids of each expanded frontier
    frontier = torch.arange(k, device=device).expand(B, k)  # candidate ids of the frontier
    front_score, parent_slot = log_s, torch.full((B, k), -1, dtype=torch.int64, device=device)
    offset = k
    levels = 1
    for level in range(1, config.depth):
        if policy is not None and not policy.keep_expanding(front_score, level):
            break
        levels += 1
        valid = front_score > float("-inf")
        logits = expand(torch.cat(cand_tokens, 1).gather(1, frontier), parent_slot, valid)
        log_s, tokens, probs = child_slots(logits, k, sampled, temperature, generator,
                                           config.ranking_temperature_at(level + 1))
        expanded.append(frontier)
        if sampled:
            q_rows.append(probs)
        score = (front_score[..., None] + log_s).reshape(B, k * k)  # -inf stays -inf
        scores.append(score)
        cand_tokens.append(tokens.reshape(B, k * k))
        cand_parents.append(frontier[..., None].expand(B, k, k).reshape(B, k * k))
        # The level's k best slots (score desc, creation order asc) form the next frontier.
        order = torch.sort(-score, dim=1, stable=True).indices[:, :k]
        frontier, front_score, parent_slot = offset + order, score.gather(1, order), order // k
        offset += k * k
    # Row of q_rows (flattened: root first, then k per expanded frontier) of each candidate
    # (sampled trees only: deterministic ones carry no q).
    cand_qrow = None
    if sampled:
        cand_qrow = torch.full((B, offset), -1, dtype=torch.int64, device=device)
        for level, ids in enumerate(expanded):
            cand_qrow.scatter_(1, ids, 1 + level * k
                               + torch.arange(k, device=device).expand(B, k))
    return _select(torch.cat(scores, 1), torch.cat(cand_tokens, 1), torch.cat(cand_parents, 1),
                   cand_qrow, q_rows, config, root_tokens, draft_to_target,
                   vocab_size or Vd, policy, levels)


def _select(score, cand_tokens, cand_parents, cand_qrow, q_rows, config, root_tokens,
            draft_to_target, vocab_size, policy=None, levels=None) -> DraftTree:
    """Keep the best ``total_tokens`` candidates of every row (or the number ``policy``
    says pays), listed in rank order (padded with -1 nodes to ``N = total + 1`` when a row
    has fewer valid candidates)."""
    B, C = score.shape
    device = score.device
    order = torch.sort(-score, dim=1, stable=True).indices           # rank -> candidate
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(C, device=device)
                                            .expand(B, C))          # candidate -> rank
    total = config.total_tokens
    if policy is not None:
        total = min(total, policy.columns(score.gather(1, order[:, :total])))
        policy.record(levels, total)
    kept = order[:, :total]
    valid = score.gather(1, kept) > float("-inf")
    draft_ids = cand_tokens.gather(1, kept)
    target_ids = draft_ids if draft_to_target is None else draft_to_target[draft_ids]
    parent_cand = cand_parents.gather(1, kept)
    # A kept candidate's parent is kept too and ranks earlier: node index = rank + 1.
    parent = torch.where(parent_cand < 0, torch.zeros_like(parent_cand),
                         rank.gather(1, parent_cand.clamp(min=0)) + 1)
    missing = total - kept.shape[1]  # > 0 when there are fewer candidates
    pad = torch.full((B, 1), -1, dtype=torch.int64, device=device)

    def nodes(root, values):
        return torch.cat((root, torch.where(valid, values, -1), pad.expand(B, missing)), 1)

    tree = DraftTree(nodes(root_tokens.view(B, 1), target_ids), nodes(pad, parent))
    tree.tree_mask, tree.depths = unchecked_mask_and_depths(tree.parents, config.depth)
    if q_rows:
        q = torch.cat(q_rows, 1)                                    # [B, 1 + (D-1)k, Vd]
        node_qrow = nodes(torch.zeros_like(pad), cand_qrow.gather(1, kept))  # root: row 0
        gathered = q.gather(1, node_qrow.clamp(min=0)[..., None].expand(-1, -1, q.shape[-1]))
        gathered = gathered * (node_qrow >= 0)[..., None]           # never-expanded: zeros
        if draft_to_target is None and vocab_size == q.shape[-1]:
            tree.draft_probs = gathered
        else:
            ids = (torch.arange(q.shape[-1], device=device) if draft_to_target is None
                   else draft_to_target)
            tree.draft_probs = gathered.new_zeros(B, gathered.shape[1], vocab_size)
            tree.draft_probs[..., ids] = gathered
    return tree

