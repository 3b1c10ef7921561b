"""The speculative decoding loop: `generate(target, drafter, prompts, ...)`.

One step, for every unfinished row at once:

    1. draft      the proposer grows a tree per row below the last emitted token (the root):
                  `DrafterProposer` (proposer.py) for an EAGLE-3 drafter, or any object with
                  the same four methods (e.g. `OracleDrafter`); no drafter: the root alone
    2. verify     one target forward over all tree nodes (`Target.tree_verify`: tree-mask
                  attention over the cached prefix), then `vsd_ext.verify_tree` walks each
                  row: accepted draft tokens + one correction/bonus token
    3. commit     KV compaction of the accepted path in the target's cache; the proposer gets
                  the emitted tokens and the target features of the accepted nodes
    4. finish     rows stop independently (EOS / stop tokens, stop strings, max_new_tokens)
                  and leave the batch (their cache rows are dropped)

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
from .draft_tree import DraftTree, TreeConfig
from .proposer import DrafterProposer

__all__ = ["GenerationOutput", "generate"]


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
    """Per-row outputs and stopping rules (EOS / stop ids, stop strings, max_new_tokens)."""

    def __init__(self, B, max_new_tokens, stop_ids, stop_strings, tokenizer, callback):
        self.tokens = [[] for _ in range(B)]
        self.reasons = ["length"] * B
        self.max_new = max_new_tokens
        self.stop_ids, self.stop_strings = stop_ids, stop_strings
        self.tokenizer, self.callback = tokenizer, callback

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
             ignore_eos: bool = False, callback=None) -> GenerationOutput:
    """Speculative (or, with ``drafter=None``, autoregressive) decoding of a batch of prompts.

    target: a `vsd_ext.models.Target`. drafter: None, a `vsd_ext.Drafter` (trees per
    ``tree``), or a proposer object (`OracleDrafter`, or anything with ``num_nodes``,
    ``start``, ``propose``, ``advance``, ``keep``; see `DrafterProposer`). prompts: token ids, one list or a list of lists (any lengths).
    temperature: 0 → greedy; > 0 → sampling at that temperature (lossless). tree:
    `TreeConfig` (default depth 4, topk 4, total_tokens 12; ``sampled=True`` for trees drawn
    from the drafter). stop: extra stop token ids (ints) and stop strings (str, decoded with
    ``target.tokenizer``). The target's EOS ids stop a row unless ``ignore_eos``.
    generator: randomness of verification and sampled trees. callback(row, new_tokens):
    called as tokens are produced (streaming).

    Returns a `GenerationOutput`; ``stats``: tau (accepted + 1 per target forward per row),
    target_forwards (batched verify forwards, prefill excluded), row_forwards,
    acceptance_histogram (row-forwards with 0, 1, ... accepted draft tokens), new_tokens,
    tokens_per_second (new tokens / total wall time), time_s (prefill / draft / verify /
    other / total), mode, temperature, batch_size.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = as_batch(prompts)
    tree = tree or TreeConfig()
    stop = list(stop or [])
    stop_strings = [s for s in stop if isinstance(s, str)]
    if stop_strings and target.tokenizer is None:
        raise ValueError("stop strings need a tokenizer: the target has none")
    stop_ids = {int(s) for s in stop if not isinstance(s, str)}
    if not ignore_eos:
        stop_ids |= _eos_ids(target)
    device, B = target.device, len(prompts)
    timer = _Timer(device)

    if drafter is None:
        proposer = None
    elif hasattr(drafter, "propose"):
        proposer = drafter
    else:
        proposer = DrafterProposer(drafter, tree, temperature, generator)
    nodes = 1 if proposer is None else proposer.num_nodes  # N of every verified tree

    # ---- prefill: the prompts (right-padded), then the first token from the last logits.
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
    ids = torch.full((B, int(lengths.max())), -1, dtype=torch.int64, device=device)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p, dtype=torch.int64)
    capacity = ids.shape[1] + max_new_tokens + nodes + 1
    cache = target.new_cache(B, capacity)
    out = target.prefill(ids, cache, lengths)
    rows_idx = torch.arange(B, device=device)
    last = lengths - 1
    root_only = torch.full((B, 1), -1, dtype=torch.int64, device=device)
    mode = "greedy" if temperature == 0 else "target_only"
    _, first, _ = verify_tree(out.logits[rows_idx, last][:, None], ids[rows_idx, last][:, None],
                              root_only, mode=mode, temperature=temperature or 1.0,
                              generator=generator)
    roots = first[:, 0]
    if proposer is not None:
        proposer.start(ids, lengths, out.features, roots, capacity)
    rows = _Rows(B, max_new_tokens, stop_ids, stop_strings, target.tokenizer, callback)
    active = [b for b, t in enumerate(roots.tolist()) if not rows.add(b, [t])]
    keep = torch.tensor(active, dtype=torch.int64, device=device)
    hist = torch.zeros(nodes, dtype=torch.int64)
    forwards = 0
    if len(active) < B:
        cache.keep_rows(keep)
        roots = roots[keep]
        if proposer is not None:
            proposer.keep(keep)
    timer.lap("prefill")

    # ---- speculative steps
    while active:
        if proposer is None:
            draft = DraftTree(roots[:, None], root_only[: len(active)])
        else:
            draft = proposer.propose(roots)
        timer.lap("draft")
        # Trees that carry the drafter's q were sampled from it: verify against q.
        mode = ("greedy" if temperature == 0 else
                "sampled" if draft.draft_probs is not None else "target_only")
        scored = target.tree_verify(draft.tokens, draft.parents, cache)
        accepted, emitted, num = verify_tree(
            scored.logits, draft.tokens, draft.parents, draft_probs=draft.draft_probs,
            mode=mode, temperature=temperature or 1.0, generator=generator)
        target.commit(cache, accepted)
        timer.lap("verify")
        if proposer is not None:
            features = scored.features.gather(1, accepted.clamp(min=0)[..., None].expand(
                -1, -1, scored.features.shape[-1]))
            proposer.advance(emitted, num, features)
        roots = emitted.gather(1, num[:, None])[:, 0]
        forwards += 1
        hist += torch.bincount(num.cpu(), minlength=nodes)
        emitted_lists, counts = emitted.tolist(), (num + 1).tolist()
        finished = [rows.add(b, emitted_lists[i][:counts[i]]) for i, b in enumerate(active)]
        if any(finished):
            kept = [i for i, f in enumerate(finished) if not f]
            active = [active[i] for i in kept]
            keep = torch.tensor(kept, dtype=torch.int64, device=device)
            cache.keep_rows(keep)
            roots = roots[keep]
            if proposer is not None and active:
                proposer.keep(keep)
        timer.lap(None)

    total = time.perf_counter() - timer.t0
    new_tokens = sum(len(t) for t in rows.tokens)
    row_forwards = int(hist.sum())
    spent = timer.totals
    stats = {
        "tau": float((hist * torch.arange(1, nodes + 1)).sum()) / max(row_forwards, 1),
        "target_forwards": forwards,
        "row_forwards": row_forwards,
        "acceptance_histogram": hist.tolist(),
        "new_tokens": new_tokens,
        "tokens_per_second": new_tokens / total,
        "time_s": {"prefill": spent["prefill"], "draft": spent["draft"],
                   "verify": spent["verify"],
                   "other": total - spent["prefill"] - spent["draft"] - spent["verify"],
                   "total": total},
        "mode": mode,
        "temperature": temperature,
        "batch_size": B,
    }
    return GenerationOutput(rows.tokens, rows.reasons, stats)
