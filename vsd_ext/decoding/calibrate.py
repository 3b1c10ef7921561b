"""`calibrate_drafter`: fit a drafter's decode settings (`vsd_ext.models.decode_settings`).

1. Acceptance per depth. The target decodes the prompts with the drafter drafting chains of
   ``depth`` tokens: greedy chains at T = 0, chains sampled from the drafter at each T > 0.
   Every depth d that a step reaches (the chain accepted down to d − 1) pairs the target's
   distribution there with the drafter's, and gives:
   - ``greedy`` (T = 0): whether the target's argmax is among the drafter's top k;
   - ``target_only`` (T > 0): the target's probability (at T) of the drafter's top k tokens,
     the chance that one of k top-k children is accepted without draws from the drafter;
   - ``sampled`` (T > 0): whether recursive rejection sampling accepts one of k children
     drawn without replacement from the drafter at T — estimated with ``samples`` draws of
     k children per pair, verified by `vsd_ext.verify_tree` itself.
2. Ranking temperature t_r: for each t in ``grid``, greedy decoding of the prompts with the
   ``reference_tree`` ranked by ``logits / t``; the t with the largest τ wins (ties: the one
   nearest 1). Recorded next to it: τ of every t, and the cheaper proxy, the per-depth
   negative log-likelihood of the target's argmax under ``softmax(logits / t)`` along the
   greedy chains (temperature scaling), with the mean calibrated top-1 probability against
   the measured top-1 acceptance.

Fit on prompts the drafter did not train on and that are not evaluation prompts: by default
the tune files' mid-file windows (`vsd_ext.corpus.tune_prompts`).
"""
from __future__ import annotations

import datetime
import math
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .. import corpus
from .._version import __version__
from ..models.decode_settings import Acceptance, DecodeSettings
from ..models.drafter_io import load_drafter
from ..ops.verify import verify_tree
from .draft_tree import TreeConfig, gumbel_noise
from .loop import _Decoding, _Rows, _Timer, as_batch, generate, run_decoding
from .proposer import DrafterProposer

__all__ = ["calibrate_drafter", "measure_acceptance", "ranking_tau"]

GRID = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
REFERENCE_TREE = TreeConfig(depth=6, topk=4, total_tokens=10)
DEPTH = 8        # chain depth of the acceptance runs
TOPK = 4         # k = 1 .. TOPK per depth
SAMPLES = 16     # draws of k children per (depth, pair) for the sampled estimate
MIN_REACHED = 16  # depths reached fewer times copy the previous depth's values


class _Recorder:
    """Per-depth sums of one acceptance run (module docstring, step 1)."""

    def __init__(self, drafter, vocab_size: int, temperature: float, depth: int, topk: int,
                 grid, samples: int, generator):
        self.drafter, self.T, self.K, self.grid = drafter, temperature, topk, list(grid)
        self.samples, self.generator, self.levels = samples, generator, []
        d2t = drafter.to_target_ids(torch.arange(drafter.draft_vocab_size,
                                                 device=drafter.d2t.device))
        self.d2t = d2t
        self.t2d = torch.full((vocab_size,), -1, dtype=torch.int64, device=d2t.device)
        self.t2d[d2t] = torch.arange(d2t.numel(), device=d2t.device)
        zeros = torch.zeros(depth, dtype=torch.float64)
        self.reached = zeros.clone()
        self.sums = {m: torch.zeros(depth, topk, dtype=torch.float64)
                     for m in (("greedy",) if temperature == 0 else ("target_only", "sampled"))}
        self.nll = torch.zeros(len(self.grid), depth, dtype=torch.float64)
        self.top1 = torch.zeros(len(self.grid), depth, dtype=torch.float64)
        self.outside = zeros.clone()  # greedy: the target's token outside the draft vocab

    def on_level(self, logits: torch.Tensor) -> None:
        self.levels.append(logits[:, 0].float())

    def observe(self, tree, target_logits: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """Pairs of the reached depths of one verified chain step."""
        D = len(self.levels)
        q = torch.stack(self.levels, 1)                               # [B, D, Vd]
        self.levels = []
        depth = torch.arange(D, device=q.device)
        reached = (num_accepted[:, None] >= depth) & (tree.tokens[:, 1:D + 1] >= 0)
        rows, cols = reached.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return
        q, p, cols = q[rows, cols], target_logits[rows, cols].float(), cols.cpu()
        self.reached.index_add_(0, cols, torch.ones(cols.numel(), dtype=torch.float64))
        if self.T == 0:
            self._greedy(q, p, cols)
        else:
            self._sampling(q, p, cols)

    def _greedy(self, q, p, cols) -> None:
        y = self.t2d[p.argmax(-1)]                                   # draft id or -1
        inside = y >= 0
        self.outside.index_add_(0, cols, (~inside).double().cpu())
        at_y = q.gather(1, y.clamp(min=0)[:, None])
        rank = torch.where(inside, (q > at_y).sum(1), q.shape[1])
        hits = rank[:, None] < torch.arange(1, self.K + 1, device=q.device)
        self.sums["greedy"].index_add_(0, cols, (hits & inside[:, None]).double().cpu())
        for i, t in enumerate(self.grid):
            logq = torch.log_softmax(q / t, -1)
            nll = -logq.gather(1, y.clamp(min=0)[:, None])[:, 0] * inside
            self.nll[i].index_add_(0, cols, nll.double().cpu())
            self.top1[i].index_add_(0, cols, logq.max(-1).values.exp().double().cpu())

    def _sampling(self, q, p, cols) -> None:
        pT = torch.softmax(p / self.T, -1)
        top = self.d2t[q.topk(self.K, -1).indices]                    # target ids, by rank
        self.sums["target_only"].index_add_(0, cols, pT.gather(1, top).cumsum(1).double().cpu())
        qT = torch.zeros_like(pT)
        qT[:, self.d2t] = torch.softmax(q / self.T, -1)
        accepted = sampled_acceptance(p, qT, self.T, self.K, self.samples, self.generator)
        self.sums["sampled"].index_add_(0, cols, accepted.double().cpu())

    def tables(self, min_reached: int = MIN_REACHED) -> list[Acceptance]:
        """The acceptance tables: a depth reached fewer than ``min_reached`` times repeats
        the depth above it (none from the first such depth when it is depth 1)."""
        out = []
        for mode, sums in self.sums.items():
            rows, last = [], None
            for d in range(sums.shape[0]):
                n = float(self.reached[d])
                row = (sums[d] / n).clamp(0, 1).tolist() if n >= min_reached else last
                if row is None:
                    break
                rows.append([round(v, 4) for v in torch.tensor(row).cummax(0).values.tolist()])
                last = rows[-1]
            if rows:
                out.append(Acceptance(mode, self.T, tuple(map(tuple, rows)),
                                      tuple(int(n) for n in self.reached[:len(rows)])))
        return out


def sampled_acceptance(target_logits: torch.Tensor, q: torch.Tensor, temperature: float,
                       k: int, samples: int, generator) -> torch.Tensor:
    """``[n, k]``: per pair, the fraction of ``samples`` trials in which recursive rejection
    sampling (`verify_tree`, mode "sampled") accepts one of the first j children drawn
    without replacement from ``q`` ``[n, V]`` against ``target_logits`` ``[n, V]`` at
    ``temperature`` (column j − 1)."""
    n, V = q.shape
    R = n * samples
    logq = q.log().repeat_interleave(samples, 0)
    keys = logq.double() + gumbel_noise(logq.shape, generator, logq.device)
    values, draws = keys.topk(k, -1)
    draws = torch.where(values > float("-inf"), draws, -1)
    logits = target_logits.new_zeros(R, k + 1, V)
    logits[:, 0] = target_logits.repeat_interleave(samples, 0)
    probs = q.new_zeros(R, k + 1, V)
    probs[:, 0] = q.repeat_interleave(samples, 0)
    tokens = torch.cat((torch.zeros(R, 1, dtype=torch.int64, device=q.device), draws), 1)
    parents = torch.cat((torch.full((R, 1), -1, device=q.device), torch.zeros(R, k,
                                                                              device=q.device)),
                        1).long()
    parents = torch.where(tokens >= 0, parents, -1)
    accepted, _, _ = verify_tree(logits, tokens, parents, draft_probs=probs, mode="sampled",
                                 temperature=temperature, generator=generator)
    child = accepted[:, 1]
    within = (child[:, None] >= 1) & (child[:, None] <= torch.arange(1, k + 1,
                                                                       device=q.device))
    return within.float().view(n, samples, k).mean(1)


@torch.inference_mode()
def measure_acceptance(target, drafter, prompts: list[list[int]], temperature: float,
                       max_new_tokens: int = 48, depth: int = DEPTH, topk: int = TOPK,
                       grid=GRID, samples: int = SAMPLES, seed: int = 0) -> _Recorder:
    """Step 1 of the module docstring at one temperature: decode every prompt (batch 1, EOS
    ignored) with chains of ``depth`` drafts; returns the filled `_Recorder`."""
    gen = torch.Generator(device=target.device).manual_seed(seed)
    config = TreeConfig(depth=depth, topk=1, total_tokens=depth, sampled=temperature > 0)
    recorder = _Recorder(drafter, target.vocab_size, temperature, depth, topk, grid, samples,
                         gen)
    for prompt in prompts:
        proposer = DrafterProposer(drafter, config, temperature, gen)
        proposer.on_level = recorder.on_level
        state = _Decoding(target, proposer, temperature, gen)
        state.observer = recorder.observe
        rows = _Rows(target, 1, max_new_tokens, None, True, None)
        run_decoding(state, rows, _Timer(target.device), [prompt], max_new_tokens)
    return recorder


def ranking_tau(target, drafter, prompts: list[list[int]], ranking_temperature: float,
                tree: TreeConfig = REFERENCE_TREE, max_new_tokens: int = 48) -> float:
    """τ of greedy decoding of ``prompts`` (batch 1, EOS ignored) with ``tree`` ranked at
    ``ranking_temperature`` (step 2 of the module docstring)."""
    config = replace(tree, sampled=False, ranking_temperature=ranking_temperature)
    emitted = forwards = 0
    for prompt in prompts:
        stats = generate(target, drafter, prompt, max_new_tokens, 0.0, config,
                         ignore_eos=True, decode_settings=None).stats
        emitted += stats["tau"] * stats["row_forwards"]
        forwards += stats["row_forwards"]
    return emitted / max(forwards, 1)


def _as_drafter(target, drafter, dtype):
    """(drafter, directory it came from or None)."""
    if isinstance(drafter, (str, Path)):
        return load_drafter(drafter, target, dtype=dtype), Path(drafter)
    if not hasattr(drafter, "grow_tree"):
        raise ValueError(f"drafter: expected a vsd_ext.Drafter or a drafter directory, got "
                         f"{type(drafter).__name__}")
    return drafter, None


def _encode(target, prompts) -> tuple[list[list[int]], str]:
    if prompts is None:
        texts = corpus.tune_prompts()
        return [target.tokenizer.encode(t).ids for t in texts], (
            f"vsd_ext.corpus.tune_prompts(): {len(texts)} mid-file windows of the tune files")
    prompts = list(prompts)
    if prompts and all(isinstance(p, str) for p in prompts):
        if target.tokenizer is None:
            raise ValueError("prompts are strings but the target has no tokenizer")
        return [target.tokenizer.encode(t).ids for t in prompts], f"{len(prompts)} given texts"
    return as_batch(prompts), f"{len(prompts)} given token-id prompts"


def _per_depth(values: torch.Tensor, reached: torch.Tensor) -> list[float | None]:
    return [round(float(v / n), 4) if n > 0 else None for v, n in zip(values, reached)]


def _calibration_record(greedy: _Recorder, grid) -> dict:
    """The NLL proxy and the reliability of greedy top-1 probabilities (module docstring)."""
    n = greedy.reached
    inside = n - greedy.outside
    nll = {f"{t:g}": _per_depth(greedy.nll[i], inside) for i, t in enumerate(grid)}
    total = [float(greedy.nll[i].sum() / inside.sum().clamp(min=1)) for i in range(len(grid))]
    return {"nll_by_depth": nll, "nll": [round(v, 4) for v in total],
            "nll_best": grid[min(range(len(grid)), key=total.__getitem__)],
            "top1_probability_by_depth": {f"{t:g}": _per_depth(greedy.top1[i], n)
                                          for i, t in enumerate(grid)},
            "top1_acceptance_by_depth": _per_depth(greedy.sums["greedy"][:, 0], n),
            "outside_draft_vocab_by_depth": _per_depth(greedy.outside, n)}


def calibrate_drafter(target, drafter, prompts=None, *, out: str | Path | None = None,
                      max_new_tokens: int = 48, temperatures=(0.0, 1.0), grid=GRID,
                      reference_tree: TreeConfig = REFERENCE_TREE, depth: int = DEPTH,
                      topk: int = TOPK, samples: int = SAMPLES, seed: int = 0,
                      dtype: torch.dtype | None = None, prompts_source: str | None = None,
                      progress=None) -> dict:
    """Fit and write a drafter's decode settings (module docstring); returns them as the
    dict written (`DecodeSettings.to_dict`).

    drafter: a `vsd_ext.Drafter` or a drafter directory (loaded in ``dtype``, default the
    target's). prompts: texts or token-id lists, default `vsd_ext.corpus.tune_prompts()`;
    ``prompts_source`` describes them in the record. out: the directory (or file) written,
    default the drafter's directory when one was given (else nothing is written).
    temperatures: of the acceptance runs (0 included for the greedy table and the fit).
    progress(message): called before each run."""
    drafter, directory = _as_drafter(target, drafter, dtype)
    ids, source = _encode(target, prompts)
    say = progress or (lambda message: None)
    tables, greedy = [], None
    for t in sorted({0.0, *map(float, temperatures)}):
        say(f"acceptance at T = {t:g}: chains of {depth} drafts, {len(ids)} prompts")
        recorder = measure_acceptance(target, drafter, ids, t, max_new_tokens, depth, topk,
                                      grid, samples, seed)
        tables += recorder.tables()
        greedy = recorder if t == 0 else greedy
    taus = []
    for t in grid:
        say(f"ranking temperature {t:g}: tau of the reference tree")
        taus.append(ranking_tau(target, drafter, ids, t, reference_tree, max_new_tokens))
    best = max(range(len(grid)), key=lambda i: (round(taus[i], 4), -abs(math.log(grid[i]))))
    fit = {"prompts": prompts_source or source, "num_prompts": len(ids),
           "max_new_tokens": max_new_tokens, "seed": seed, "grid": list(grid),
           "tau": [round(v, 4) for v in taus], "chosen_by": "tau",
           "reference_tree": asdict(reference_tree), "acceptance_chain_depth": depth,
           "sampled_estimate_draws": samples, **_calibration_record(greedy, list(grid)),
           "drafter_dtype": str(drafter.fc.weight.dtype).removeprefix("torch."),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "vsd_ext": __version__, "torch": torch.__version__}
    settings = DecodeSettings(grid[best], tuple(tables), fit)
    if out is not None or directory is not None:
        settings.save(out if out is not None else directory)
    return settings.to_dict()
