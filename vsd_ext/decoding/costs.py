"""What a decoding step costs on the running machine: measured once per (target, drafter,
batch size, threads, device) and cached, for the cost model of `vsd_ext.decoding.planner`.

A speculative step of a tree with n draft nodes, drafted in ``depth`` levels of ``topk``
frontier nodes, takes

    verify(n)   = verify_base + verify_node · n            target forward over n + 1 nodes,
                                                            verify_tree, KV compaction
    draft       = chain_first + (depth − 1) · chain_level   deterministic chains (topk 1)
                = tree_first + (depth − 1) · (tree_level + tree_node · topk)   other trees

and an autoregressive step takes ``verify_base`` (the same loop with a one-node tree).
``*_first`` includes the drafter's forward over the pending tokens of the last step.

`measure_step_costs` times these pieces on a scratch cache (random tokens behind a prefix of
``PREFIX`` positions), each configuration a few times, interleaved, taking medians: about a
quarter of a second for the default target on one CPU thread.
"""
from __future__ import annotations

import copy
import statistics
import time
import weakref
from dataclasses import asdict, dataclass

import torch

from ..ops.verify import verify_tree
from ..tree import chain_parents
from .draft_tree import TreeConfig
from .proposer import DrafterProposer

__all__ = ["StepCosts", "measure_step_costs", "step_costs"]

PREFIX = 128          # cached positions behind the timed steps
PENDING = 3           # pending tokens the first drafter forward runs (≈ τ of a step)
REPEATS = 7           # timings per configuration (medians)
VERIFY_NODES = 12     # the larger tree of the verify fit (per row)
TREE_TOPK = (2, 6)    # frontier sizes of the tree-level fit
MAX_BATCH = 16        # larger batches use the costs measured at this size


@dataclass(frozen=True)
class StepCosts:
    """Seconds per step of the pieces in the module docstring, at one batch size."""

    batch_size: int
    verify_base: float
    verify_node: float
    chain_first: float
    chain_level: float
    tree_first: float
    tree_level: float
    tree_node: float

    def draft(self, depth: int, topk: int, chain: bool) -> float:
        """Drafting time of ``depth`` levels (``chain``: the deterministic topk-1 path)."""
        if chain:
            return self.chain_first + (depth - 1) * self.chain_level
        return self.tree_first + (depth - 1) * (self.tree_level + self.tree_node * topk)

    def step(self, depth: int, topk: int, nodes: int, chain: bool) -> float:
        """A speculative step: drafting plus verifying ``nodes`` draft nodes."""
        return self.verify_base + self.verify_node * nodes + self.draft(depth, topk, chain)

    def to_dict(self) -> dict:
        return asdict(self)


_CACHE: dict = {}


def step_costs(target, drafter, batch_size: int) -> StepCosts:
    """`measure_step_costs`, cached per (target, drafter, batch size, threads, device).
    Batches larger than MAX_BATCH use the costs of MAX_BATCH rows (the cost model compares
    ratios of step times, which change little past it)."""
    batch_size = min(batch_size, MAX_BATCH)
    key = (id(target), id(drafter), batch_size, torch.get_num_threads(), str(target.device))
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is target and hit[1]() is drafter:
        return hit[2]
    costs = measure_step_costs(target, drafter, batch_size)
    _CACHE[key] = (weakref.ref(target), weakref.ref(drafter), costs)
    return costs


def _median_times(fns: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds of each zero-argument function, the functions interleaved (one
    untimed warm-up round first). On a CPU the clock is the thread's CPU time, which time
    slices lost to other processes on a shared machine do not inflate; on a GPU it is the
    wall clock between synchronizations."""
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.thread_time
    times = {name: [] for name in fns}
    for rnd in range(repeats + 1):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize(device)
            start = clock()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            if rnd:
                times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _slope(x0: float, y0: float, x1: float, y1: float) -> float:
    return max((y1 - y0) / (x1 - x0), 0.0)


@torch.inference_mode()
def measure_step_costs(target, drafter, batch_size: int, repeats: int = REPEATS) -> StepCosts:
    """Time the pieces of a step (module docstring) for ``drafter`` on ``target``."""
    device, B = target.device, batch_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, target.vocab_size, (B, PREFIX), generator=gen).to(device)
    capacity = PREFIX + 2 * VERIFY_NODES + 16
    cache = target.new_cache(B, capacity)
    out = target.prefill(ids, cache)
    verify = _verify_fns(target, cache, ids, B)
    proposers = _draft_fns(drafter, ids, out.features, capacity)
    t = _median_times({**verify, **proposers}, repeats, device)
    n = VERIFY_NODES
    k0, k1 = TREE_TOPK
    tree_node = _slope(k0, t["tree2_k0"] - t["tree1_k0"], k1, t["tree2_k1"] - t["tree1_k1"])
    return StepCosts(
        batch_size=B, verify_base=t["verify1"],
        verify_node=_slope(0, t["verify1"], n - 1, t["verify_n"]),
        chain_first=t["chain1"], chain_level=_slope(1, t["chain1"], 4, t["chain4"]),
        tree_first=t["tree1_k0"],
        tree_level=max(t["tree2_k0"] - t["tree1_k0"] - tree_node * k0, 0.0),
        tree_node=tree_node)


def _verify_fns(target, cache, ids, B) -> dict:
    """Verify steps of a root alone and of a chain of VERIFY_NODES nodes (cache restored)."""
    device = ids.device
    lengths = cache.lengths.clone()

    def step(n):
        tokens = ids[:, -n:].contiguous()
        parents = chain_parents(B, n, device)
        scored = target.tree_verify(tokens, parents, cache)
        accepted, _, _ = verify_tree(scored.logits, tokens, parents, mode="greedy")
        target.commit(cache, accepted)
        cache.lengths.copy_(lengths)

    return {"verify1": lambda: step(1), "verify_n": lambda: step(VERIFY_NODES)}


def _draft_fns(drafter, ids, features, capacity) -> dict:
    """`DrafterProposer.propose` of chains (1 and 4 levels) and trees (1 and 2 levels of
    each TREE_TOPK), each from the same pending tokens (state restored)."""
    B = ids.shape[0]
    base = DrafterProposer(drafter, TreeConfig(1, 1, 1), 0.0)
    lengths = torch.full((B,), ids.shape[1], dtype=torch.int64, device=ids.device)
    base.start(ids, lengths, features, ids[:, -1], capacity)
    m = PENDING
    pending = (ids[:, -m:], features[:, -m:],
               torch.full((B,), m, dtype=torch.int64, device=ids.device))
    base.cache.lengths -= m - 1  # the pending pairs follow the cached ones
    saved = base.cache.lengths.clone()

    def run(config):
        proposer = copy.copy(base)
        proposer.configure(config)

        def fn():
            proposer.pending = pending
            proposer.propose(ids[:, -1])
            proposer.cache.lengths.copy_(saved)
        return fn

    k0, k1 = TREE_TOPK
    return {"chain1": run(TreeConfig(1, 1, 1)), "chain4": run(TreeConfig(4, 1, 4)),
            "tree1_k0": run(TreeConfig(1, k0, k0)), "tree2_k0": run(TreeConfig(2, k0, 2 * k0)),
            "tree1_k1": run(TreeConfig(1, k1, k1)), "tree2_k1": run(TreeConfig(2, k1, 2 * k1))}
