"""The cost model behind `TreeConfig()`: which draft tree (or none) decodes fastest.

Inputs: the drafter's per-depth acceptance (`vsd_ext.models.decode_settings`: measured by
`vsd_ext.calibrate_drafter` and saved with the drafter, else `PRIOR`) and the step costs
measured on the running machine (`vsd_ext.decoding.costs`). For every candidate shape —
depth D, top-k k, n draft nodes, top-k or sampled children at T > 0 — the expected tokens
per step of an EAGLE-2 tree are

    τ(D, k, n) = 1 + the sum of the n largest expected path probabilities, where a node at
                 depth d that is the j-th child of its parent has the probability of its
                 parent times m_d(j) = a_d(j) − a_d(j − 1) (a: the cumulative acceptance),
                 level 1 holds the root's k children and each deeper level the k children of
                 the previous level's k most probable nodes;

and the speedup over autoregressive decoding is ``τ · autoregressive / step(D, k, n)``
(`StepCosts.step`), each candidate priced by the costs of its own verification mode (at
T > 0 drafting sampled children and verifying against q costs more than top-k drafting, and
an autoregressive step samples from the target's softmax at T). A batch of B > 1 rows runs
until its slowest row has its ``max_new_tokens``, where autoregressive rows all finish
together: τ is scaled by `batch_tail` (the rows' tokens per step vary; the expected maximum
of B rows' step counts). The plan is the fastest
candidate, or autoregressive decoding when no
candidate is expected to beat it by ``MIN_SPEEDUP`` (fields fixed in the `TreeConfig` are
kept; a fully sized tree is always used as given). While decoding, `drafting_pays` checks
the plan against the τ actually measured, and `generate` falls back to autoregressive steps
when the drafts stop paying for themselves (e.g. a drafter without decode settings that is
worse than `PRIOR` assumes).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from statistics import NormalDist

from ..models.decode_settings import Acceptance, DecodeSettings
from .costs import StepCosts
from .draft_tree import TreeConfig

__all__ = ["PRIOR", "Plan", "acceptance_table", "batch_tail", "drafting_pays",
           "expected_tokens", "plan_tree", "tokens_variance"]

MAX_DEPTH = 10
MAX_TOPK = 8
MAX_NODES = 48
MIN_SPEEDUP = 1.05  # margin for the model's errors before speculating at all
PAYS_Z = 2.0        # standard errors of the measured τ before `drafting_pays` gives up

# Acceptance assumed for a drafter without decode settings: the shipped EAGLE-3 drafter of
# the 6-layer default target, measured by `calibrate_drafter` on the tune split (greedy,
# depth 1..8, top 1..4), rounded down. Sampled and top-k tables at T = 1 likewise.
PRIOR = DecodeSettings(acceptance=(
    Acceptance("greedy", 0.0, tuple((0.70 - 0.02 * d, 0.80 - 0.02 * d, 0.84 - 0.02 * d,
                                     0.86 - 0.02 * d) for d in range(8)), (0,) * 8),
    Acceptance("target_only", 1.0, tuple((0.45 - 0.01 * d, 0.58 - 0.01 * d, 0.64 - 0.01 * d,
                                          0.68 - 0.01 * d) for d in range(8)), (0,) * 8),
    Acceptance("sampled", 1.0, tuple((0.62 - 0.01 * d, 0.72 - 0.01 * d, 0.77 - 0.01 * d,
                                      0.80 - 0.01 * d) for d in range(8)), (0,) * 8)),
    fit={"source": "PRIOR of vsd_ext.decoding.planner"})


def _pad(rows, depth: int, width: int) -> list[list[float]]:
    """A cumulative table padded to ``depth`` rows (the last repeats) and ``width`` columns
    (the last value repeats: no gain past the measured k)."""
    rows = [list(r) + [r[-1]] * (width - len(r)) for r in rows]
    return rows + [rows[-1]] * (depth - len(rows))


def _blend(a, b, w: float) -> list[list[float]]:
    return [[(1 - w) * x + w * y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def acceptance_table(settings: DecodeSettings | None, mode: str,
                     temperature: float) -> tuple[list[list[float]], str]:
    """The cumulative acceptance ``[depth][k]`` (MAX_DEPTH rows) of ``mode`` ("greedy" at
    T = 0, else "target_only" or "sampled") at ``temperature``, and where it came from.

    At T > 0 it interpolates linearly in T between the stored tables of the mode, anchored at
    T = 0 by the greedy table (as T → 0 all three modes become greedy decoding); past the
    largest stored T it is that table. Missing tables come from `PRIOR`."""
    source = "decode_settings"
    greedy = settings.find("greedy") if settings is not None else []
    if not greedy:
        greedy, source = PRIOR.find("greedy"), "prior"
    points = [] if temperature == 0 else (settings.find(mode) if settings is not None else [])
    if temperature > 0 and not points:
        points, source = PRIOR.find(mode), "prior"
    anchors = [greedy[0]] + [p for p in points if p.temperature > 0]
    width = max(len(r) for a in anchors for r in a.cumulative)
    tables = [(a.temperature, _pad(a.cumulative, MAX_DEPTH, width)) for a in anchors]
    if temperature == 0 or len(tables) == 1:
        return tables[0][1], source
    for (t0, lo), (t1, hi) in zip(tables, tables[1:]):
        if temperature <= t1:
            return _blend(lo, hi, (temperature - t0) / (t1 - t0)), source
    return tables[-1][1], source


def _level_probs(table, depth: int, topk: int) -> list[tuple[float, int]]:
    """(expected path probability, depth) of every candidate of an EAGLE-2 tree (module
    docstring), in creation order."""
    def marginal(d, j):
        row = table[d - 1]
        return row[j - 1] - (row[j - 2] if j > 1 else 0.0)

    level = [marginal(1, j) for j in range(1, topk + 1)]
    probs = [(p, 1) for p in level]
    for d in range(2, depth + 1):
        frontier = sorted(level, reverse=True)[:topk]
        level = [p * marginal(d, j) for p in frontier for j in range(1, topk + 1)]
        probs += [(p, d) for p in level]
    return probs


def _kept(table, depth: int, topk: int, max_nodes: int) -> list[tuple[float, int]]:
    """The (probability, depth) of the best ``max_nodes`` candidates, best first."""
    probs = _level_probs(table, depth, min(topk, len(table[0])))
    return sorted(probs, key=lambda pd: pd[0], reverse=True)[:max_nodes]


def expected_tokens(table, depth: int, topk: int, max_nodes: int) -> list[float]:
    """τ for n = 0 .. min(max_nodes, candidates) kept nodes (index n)."""
    out = [1.0]
    for p, _ in _kept(table, depth, topk, max_nodes):
        out.append(out[-1] + p)
    return out


def tokens_variance(table, depth: int, topk: int, max_nodes: int) -> list[float]:
    """The variance of a step's tokens for n = 0 .. kept nodes (as `expected_tokens`). The
    accepted length A has P(A ≥ d) = the summed probabilities of the kept nodes at depth d
    (siblings exclude each other), so E[A] = Σ_d P(A ≥ d), E[A²] = Σ_d (2d − 1) P(A ≥ d)."""
    out, mean, second = [0.0], 0.0, 0.0
    for p, d in _kept(table, depth, topk, max_nodes):
        mean, second = mean + p, second + (2 * d - 1) * p
        out.append(max(second - mean * mean, 0.0))
    return out


def batch_tail(tau: float, variance: float, batch_size: int,
               max_new_tokens: int | None) -> float:
    """τ of a batch: ``max_new_tokens`` tokens per row over the expected steps of its slowest
    row. A row needs about M / τ steps with variance M·σ² / τ³ (renewal theory, σ² the
    variance of a step's tokens); the expected maximum of B rows adds e_B standard
    deviations (Blom's approximation of the expected maximum of B normal draws). τ itself
    for one row or an unknown M. The model leaves out that the prompts of a batch differ
    (slower rows: more steps) and that steps after rows have finished are cheaper."""
    if batch_size <= 1 or not max_new_tokens:
        return tau
    e_b = NormalDist().inv_cdf((batch_size - 0.375) / (batch_size + 0.25))
    steps = max_new_tokens / tau + e_b * (max_new_tokens * variance / tau ** 3) ** 0.5
    return max_new_tokens / steps


@dataclass(frozen=True)
class Plan:
    """The chosen decoding: ``tree`` (sized) or None for autoregressive decoding; ``mode``
    the verification; the model's expectations (``expected_tau`` per row; ``tail`` the
    batch's τ over it, `batch_tail`). ``costs`` is None for a tree given in full (nothing was
    planned, and `drafting_pays` never stops it)."""

    tree: TreeConfig | None
    mode: str
    expected_tau: float
    expected_speedup: float
    acceptance_source: str
    costs: StepCosts | None
    tail: float = 1.0

    def describe(self) -> dict:
        tree = None if self.tree is None else {
            "depth": self.tree.depth, "topk": self.tree.topk,
            "total_tokens": self.tree.total_tokens, "sampled": bool(self.tree.sampled),
            "ranking_temperature": self.tree.ranking_temperature}
        return {"tree": tree, "mode": self.mode, "expected_tau": self.expected_tau,
                "expected_speedup": self.expected_speedup,
                "acceptance_source": self.acceptance_source, "tail": self.tail,
                "costs": None if self.costs is None else self.costs.to_dict()}


def drafting_pays(plan: Plan, tau: float, stderr: float = 0.0,
                  step_seconds: float | None = None) -> bool:
    """Whether the planned tree, at the τ measured so far (per row; scaled by the plan's
    batch ``tail``), still beats autoregressive decoding by the step costs — unless τ is
    below that by more than ``PAYS_Z`` standard errors ``stderr`` of its mean, a plan keeps
    drafting (a few steps' τ is noisy). ``step_seconds``: the measured mean time of a step
    (on the costs' clock) instead of the modelled one. Always True for a tree given in full."""
    if plan.costs is None or plan.tree is None:
        return True
    tree = plan.tree
    chain = tree.topk == 1 and not tree.sampled
    depth = min(tree.depth, tree.total_tokens) if chain else tree.depth
    step = (plan.costs.step(depth, tree.topk, tree.total_tokens, chain)
            if step_seconds is None else step_seconds)
    return (tau + PAYS_Z * stderr) * plan.tail * plan.costs.autoregressive >= step


def _choices(config: TreeConfig, temperature: float):
    """(sampled, depth, topk) candidates that respect the fields fixed in ``config``."""
    sampled = ([False] if temperature == 0 else
               [config.sampled] if config.sampled is not None else [False, True])
    depths = [config.depth] if config.depth is not None else range(1, MAX_DEPTH + 1)
    topks = [config.topk] if config.topk is not None else range(1, MAX_TOPK + 1)
    return [(s, d, k) for s in sampled for d in depths for k in topks]


def plan_tree(config: TreeConfig, settings: DecodeSettings | None,
              costs: StepCosts | Callable[[str], StepCosts], temperature: float,
              batch_size: int = 1, max_new_tokens: int | None = None) -> Plan:
    """The fastest decoding the model expects (module docstring) for ``batch_size`` rows of
    ``max_new_tokens`` (None: unknown, no batch tail). ``costs``: the measured costs of a
    verification mode ("greedy", "target_only", "sampled"), e.g.
    ``lambda mode: step_costs(target, drafter, B, mode, temperature)`` (called once per mode
    the candidates need), or one `StepCosts` used for every mode."""
    best, tables, priced = None, {}, {}
    for sampled, depth, topk in _choices(config, temperature):
        mode = "greedy" if temperature == 0 else "sampled" if sampled else "target_only"
        if mode not in tables:
            tables[mode] = acceptance_table(settings, mode, temperature)
            priced[mode] = costs if isinstance(costs, StepCosts) else costs(mode)
        (table, source), c = tables[mode], priced[mode]
        taus = expected_tokens(table, depth, topk, config.total_tokens or MAX_NODES)
        variances = tokens_variance(table, depth, topk, config.total_tokens or MAX_NODES)
        chain = topk == 1 and not sampled
        nodes = [config.total_tokens] if config.total_tokens is not None else range(
            1, len(taus))
        for n in nodes:
            used = min(depth, n) if chain else depth  # a chain drafts only levels it keeps
            tau = taus[min(n, len(taus) - 1)]
            tail = batch_tail(tau, variances[min(n, len(taus) - 1)], batch_size,
                              max_new_tokens) / tau
            speedup = tau * tail * c.autoregressive / c.step(used, topk, n, chain)
            if best is None or speedup > best[0]:
                kept = depth if config.depth is not None else used
                best = (speedup, tau, mode, source, (kept, topk, n, sampled), c, tail)
    speedup, tau, mode, source, (depth, topk, n, sampled), costs, tail = best
    if speedup < MIN_SPEEDUP and not config.is_sized:
        return Plan(None, "autoregressive", 1.0, 1.0, source, costs)
    ranking = config.ranking_temperature
    if ranking is None and settings is not None:
        ranking = settings.ranking_temperature
    tree = replace(config, depth=depth, topk=topk, total_tokens=n, sampled=sampled,
                   ranking_temperature=ranking)
    return Plan(tree, mode, tau, speedup, source, costs, tail)
