"""Per-step sizing of greedy (T = 0) draft trees: stop drafting, and cut the tree, where the
expected gain no longer pays for the cost.

The planner (`vsd_ext.decoding.planner`) fixes an envelope — depth, top-k, at most n nodes —
from average acceptance. Within it, each step uses what the drafter says about this very
context: a node's calibrated path probability ``p = exp(score)`` (the cumulative
``log softmax(logits / t_r)`` of the ranking) estimates the chance that the target accepts
it. With R the decoding rate so far (tokens per second of modelled step time, a running
ratio seeded by the plan's expectation), a step should maximize E[tokens] − R · time
(Dinkelbach's rule for maximizing a ratio), so with c_v the cost of one more verified node
(a column of the batch) and c_l that of one more drafter level:

- keep the n-th best node of every row while the column's summed p exceeds R · c_v (ranks
  are closed under ancestors, so the kept nodes form a tree);
- draft one more level while the expected gain of its nodes,
  Σ_rows Σ_frontier Σ_j max(0, p_f · m(j) − R · c_v / B) with m(j) the drafter's measured
  chance that the target's token is its j-th choice at that depth, exceeds R · c_l;
- draft nothing below the root (verify the root alone, an autoregressive step) when not even
  the first column pays.

At T = 0 every tree is verified exactly (greedy), so these choices change the speed only.
"""
from __future__ import annotations

import torch

from .costs import StepCosts

__all__ = ["StepPolicy"]

PRIOR_STEPS = 4  # weight, in steps, of the plan's expected rate in the running rate


class StepPolicy:
    """The rules of the module docstring for one `generate` call.

    costs: the measured `StepCosts`; table: cumulative acceptance ``[depth][k]`` (greedy);
    expected_tau: the plan's τ; tree: the planned (envelope) `TreeConfig`; batch_size."""

    def __init__(self, costs: StepCosts, table, expected_tau: float, tree, batch_size: int):
        self.costs, self.table, self.B = costs, table, batch_size
        self.chain = tree.topk == 1
        self.topk = tree.topk
        planned = costs.step(tree.depth, tree.topk, tree.total_tokens, self.chain)
        self.prior = (PRIOR_STEPS * expected_tau * batch_size, PRIOR_STEPS * planned)
        self.tokens, self.seconds = self.prior
        self.levels = self.nodes = 0  # of the last proposed tree

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    def _level_cost(self) -> float:
        c = self.costs
        return c.chain_level if self.chain else c.tree_level + c.tree_node * self.topk

    def _marginals(self, depth: int) -> torch.Tensor:
        row = self.table[min(depth, len(self.table)) - 1][:self.topk]
        return torch.tensor(row) - torch.tensor([0.0] + row[:-1])

    def keep_expanding(self, front_score: torch.Tensor, depth: int) -> bool:
        """Whether to draft the children (depth ``depth`` + 1) of the frontier nodes, whose
        calibrated scores are ``front_score`` ``[B, k]``."""
        node_cost = self.rate * self.costs.verify_node / self.B
        p = front_score.float().exp().cpu()
        gain = (p[..., None] * self._marginals(depth + 1) - node_cost).clamp(min=0).sum()
        return float(gain) > self.rate * self._level_cost()

    def columns(self, scores: torch.Tensor) -> int:
        """How many of the best nodes of every row to verify: ``scores`` ``[B, C]`` sorted
        descending per row (-inf for missing candidates)."""
        column_p = scores.float().exp().sum(0).cpu()
        pays = column_p > self.rate * self.costs.verify_node
        return int(pays.long().cumprod(0).sum())

    def record(self, levels: int, nodes: int) -> None:
        """The tree just proposed: ``levels`` drafter levels, ``nodes`` draft nodes."""
        self.levels, self.nodes = levels, nodes

    def beats_autoregressive(self) -> bool:
        """Whether the steps so far (modelled time, the prior left out) emitted tokens faster
        than autoregressive steps would (B tokens per ``autoregressive`` step)."""
        seconds = self.seconds - self.prior[1]
        if seconds <= 0:
            return True
        return (self.tokens - self.prior[0]) / seconds * self.costs.autoregressive >= self.B

    def update(self, emitted: int) -> None:
        """After verification: ``emitted`` tokens (all rows) from the last proposed tree."""
        c = self.costs
        if self.levels == 0:
            seconds = c.verify_base + c.chain_first  # the pending forward ran anyway
        else:
            seconds = c.step(self.levels, self.topk, self.nodes, self.chain)
        self.tokens += emitted
        self.seconds += seconds
