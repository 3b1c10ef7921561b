"""The speculative decoding loop: `generate(target, drafter, prompts, ...)`.

`generate` first plans (`vsd_ext.decoding.configure`): a `TreeConfig` with sizes left to the
cost model gets the tree `vsd_ext.decoding.planner` expects to be fastest on this machine (or
autoregressive decoding), ranked by the drafter's decode settings, and at T = 0 a per-step
policy (`vsd_ext.decoding.policy`). `prefill` fills the target's cache with the prompts and draws
each row's first token; then `speculative_step`, for every unfinished row at once:

    1. draft      the proposer grows a tree per row below the last emitted token (the root):
                  `DrafterProposer` (proposer.py) for an EAGLE-3 drafter, or any object with
                  the same four methods (e.g. `OracleDrafter`); no drafter: the root alone
    2. verify     one target forward over all tree nodes (`Target.tree_verify`: tree-mask
                  attention over the cached prefix), then `vsd_ext.verify_tree` walks each
                  row: accepted draft tokens + one correction/bonus token
    3. commit     KV compaction of the accepted path in the target's cache; the proposer gets
                  the emitted tokens and the target features of the accepted nodes

and `drop_finished`:

    4. finish     rows stop independently (EOS / stop tokens, stop strings, max_new_tokens)
                  and leave the batch (their cache rows are dropped)

and `check_drafting`: every few steps, a planned tree whose measured τ no longer pays for
drafting gives way to autoregressive steps for the rest of the call.

Plain autoregressive decoding (`drafter=None`) is the same loop with a one-node tree, so
both are measured through identical code. Verification modes: T = 0 → "greedy" (output
identical to greedy decoding); T > 0 → "target_only" (top-k trees, or the oracle) or
"sampled" (sampled trees, checked against the drafter's q). All are lossless.

τ (stats["tau"]) is tokens emitted per target forward per row: accepted + 1 (EAGLE's
convention), averaged over every (row, verify forward) pair; the prefill is not counted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..ops.verify import verify_tree
from ..tree import padded_chain
from .arguments import check_generation, check_tree
from .configure import configure_proposer, resolve_decode_settings
from .costs import step_clock
from .draft_tree import DraftTree, TreeConfig
from .planner import Plan, drafting_pays

__all__ = ["GenerationOutput", "generate"]

CHECK_EVERY = 8  # steps between the checks of `check_drafting`


@dataclass
class GenerationOutput:
    """tokens: per row, the generated ids (prompt excluded; a final EOS / stop token or the
    tokens completing a stop string included). finish_reasons: per row "eos", "stop" or
    "length". stats: see `generate`."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    stats: dict = field(default_factory=dict)


def as_batch(prompts) -> list[list[int]]:
    """One prompt (a list of ints) or a list of them → list of lists (each non-empty)."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if len(prompts) and all(isinstance(t, int) for t in prompts):
        prompts = [prompts]
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: expected one or more non-empty lists of token ids")
    return prompts


def _eos_ids(target) -> set[int]:
    eos = target.model_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


class _Timer:
    """Wall-clock seconds per phase; synchronizes CUDA so time lands in the right phase."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.totals = {"prefill": 0.0, "draft": 0.0, "verify": 0.0}
        self.t0 = self.last = time.perf_counter()

    def lap(self, phase: str | None) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if phase is not None:
            self.totals[phase] += now - self.last
        self.last = now


class _Rows:
    """Per-row outputs and stopping rules (EOS / stop ids, stop strings, max_new_tokens).
    ``stop``: extra stop ids (ints) and stop strings (str, decoded with the target's
    tokenizer); the target's EOS ids stop a row unless ``ignore_eos``."""

    def __init__(self, target, B, max_new_tokens, stop, ignore_eos, callback):
        stop = list(stop or [])
        self.stop_strings = [s for s in stop if isinstance(s, str)]
        if self.stop_strings and target.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: the target has none")
        self.stop_ids = {int(s) for s in stop if not isinstance(s, str)}
        if not ignore_eos:
            self.stop_ids |= _eos_ids(target)
        self.tokens = [[] for _ in range(B)]
        self.reasons = ["length"] * B
        self.max_new = max_new_tokens
        self.tokenizer, self.callback = target.tokenizer, callback

    def add(self, row: int, new: list[int]) -> bool:
        """Append ``new`` to ``row`` (cut at a stop); True when the row is finished."""
        out = self.tokens[row]
        before, reason = len(out), None
        for i, t in enumerate(new[: self.max_new - before]):
            if t in self.stop_ids:
                new, reason = new[: i + 1], "eos"
                break
        out.extend(new[: self.max_new - before])
        if self.stop_strings:
            for end in range(before + 1, len(out) + 1):
                text = self.tokenizer.decode(out[:end])
                if any(s in text for s in self.stop_strings):
                    del out[end:]
                    reason = "stop"
                    break
        if self.callback is not None and len(out) > before:
            self.callback(row, out[before:])
        if reason is not None:
            self.reasons[row] = reason
        return reason is not None or len(out) >= self.max_new


@torch.inference_mode()
def generate(target, drafter, prompts, max_new_tokens: int, temperature: float = 0.0,
             tree: TreeConfig | None = None, stop=None, generator: torch.Generator | None = None,
             ignore_eos: bool = False, callback=None,
             decode_settings="drafter") -> GenerationOutput:
    """Speculative (or, with ``drafter=None``, autoregressive) decoding of a batch of prompts.

    target: a `vsd_ext.models.Target`. drafter: None, a `vsd_ext.Drafter` (trees per
    ``tree``), or a proposer object (`OracleDrafter`, or anything with ``num_nodes``,
    ``start``, ``propose``, ``advance``, ``keep``; see `DrafterProposer`). prompts: token
    ids, one list or a list of lists (any lengths).
    temperature: 0 → greedy; > 0 → sampling at that temperature (lossless). tree:
    `TreeConfig`; its fields left None (all of them by default) are chosen by the cost model
    (`vsd_ext.decoding.planner`: the drafter's acceptance and the step costs measured on this
    machine), which may also decide that autoregressive decoding is faster. stop: extra stop
    token ids (ints) and stop strings (str, decoded with ``target.tokenizer``). The target's
    EOS ids stop a row unless ``ignore_eos``. generator: randomness of verification and
    sampled trees. callback(row, new_tokens): called as tokens are produced (streaming).
    decode_settings: the drafter's fitted settings (`vsd_ext.models.decode_settings`):
    "drafter" (default: ``drafter.decode_settings``, read by `load_drafter`), None or "off"
    (none: ranking temperature 1, the planner's prior acceptance), a `DecodeSettings`, a dict
    or the path of a settings file / drafter directory. ``tree.ranking_temperature``
    overrides their ranking temperature.

    Returns a `GenerationOutput`; ``stats``: tau (accepted + 1 per target forward per row),
    target_forwards (batched verify forwards, prefill excluded), row_forwards,
    acceptance_histogram (row-forwards with 0, 1, ... accepted draft tokens), new_tokens,
    tokens_per_second (new tokens / total wall time), time_s (prefill / draft / verify /
    other / total), step_seconds (mean time of a step on the step costs' clock: this
    thread's CPU time on a CPU), mode, temperature, batch_size, plan (the tree decoded
    with, the cost model's expectations — τ per row, the batch ``tail``, the speedup — and
    the costs of its verification mode, the step after which drafting stopped paying if it did,
    the seconds spent planning — once per process, batch size and drafter they include
    measuring the costs — which the times above leave out; None without a drafter or with a
    proposer object).
    """
    prompts = as_batch(check_generation(target, prompts, max_new_tokens, temperature, stop))
    tree = check_tree(tree)
    rows = _Rows(target, len(prompts), max_new_tokens, stop, ignore_eos, callback)
    settings = resolve_decode_settings(drafter, decode_settings)
    start = time.perf_counter()
    proposer, plan = configure_proposer(target, drafter, tree, temperature,
                                        generator, settings, len(prompts), max_new_tokens)
    state = _Decoding(target, proposer, temperature, generator)
    state.plan, state.plan_seconds = plan, time.perf_counter() - start
    return run_decoding(state, rows, _Timer(target.device), prompts, max_new_tokens)


def run_decoding(state, rows, timer, prompts, max_new_tokens) -> GenerationOutput:
    """The loop of `generate` on a prepared state: prefill, then speculative steps until
    every row is finished."""
    first = prefill(state, prompts, max_new_tokens)
    drop_finished(state, [rows.add(b, [token]) for b, token in enumerate(first)])
    timer.lap("prefill")
    while state.active:
        started = state.clock()
        emitted = speculative_step(state, timer)
        drop_finished(state, [rows.add(b, new) for b, new in zip(state.active, emitted)])
        state.step_seconds += state.clock() - started
        check_drafting(state)
        timer.lap(None)
    return GenerationOutput(rows.tokens, rows.reasons, _stats(state, rows, timer))


class _Decoding:
    """The state of one `generate` call: the target, the proposer (None: autoregressive),
    the sampling settings; the rows still decoding (``active``: indices into the prompts),
    the target's ``cache`` of those rows and each row's last emitted token (``roots``: the
    next tree's root); the statistics so far."""

    def __init__(self, target, proposer, temperature: float, generator):
        self.target, self.proposer = target, proposer
        self.temperature, self.generator = temperature, generator
        self.num_nodes = 1 if proposer is None else proposer.num_nodes  # N of every tree
        self.cache = self.roots = self.root_parents = None
        self.active: list[int] = []
        self.hist = torch.zeros(self.num_nodes, dtype=torch.int64)  # row-forwards per accepted
        self.forwards = 0
        self.mode = ""
        self.plan: Plan | None = None
        self.plan_seconds = 0.0  # planning (with the first measurement of the step costs)
        self.fallback_step: int | None = None  # step after which drafting stopped paying
        # Seconds of the steps so far, on the clock of the step costs, for `check_drafting`.
        self.clock = step_clock(target.device)
        self.step_seconds = 0.0
        self.observer = None  # observer(tree, target_logits, num_accepted) after each verify

    def verify(self, logits: torch.Tensor, tree: DraftTree):
        """`verify_tree` of the trees (T = 0: greedy; trees that carry the drafter's q were
        sampled from it and are verified against it)."""
        self.mode = ("greedy" if self.temperature == 0 else
                     "sampled" if tree.draft_probs is not None else "target_only")
        return verify_tree(logits, tree.tokens, tree.parents, draft_probs=tree.draft_probs,
                           mode=self.mode, temperature=self.temperature or 1.0,
                           generator=self.generator)


def prefill(state: _Decoding, prompts: list[list[int]], max_new_tokens: int) -> list[int]:
    """Prefill the prompts (right-padded) into a new cache, draw every row's first token from
    its last logits (a one-node tree: the last prompt token) and start the proposer.
    Returns the first tokens."""
    target, device, B = state.target, state.target.device, len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
    ids = torch.full((B, int(lengths.max())), -1, dtype=torch.int64, device=device)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p, dtype=torch.int64)
    capacity = ids.shape[1] + max_new_tokens + state.num_nodes + 1
    state.cache = target.new_cache(B, capacity)
    out = target.prefill(ids, state.cache, lengths)
    rows, last = torch.arange(B, device=device), lengths - 1
    state.root_parents = torch.full((B, 1), -1, dtype=torch.int64, device=device)
    root_only = DraftTree(ids[rows, last][:, None], state.root_parents)
    _, first, _ = state.verify(out.logits[rows, last][:, None], root_only)
    state.roots, state.active = first[:, 0], list(range(B))
    if state.proposer is not None:
        state.proposer.start(ids, lengths, out.features, state.roots, capacity)
    return state.roots.tolist()


def speculative_step(state: _Decoding, timer: _Timer) -> list[list[int]]:
    """One step for every active row (module docstring): draft a tree below the root,
    verify all trees with one target forward, commit the accepted paths to the cache, give
    the proposer what was emitted. Returns each row's emitted tokens (accepted + 1)."""
    if state.proposer is None:  # autoregressive decoding: the root alone
        B = len(state.active)
        mask, depths = padded_chain(0, 1, state.roots.device)
        tree = DraftTree(state.roots[:, None], state.root_parents[:B],
                         tree_mask=mask.expand(B, -1, -1), depths=depths.expand(B, -1))
    else:
        tree = state.proposer.propose(state.roots)
    timer.lap("draft")
    scored = state.target.tree_verify(tree.tokens, tree.parents, state.cache,
                                      tree_mask=tree.tree_mask, depths=tree.depths)
    accepted, emitted, num = state.verify(scored.logits, tree)
    if state.observer is not None:
        state.observer(tree, scored.logits, num)
    state.target.commit(state.cache, accepted)
    timer.lap("verify")
    if state.proposer is not None:  # the target features of the accepted nodes, root first
        features = scored.features.gather(1, accepted.clamp(min=0)[..., None].expand(
            -1, -1, scored.features.shape[-1]))
        state.proposer.advance(emitted, num, features)
    state.roots = emitted.gather(1, num[:, None])[:, 0]
    state.forwards += 1
    state.hist += torch.bincount(num.cpu(), minlength=state.num_nodes)
    return [row[:n] for row, n in zip(emitted.tolist(), (num + 1).tolist())]




def check_drafting(state: _Decoding) -> None:
    """Every CHECK_EVERY steps of a planned tree: when the τ measured so far no longer pays
    for drafting (`vsd_ext.decoding.planner.drafting_pays`, by more than the noise of a
    few steps; with a per-step policy, its modelled rate against autoregressive steps), or
    no longer pays for the steps' measured time (the cost model times each piece alone, with
    its weights warm in the caches; in the loop the drafter and the target evict each
    other's), the remaining steps are autoregressive
    (``state.fallback_step`` records when)."""
    if (state.plan is None or state.proposer is None or state.forwards % CHECK_EVERY
            or state.fallback_step is not None or state.plan.costs is None):
        return
    tau, stderr = _tau_and_stderr(state.hist)
    policy = getattr(state.proposer, "policy", None)
    if policy is not None:
        pays = policy.beats_autoregressive()
    else:
        pays = drafting_pays(state.plan, tau, stderr)
    pays = pays and drafting_pays(state.plan, tau, stderr,
                                  step_seconds=state.step_seconds / state.forwards)
    if not pays:
        state.proposer, state.fallback_step = None, state.forwards


def _tau_and_stderr(hist: torch.Tensor) -> tuple[float, float]:
    """The mean tokens per row-forward of an acceptance histogram (``hist[k]``: row-forwards
    with k accepted) and the standard error of that mean."""
    tokens = torch.arange(1, hist.shape[0] + 1, dtype=torch.float64)
    n = max(int(hist.sum()), 1)
    mean = float((hist * tokens).sum()) / n
    variance = max(float((hist * tokens ** 2).sum()) / n - mean ** 2, 0.0)
    return mean, (variance / n) ** 0.5


def drop_finished(state: _Decoding, finished: list[bool]) -> None:
    """Finished rows leave the batch: their rows of the cache, roots and proposer go."""
    if not any(finished):
        return
    kept = [i for i, done in enumerate(finished) if not done]
    state.active = [state.active[i] for i in kept]
    keep = torch.tensor(kept, dtype=torch.int64, device=state.target.device)
    state.cache.keep_rows(keep)
    state.roots = state.roots[keep]
    if state.proposer is not None and state.active:
        state.proposer.keep(keep)


def _stats(state: _Decoding, rows: _Rows, timer: _Timer) -> dict:
    total = time.perf_counter() - timer.t0
    new_tokens = sum(len(t) for t in rows.tokens)
    row_forwards = int(state.hist.sum())
    spent = timer.totals
    emitted = (state.hist * torch.arange(1, state.num_nodes + 1)).sum()
    return {
        "tau": float(emitted) / max(row_forwards, 1),
        "target_forwards": state.forwards,
        "row_forwards": row_forwards,
        "acceptance_histogram": state.hist.tolist(),
        "new_tokens": new_tokens,
        "tokens_per_second": new_tokens / total,
        "time_s": {"prefill": spent["prefill"], "draft": spent["draft"],
                   "verify": spent["verify"],
                   "other": total - spent["prefill"] - spent["draft"] - spent["verify"],
                   "total": total},
        "step_seconds": state.step_seconds / max(state.forwards, 1),
        "mode": state.mode,
        "temperature": state.temperature,
        "batch_size": len(rows.tokens),
        "plan": None if state.plan is None else {**state.plan.describe(),
                                                 "fallback_step": state.fallback_step,
                                                 "seconds": state.plan_seconds},
    }
