"""Lossless checks of speculative decoding against the target's own decoding.

Speculative decoding must not change what the target generates:

- T = 0: the output is token-identical to greedy autoregressive decoding, prompt by prompt
  (`greedy_agreement`).
- T > 0: the output is a sample from the target's own sampling distribution
  (`sampling_check`). Many continuations of a few contexts are decoded at once (batched rows,
  independent randomness per row) and every one of their first ``tokens`` generated tokens is
  checked against the exact conditional distribution the target assigns it,
  ``p = softmax(logits / T)`` given the context and the tokens before it, from one full causal
  forward of the target over the sampled sequences (never through the decoding loop).

Why a randomized probability integral transform (PIT) and not bins of whole sequences: on a
real model the probability of a 3-token continuation is spread so thin that a few hundred
samples fill almost no chi-square bin (the embedded target: 0–1 sequences expected ≥ 5 times
out of 256), so a test on sequence bins would have no power. The PIT uses every sample:
order the vocabulary by (probability descending, id ascending) and map the sampled token x to

    u = P(X before x in that order) + V · p(x),      V ~ U(0, 1) independent,

which is exactly U(0, 1) when x ~ p (the randomization spreads each token's atom over its
own interval of width p(x)). Given the tokens before it, u_k is uniform whatever they were, so
all ``rows × tokens`` values are independent uniforms under losslessness, pooled over
contexts and positions. Pearson's chi-square of their histogram (``bins`` equal bins,
`vsd_ext.eval.stats.chi_square_p_value`) against the uniform decides. A decoder that samples too
sharply (e.g. at a lower temperature, or accepting drafts too often) piles u up near 0; one
that samples too flatly piles it near 1.

The first generated token comes from the prefill (no draft is involved); the second and later
come from verified draft trees, so ``tokens`` ≥ 2 is what exercises speculation: with an
accepting drafter one verify step emits several of them at once.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .stats import chi_square_p_value

__all__ = ["LosslessConfig", "greedy_agreement", "pit_values", "sampling_check"]


@dataclass(frozen=True)
class LosslessConfig:
    """Size of the T > 0 test (one per method and temperature).

    samples: continuations decoded in all (one batch), split evenly over ``prompts``
    contexts (256 × 3 tokens: 38 expected per bin; its cost on a CPU:
    docs/results/decoding_overheads_2026-11-29.md).
    prompts: how many evaluation prompts provide a context. context: the last ``context``
    tokens of each prompt (short, so the batched prefill of every row stays cheap;
    any context tests the decoding machinery). tokens: generated tokens checked per row (the
    first from the prefill, the rest from speculative steps). bins: equal-width bins of the
    PIT histogram (``samples · tokens / bins`` expected per bin). alpha: the check fails when
    the p-value is at most ``alpha`` (default 1e-4: a correct decoder fails once in ten
    thousand checks).
    """

    samples: int = 256
    prompts: int = 4
    context: int = 16
    tokens: int = 3
    bins: int = 20
    alpha: float = 1e-4

    def __post_init__(self):
        for name in ("samples", "prompts", "context", "tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LosslessConfig: {name} must be an integer >= 1, got {value!r}")
        if self.samples < self.prompts:
            raise ValueError(f"LosslessConfig: samples ({self.samples}) must be at least "
                             f"prompts ({self.prompts})")
        if not isinstance(self.bins, int) or self.bins < 2:
            raise ValueError(f"LosslessConfig: bins must be an integer >= 2, got {self.bins!r}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"LosslessConfig: alpha must be in (0, 1), got {self.alpha}")


def greedy_agreement(outputs: list[list[int]], reference: list[list[int]]) -> dict:
    """T = 0: how many outputs are token-identical to the autoregressive reference."""
    same = sum(a == b for a, b in zip(outputs, reference))
    return {"check": "exact_match", "identical": same, "compared": len(reference),
            "passed": same == len(reference) and len(outputs) == len(reference)}


@torch.inference_mode()
def pit_values(target, context: list[int], samples: torch.Tensor, temperature: float,
               generator: torch.Generator, max_logits: int = 1 << 24) -> torch.Tensor:
    """Randomized PIT values (module docstring) of sampled continuations of one context.

    samples ``[R, n]`` int64: generated tokens (row r continues ``context``). Returns
    ``[R, n]`` float64 in [0, 1]: for position k, ``u = Σ_{j before x} p_j + V · p_x`` with
    ``p = softmax(logits / T)`` of the target at ``context + samples[r, :k]``. Rows go through
    the target in chunks of at most ``max_logits`` logits (``rows · (L + n) · V``).
    """
    R, n = samples.shape
    L = len(context)
    ctx = torch.tensor(context, dtype=torch.int64)
    chunk = max(1, max_logits // ((L + n) * target.vocab_size))
    out = []
    for rows in samples.split(chunk):
        seqs = torch.cat((ctx.expand(rows.shape[0], -1), rows), 1).to(target.device)
        logits = target(seqs)[:, L - 1:L - 1 + n].double().cpu()         # [r, n, V]
        p = torch.softmax(logits / temperature, -1)
        px = p.gather(-1, rows[..., None])                                 # [r, n, 1]
        ids = torch.arange(p.shape[-1])
        before = (p > px) | ((p == px) & (ids < rows[..., None]))
        below = (p * before).sum(-1)
        v = torch.rand(rows.shape, generator=generator, dtype=torch.float64)
        out.append(below + v * px[..., 0])
    return torch.cat(out).clamp(0.0, 1.0)


def sampling_check(target, make_proposer: Callable, contexts: list[list[int]],
                   temperature: float, config: LosslessConfig, decode: Callable,
                   tree=None, seed: int = 0) -> dict:
    """T > 0: the PIT chi-square test (module docstring) of one decoding method.

    make_proposer(rows_prompts) → the ``drafter`` argument of ``decode`` for a batch (None for
    autoregressive decoding). decode: `vsd_ext.generate` (or a stand-in with its signature).
    All ``config.samples`` rows (split as evenly as possible over the contexts) are decoded
    in one batch.

    Returns ``{"check": "pit_chi_square", "p_value", "samples", "tokens", "bins",
    "histogram", "alpha", "passed"}``.
    """
    k = len(contexts)
    sizes = [config.samples // k + (i < config.samples % k) for i in range(k)]
    batch = [list(c) for c, size in zip(contexts, sizes) for _ in range(size)]
    gen = torch.Generator(device=target.device).manual_seed(seed * 7919 + 17)
    out = decode(target, make_proposer(batch), batch, config.tokens, temperature, tree,
                 generator=gen, ignore_eos=True)
    samples = torch.tensor(out.tokens, dtype=torch.int64)
    if samples.shape != (len(batch), config.tokens):
        raise RuntimeError(f"the decoder returned {tuple(samples.shape)} tokens, expected "
                           f"{(len(batch), config.tokens)} (ignore_eos=True)")
    pit_gen = torch.Generator().manual_seed(seed * 7919 + 18)
    u = torch.cat([pit_values(target, c, rows, temperature, pit_gen).flatten()
                   for c, rows in zip(contexts, samples.split(sizes))])
    counts = torch.bincount((u * config.bins).long().clamp(max=config.bins - 1),
                            minlength=config.bins)
    p_value = chi_square_p_value(counts, torch.full((config.bins,), 1.0 / config.bins))
    return {"check": "pit_chi_square", "p_value": p_value, "samples": len(batch),
            "tokens": config.tokens, "bins": config.bins, "histogram": counts.tolist(),
            "alpha": config.alpha, "passed": p_value > config.alpha}
