"""What a decoding step costs on the running machine: measured once per (target, drafter,
batch size, threads, device, verification mode) and cached, for the cost model of
`vsd_ext.decoding.planner`.

A speculative step of a tree with n draft nodes, drafted in ``depth`` levels of ``topk``
frontier nodes, takes

    verify(n)   = verify_base + verify_node · n            target forward over n + 1 nodes,
                                                            verify_tree, KV compaction
    draft       = chain_first + (depth − 1) · chain_level   deterministic chains (topk 1)
                = tree_first + (depth − 1) · (tree_level + tree_node · topk)   other trees

and an autoregressive step takes ``autoregressive`` (the same loop with a one-node tree).
``*_first`` includes the drafter's forward over the pending tokens of the last step.

Every piece is timed as the step of its verification mode runs it (`StepCosts.mode`):
"greedy" (T = 0: top-k drafts, argmax verification), "target_only" (T > 0: top-k drafts,
verification sampling from the target's softmax at T) or "sampled" (T > 0: children drawn
from the drafter's q at T — Gumbel-top-k, q scattered to the target vocabulary for the
verifier — verified against q). A sampled tree is never a chain, so in "sampled" costs the
``chain_*`` pieces are those of a top-1 sampled tree. ``autoregressive`` is the one-node step
at the same temperature ("greedy": ``verify_base``; else a "target_only" step).

`measure_step_costs` times these pieces on a scratch cache (random tokens behind a prefix of
``PREFIX`` positions), each configuration a few times, interleaved, taking medians: about a
quarter of a second per mode for the default target on one CPU thread (a plan at T > 0 that
may choose either kind of tree measures both T > 0 modes).
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

__all__ = ["MODES", "StepCosts", "measure_step_costs", "step_clock", "step_costs"]

MODES = ("greedy", "target_only", "sampled")

PREFIX = 128          # cached positions behind the timed steps
PENDING = 3           # pending tokens the first drafter forward runs (≈ τ of a step)
REPEATS = 7           # timings per configuration (medians)
VERIFY_NODES = 12     # the larger tree of the verify fit (per row)
TREE_TOPK = (2, 6)    # frontier sizes of the tree-level fit
MAX_BATCH = 16        # larger batches use the costs measured at this size


@dataclass(frozen=True)
class StepCosts:
    """Seconds per step of the pieces in the module docstring, at one batch size, in one
    verification ``mode``; ``autoregressive`` None means ``verify_base`` (a greedy step)."""

    batch_size: int
    verify_base: float
    verify_node: float
    chain_first: float
    chain_level: float
    tree_first: float
    tree_level: float
    tree_node: float
    autoregressive: float | None = None
    mode: str = "greedy"

    def __post_init__(self):
        if self.autoregressive is None:
            object.__setattr__(self, "autoregressive", self.verify_base)

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


def step_costs(target, drafter, batch_size: int, mode: str = "greedy",
               temperature: float = 1.0) -> StepCosts:
    """`measure_step_costs`, cached per (target, drafter, batch size, threads, device, mode);
    ``temperature`` (T > 0 modes) is the one of the first measurement (the work of a step
    does not depend on its value). Batches larger than MAX_BATCH use the costs of MAX_BATCH
    rows (the cost model compares ratios of step times, which change little past it)."""
    _check_mode(mode, temperature)
    batch_size = min(batch_size, MAX_BATCH)
    key = (id(target), id(drafter), batch_size, torch.get_num_threads(), str(target.device),
           mode)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is target and hit[1]() is drafter:
        return hit[2]
    costs = measure_step_costs(target, drafter, batch_size, mode=mode,
                               temperature=temperature)
    _CACHE[key] = (weakref.ref(target), weakref.ref(drafter), costs)
    return costs


def step_clock(device: torch.device):
    """The clock step costs are measured with: on a CPU the thread's CPU time, which time
    slices lost to other processes on a shared machine do not inflate; on a GPU the wall
    clock (read between synchronizations)."""
    return time.perf_counter if device.type == "cuda" else time.thread_time


def _median_times(fns: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds of each zero-argument function on `step_clock`, the functions
    interleaved (one untimed warm-up round first)."""
    cuda = device.type == "cuda"
    clock = step_clock(device)
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


def _check_mode(mode: str, temperature: float) -> float:
    """The temperature the pieces of ``mode`` are timed at (0 for "greedy")."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode == "greedy":
        return 0.0
    if not temperature > 0:
        raise ValueError(f"temperature: mode {mode!r} needs a temperature > 0, got "
                         f"{temperature!r}")
    return float(temperature)


@torch.inference_mode()
def measure_step_costs(target, drafter, batch_size: int, repeats: int = REPEATS,
                       mode: str = "greedy", temperature: float = 1.0) -> StepCosts:
    """Time the pieces of a step (module docstring) for ``drafter`` on ``target``, as a step
    verified in ``mode`` at ``temperature`` runs them."""
    temperature = _check_mode(mode, temperature)
    device, B = target.device, batch_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, target.vocab_size, (B, PREFIX), generator=gen).to(device)
    capacity = PREFIX + 2 * VERIFY_NODES + 16
    cache = target.new_cache(B, capacity)
    out = target.prefill(ids, cache)
    verify = _verify_fns(target, cache, ids, B, mode, temperature)
    proposers = _draft_fns(drafter, ids, out.features, capacity, mode, temperature)
    t = _median_times({**verify, **proposers}, repeats, device)
    n = VERIFY_NODES
    k0, k1 = TREE_TOPK
    tree_node = _slope(k0, t["tree2_k0"] - t["tree1_k0"], k1, t["tree2_k1"] - t["tree1_k1"])
    tree_level = max(t["tree2_k0"] - t["tree1_k0"] - tree_node * k0, 0.0)
    if mode == "sampled":  # top-1 sampled trees are trees: chain = a tree of topk 1
        chain_first, chain_level = t["tree1_k0"], tree_level + tree_node
    else:
        chain_first, chain_level = t["chain1"], _slope(1, t["chain1"], 4, t["chain4"])
    return StepCosts(
        batch_size=B, verify_base=t["verify1"],
        verify_node=_slope(0, t["verify1"], n - 1, t["verify_n"]),
        chain_first=chain_first, chain_level=chain_level,
        tree_first=t["tree1_k0"], tree_level=tree_level, tree_node=tree_node,
        autoregressive=t.get("autoregressive", t["verify1"]), mode=mode)


def _verify_fns(target, cache, ids, B, mode: str, temperature: float) -> dict:
    """Verify steps of a root alone and of a chain of VERIFY_NODES nodes in ``mode`` (cache
    restored); in "sampled" mode also the autoregressive ("target_only") step."""
    device = ids.device
    lengths = cache.lengths.clone()
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(B, VERIFY_NODES, target.vocab_size, generator=gen,
                         device=device)
    q = torch.softmax(logits / (temperature or 1.0), dim=-1)  # made while drafting

    def step(n, step_mode):
        tokens = ids[:, -n:].contiguous()
        parents = chain_parents(B, n, device)
        scored = target.tree_verify(tokens, parents, cache)
        accepted, _, _ = verify_tree(
            scored.logits, tokens, parents,
            draft_probs=q[:, :n] if step_mode == "sampled" else None, mode=step_mode,
            temperature=temperature or 1.0, generator=gen)
        target.commit(cache, accepted)
        cache.lengths.copy_(lengths)

    fns = {"verify1": lambda: step(1, mode), "verify_n": lambda: step(VERIFY_NODES, mode)}
    if mode == "sampled":
        fns["autoregressive"] = lambda: step(1, "target_only")
    return fns


def _draft_fns(drafter, ids, features, capacity, mode: str, temperature: float,
               pending_tokens: int = PENDING) -> dict:
    """`DrafterProposer.propose` of chains (1 and 4 levels; not in "sampled" mode) and trees
    (1 and 2 levels of each TREE_TOPK), each from the same ``pending_tokens`` pending tokens
    (state restored), drawing children from q at ``temperature`` in "sampled" mode."""
    B = ids.shape[0]
    sampled = mode == "sampled"
    gen = torch.Generator(device=ids.device).manual_seed(0)
    base = DrafterProposer(drafter, TreeConfig(1, 1, 1), temperature, gen)
    lengths = torch.full((B,), ids.shape[1], dtype=torch.int64, device=ids.device)
    base.start(ids, lengths, features, ids[:, -1], capacity)
    m = pending_tokens
    pending = (ids[:, -m:], features[:, -m:],
               torch.full((B,), m, dtype=torch.int64, device=ids.device))
    base.cache.lengths -= m - 1  # the pending pairs follow the cached ones
    saved = base.cache.lengths.clone()

    def run(depth, topk, total):
        proposer = copy.copy(base)
        proposer.configure(TreeConfig(depth, topk, total, sampled=sampled))

        def fn():
            proposer.pending = pending
            proposer.propose(ids[:, -1])
            proposer.cache.lengths.copy_(saved)
        return fn

    k0, k1 = TREE_TOPK
    fns = {} if sampled else {"chain1": run(1, 1, 1), "chain4": run(4, 1, 4)}
    return {**fns, "tree1_k0": run(1, k0, k0), "tree2_k0": run(2, k0, 2 * k0),
            "tree1_k1": run(1, k1, k1), "tree2_k1": run(2, k1, 2 * k1)}
