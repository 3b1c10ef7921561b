"""The evaluation harness: τ, tokens/s and speedup of drafters against plain autoregressive
decoding of the same target, with confidence intervals and a lossless check.

    results = evaluate(target, {"eagle3": d1, "vsd": d2, "oracle": "oracle"}, prompts)
    print(format_table(results)); write_report(results, "runs/eval")   # vsd_ext.eval.report

Measurement protocol (`evaluate`):

- Batch size 1, one prompt at a time (the latency regime speculative decoding targets),
  ``max_new_tokens`` per prompt; EOS is ignored by default so every method generates the same
  number of tokens per prompt.
- All methods in the same run, interleaved: for each (temperature, seed, prompt), every method
  decodes that prompt back to back, in an order rotated from prompt to prompt so slow drifts
  of a shared machine spread evenly; one untimed warm-up generation per method and temperature
  first. Same generator seed for every method on a prompt. ``threads`` pins
  `torch.set_num_threads` for the run (1 is fastest for the small default target on a busy CPU).
- τ = tokens emitted per target forward = accepted draft tokens + 1 (the correction/bonus
  token), EAGLE's convention, pooled over every verify forward (the prefill is not counted);
  autoregressive decoding has τ = 1.
- tokens/s = new tokens / wall time of `vsd_ext.generate` (prefill, drafting, verification),
  pooled over prompts and seeds. speedup = a method's tokens/s over autoregressive tokens/s at
  the same temperature, in the same run (autoregressive: exactly 1).
- 95% confidence intervals: percentile bootstrap over prompts (the unit of resampling; seeds
  are summed within a prompt), 2000 resamples; speedup intervals resample the method and the
  baseline on the same prompts (paired). See `vsd_ext.eval.stats.bootstrap_ratio_ci`.
- Lossless: T = 0, every speculative output equals the autoregressive output of that prompt
  (the timed runs are compared); T > 0, a chi-square test of the first generated tokens against
  the target's exact distribution (`vsd_ext.eval.lossless`), run for every method including
  autoregressive decoding (a control of the test itself).

Drafters: a `vsd_ext.Drafter`, the string ``"oracle"`` (an `OracleDrafter` of the target's
own greedy continuation: the decoding loop's ceiling at T = 0, τ = depth + 1; at T > 0 its
drafts stay on the greedy path, which the sampled text soon leaves, so there it is no
ceiling), or None, which means autoregressive decoding: that baseline is always included,
named ``"autoregressive"``.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..decoding import OracleDrafter, TreeConfig, generate
from ..decoding.oracle import DEFAULT_DEPTH
from .lossless import LosslessConfig, greedy_agreement, sampling_check
from .report import TAU_CONVENTION
from .stats import bootstrap_ratio_ci

__all__ = ["EVAL_SETS", "evaluate", "evaluation_prompts", "heldout_prompts", "read_prompts_jsonl"]

BASELINE = "autoregressive"
CI_METHOD = "95% percentile bootstrap over prompts (2000 resamples; speedup paired)"


# The fixed, versioned evaluation sets (`python/make_eval_sets.py` wrote them): mid-file
# windows of the held-out standard-library files, the same of Python code outside the corpus,
# and the held-out files' first lines (headers, reported separately).
PROMPT_DIR = Path(__file__).resolve().parent.parent / "assets" / "prompts"
EVAL_SETS = {"heldout": "heldout_midfile_v1", "external": "external_midfile_v1",
             "headers": "heldout_headers_v1"}


def evaluation_prompts(name: str = "heldout", limit: int | None = None) -> list[str]:
    """The first ``limit`` prompts (all by default) of the evaluation set ``name``
    (`EVAL_SETS`). `vsd eval`, `vsd demo` and `python/compare_methods.py` read these."""
    if name not in EVAL_SETS:
        raise ValueError(f"prompt set: expected one of {sorted(EVAL_SETS)}, got {name!r}")
    texts = read_prompts_jsonl(PROMPT_DIR / f"{EVAL_SETS[name]}.jsonl")
    if limit is not None and not 1 <= limit <= len(texts):
        raise ValueError(f"num_prompts: the {name} set has {len(texts)} prompts, {limit} "
                         f"asked for")
    return texts[:limit]


def heldout_prompts(num_prompts: int = 8) -> list[str]:
    """The built-in prompt set: the first ``num_prompts`` mid-file windows of held-out
    standard-library files (never seen in training), `evaluation_prompts("heldout")`."""
    return evaluation_prompts("heldout", num_prompts)


def read_prompts_jsonl(path: str | Path) -> list[str]:
    """Prompts from a JSONL file: one object per line with a ``"prompt"`` or ``"text"``
    string (blank lines skipped)."""
    texts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
        text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text:
            raise ValueError(f"{path}:{number}: expected an object with a non-empty "
                             f"\"prompt\" or \"text\" string")
        texts.append(text)
    if not texts:
        raise ValueError(f"{path}: no prompts")
    return texts


class _Method:
    """One decoding method: autoregressive (drafter None), an EAGLE-3 drafter, or the oracle
    (its drafts are the target's greedy continuation of each row, ``references``)."""

    def __init__(self, name: str, drafter, tree: TreeConfig):
        if drafter is not None and not isinstance(drafter, str) and not hasattr(drafter,
                                                                                "tree_step"):
            raise ValueError(f"drafters[{name!r}]: expected a vsd_ext.Drafter, 'oracle' or "
                             f"None, got {type(drafter).__name__}")
        if isinstance(drafter, str) and drafter != "oracle":
            raise ValueError(f"drafters[{name!r}]: the only string accepted is 'oracle', "
                             f"got {drafter!r}")
        self.name, self.drafter, self.tree = name, drafter, tree
        self.kind = "autoregressive" if drafter is None else (
            "oracle" if drafter == "oracle" else "drafter")

    def proposer(self, prompts: list[list[int]], references: list[list[int]] | None):
        if self.kind == "oracle":
            return OracleDrafter([p + r for p, r in zip(prompts, references)],
                                 self.tree.depth or DEFAULT_DEPTH)
        return self.drafter

    def describe(self) -> dict:
        if self.kind == "autoregressive":
            return {"kind": "autoregressive", "tree": None}
        if self.kind == "oracle":
            return {"kind": "oracle", "tree": {"depth": self.tree.depth or DEFAULT_DEPTH}}
        return {"kind": "drafter", "tree": asdict(self.tree)}


def _methods(drafters: dict, tree: TreeConfig) -> list[_Method]:
    methods = [_Method(BASELINE, None, tree)]
    for name, drafter in drafters.items():
        if drafter is None:
            if name != BASELINE:
                raise ValueError(f"drafters[{name!r}] is None: autoregressive decoding is "
                                 f"always included, as {BASELINE!r}")
            continue
        if name == BASELINE:
            raise ValueError(f"{BASELINE!r} names the baseline; give the drafter another name")
        methods.append(_Method(name, drafter, tree))
    return methods


class _Record:
    """Per-prompt sums (over seeds) of one method at one temperature, and its outputs."""

    def __init__(self, num_prompts: int):
        self.tokens = [0] * num_prompts
        self.seconds = [0.0] * num_prompts
        self.emitted = [0] * num_prompts          # Σ (accepted + 1) over row forwards
        self.row_forwards = [0] * num_prompts
        self.forwards = 0
        self.hist = None
        self.time_s: dict[str, float] = {}
        self.outputs: dict[tuple[int, int], list[int]] = {}  # (seed, prompt) → tokens
        self.mode = None
        self.plan = None  # the cost model's plan of the last run (generate's stats["plan"])

    def add(self, seed: int, prompt: int, out) -> None:
        s = out.stats
        hist = torch.tensor(s["acceptance_histogram"], dtype=torch.int64)
        self.hist = hist if self.hist is None else self.hist + hist
        self.tokens[prompt] += s["new_tokens"]
        self.seconds[prompt] += s["time_s"]["total"]
        self.emitted[prompt] += int((hist * torch.arange(1, hist.numel() + 1)).sum())
        self.row_forwards[prompt] += s["row_forwards"]
        self.forwards += s["target_forwards"]
        for phase, value in s["time_s"].items():
            self.time_s[phase] = self.time_s.get(phase, 0.0) + value
        self.outputs[(seed, prompt)] = out.tokens[0]
        self.mode = s["mode"]
        self.plan = s.get("plan")


def _encode(target, prompts) -> list[list[int]]:
    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
    if all(isinstance(p, str) for p in prompts):
        if target.tokenizer is None:
            raise ValueError("prompts are strings but the target has no tokenizer")
        # The tokenizer's own special tokens (e.g. a BOS), as `vsd generate` encodes prompts.
        return [e.ids for e in target.tokenizer.encode_batch(list(prompts))]
    ids = [[int(t) for t in p] for p in prompts]
    if any(len(p) == 0 for p in ids):
        raise ValueError("prompts: every prompt must have at least one token")
    return ids


def _references(target, rows: list[list[int]], n: int) -> list[list[int]]:
    """The target's greedy continuation of every row (n tokens, EOS ignored; once per
    distinct prompt): the oracle's drafts."""
    unique = list(dict.fromkeys(tuple(r) for r in rows))
    greedy = {p: generate(target, None, list(p), n, ignore_eos=True).tokens[0] for p in unique}
    return [greedy[tuple(r)] for r in rows]


def evaluate(target, drafters: dict, prompts, temperatures=(0.0, 1.0), max_new_tokens: int = 64,
             tree: TreeConfig | None = None, seeds=(0,),
             lossless_check: bool | LosslessConfig = True, threads: int | None = None,
             ignore_eos: bool = True, warmup: bool = True, progress: bool = True) -> list[dict]:
    """Decode ``prompts`` with every method in ``drafters`` and autoregressively (module
    docstring for the protocol).

    target: a `vsd_ext.models.Target`. drafters: name → `Drafter` | "oracle" | None.
    prompts: texts (encoded with ``target.tokenizer``) or token-id lists. temperatures: each is
    evaluated (0 = greedy). tree: the drafters' `TreeConfig` (default `TreeConfig()`: the
    cost model sizes the trees, or decodes autoregressively, per temperature).
    seeds: generator seeds; every T > 0 run repeats for each (T = 0 is deterministic and runs
    once, with the first). lossless_check: True (default sizes), a `LosslessConfig`, or False
    to skip the T > 0 sampling test (``lossless`` is then None at T > 0; the T = 0 comparison
    of the timed outputs is always made). threads: `torch.set_num_threads` during the run
    (restored after).

    Returns one dict per (method, temperature), the baseline first: method, temperature,
    tau (accepted + 1 per target forward), tau_ci95, tokens_per_second,
    tokens_per_second_ci95, speedup, speedup_ci95, lossless, lossless_detail,
    acceptance_histogram (row-forwards with 0, 1, ... accepted draft tokens),
    target_forwards, new_tokens, time_s (prefill/draft/verify/other/total sums), mode, plan
    (the cost model's choice: `generate`'s stats["plan"]), kind, tree, num_prompts, seeds,
    max_new_tokens, tau_convention, ci_method.
    """
    tree = tree or TreeConfig()
    methods = _methods(drafters, tree)
    ids = _encode(target, prompts)
    temps = [float(t) for t in temperatures]
    if not temps or any(t < 0 for t in temps):
        raise ValueError(f"temperatures: expected one or more values >= 0, got {temperatures}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    check = (LosslessConfig() if lossless_check is True else
             lossless_check if isinstance(lossless_check, LosslessConfig) else None)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(target, methods, ids, temps, max_new_tokens, tree, seeds, check,
                    ignore_eos, warmup, progress)
    finally:
        torch.set_num_threads(saved_threads)


def _run(target, methods, ids, temps, max_new_tokens, tree, seeds, check, ignore_eos, warmup,
         progress) -> list[dict]:
    from tqdm.auto import tqdm

    oracle = any(m.kind == "oracle" for m in methods)
    refs = _references(target, ids, max_new_tokens) if oracle else [None] * len(ids)
    runs = sum(len(seeds[:1] if t == 0 else seeds) for t in temps) * len(ids) * len(methods)
    checks = len(methods) * sum(t > 0 for t in temps) if check is not None else 0
    bar = tqdm(total=runs + checks, desc="vsd eval", unit="run", disable=not progress,
               leave=False)
    records: dict[tuple[str, float], _Record] = {}
    for t in temps:
        if warmup:
            for m in methods:
                generate(target, m.proposer(ids[:1], refs[:1]), ids[0], min(8, max_new_tokens),
                         t, tree, generator=torch.Generator(device=target.device).manual_seed(0),
                         ignore_eos=ignore_eos)
        for m in methods:
            records[(m.name, t)] = _Record(len(ids))
        for si, seed in enumerate(seeds[:1] if t == 0 else seeds):
            for i, prompt in enumerate(ids):
                k = (i + si) % len(methods)
                for m in methods[k:] + methods[:k]:
                    bar.set_postfix_str(f"T={t:g} {m.name}", refresh=False)
                    gen = torch.Generator(device=target.device).manual_seed(seed * 100003 + i)
                    out = generate(target, m.proposer([prompt], refs[i:i + 1]), prompt,
                                   max_new_tokens, t, tree, generator=gen, ignore_eos=ignore_eos)
                    records[(m.name, t)].add(seed, i, out)
                    bar.update()
    results = []
    for t in temps:
        base = records[(BASELINE, t)]
        for m in methods:
            if t > 0 and check is not None:
                bar.set_postfix_str(f"T={t:g} {m.name} lossless check", refresh=False)
            detail = _lossless(target, m, t, records[(m.name, t)], base, ids, check, tree,
                               seeds[0])
            if t > 0 and check is not None:
                bar.update()
            results.append(_summary(m, t, records[(m.name, t)], base, detail, seeds,
                                    max_new_tokens))
    bar.close()
    return results


def _lossless(target, m: _Method, t: float, rec: _Record, base: _Record, ids, check, tree,
              seed: int) -> dict:
    """T = 0: the timed outputs against autoregressive decoding's; T > 0: the sampling test
    on the first ``check.prompts`` prompts' last ``check.context`` tokens."""
    if t == 0:
        keys = sorted(base.outputs)
        detail = greedy_agreement([rec.outputs[k] for k in keys], [base.outputs[k] for k in keys])
        if m.kind == "autoregressive":
            detail["check"] = "reference"
        return detail
    if check is None:
        return {"check": "skipped", "passed": None}

    def make_proposer(rows):
        refs = (_references(target, rows, check.tokens + (tree.depth or DEFAULT_DEPTH))
                if m.kind == "oracle" else None)
        return m.proposer(rows, refs)

    contexts = [p[-check.context:] for p in ids[:check.prompts]]
    return sampling_check(target, make_proposer, contexts, t, check, generate, tree, seed=seed)


def _summary(m: _Method, t: float, rec: _Record, base: _Record, detail: dict, seeds,
             max_new_tokens) -> dict:
    tau = sum(rec.emitted) / max(sum(rec.row_forwards), 1)
    tps = sum(rec.tokens) / sum(rec.seconds)
    base_tps = sum(base.tokens) / sum(base.seconds)
    return {
        "method": m.name,
        "temperature": t,
        "tau": tau,
        "tau_ci95": bootstrap_ratio_ci(rec.emitted, rec.row_forwards),
        "tokens_per_second": tps,
        "tokens_per_second_ci95": bootstrap_ratio_ci(rec.tokens, rec.seconds),
        "speedup": tps / base_tps,
        "speedup_ci95": bootstrap_ratio_ci(rec.tokens, rec.seconds, base.tokens, base.seconds),
        "lossless": detail["passed"],
        "lossless_detail": detail,
        "acceptance_histogram": rec.hist.tolist(),
        "target_forwards": rec.forwards,
        "new_tokens": sum(rec.tokens),
        "time_s": rec.time_s,
        "mode": rec.mode,
        "plan": rec.plan,
        **m.describe(),
        "num_prompts": len(rec.tokens),
        "seeds": seeds[:1] if t == 0 else list(seeds),
        "max_new_tokens": max_new_tokens,
        "tau_convention": TAU_CONVENTION,
        "ci_method": CI_METHOD,
    }

