"""Small statistics helpers shared by the demos and the evaluation harness (torch + math
only: no scipy at run time).

- `chi_square_p_value`: Pearson goodness-of-fit of observed counts against exact
  probabilities, the lossless criterion at T > 0 (`pearson_statistic`: the statistic).
- `bootstrap_ratio_ci`: percentile bootstrap confidence interval of a ratio of sums over
  independent units (prompts), optionally divided by a baseline's ratio on the same
  resample (paired), for τ, tokens/s and speedups.
"""
from __future__ import annotations

import math

import torch

__all__ = ["pearson_statistic", "chi_square_p_value", "bootstrap_ratio_ci"]


def pearson_statistic(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """Pearson's χ² statistic of ``counts`` against ``expected`` counts, and its degrees of
    freedom; bins expecting fewer than 5 draws are pooled into one. A count in a bin expecting
    none is impossible under ``expected``: the statistic is then infinite."""
    counts, expected = counts.double(), expected.double()
    if bool((counts[expected == 0] > 0).any()):
        return math.inf, 1
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), obs.numel() - 1


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness-of-fit p-value of `counts` against `probs` (`pearson_statistic`; the
    Wilson–Hilferty normal approximation of the chi-square tail).

    Wilson–Hilferty: for X ~ χ²(k), (X/k)^(1/3) is close to normal with mean 1 − 2/(9k)
    and variance 2/(9k), so P(X ≥ x) ≈ ½·erfc(z/√2) with z the standardized cube root. A count in
    a bin of probability 0 is impossible under `probs`: the p-value is 0."""
    stat, dof = pearson_statistic(counts, probs.double() * float(counts.sum()))
    if math.isinf(stat):
        return 0.0
    if dof < 1:
        return 1.0
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def bootstrap_ratio_ci(num, den, base_num=None, base_den=None, level: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of ``R = Σ num / Σ den`` over units (e.g. prompts).

    num, den: per-unit sums ``[n]`` (e.g. tokens emitted and target forwards of one prompt,
    or new tokens and seconds). With ``base_num``/``base_den`` (a baseline measured on the
    same units) the statistic is the paired ratio ``R / R_base``: each resample draws the same
    units for both, so unit-to-unit variation common to both (long vs short prompts) cancels.
    Units are resampled with replacement ``resamples`` times (fixed ``seed``: the interval is
    reproducible); the interval is the ``(1 ± level) / 2`` quantiles. One unit gives the point
    value twice (no spread can be estimated from it).
    """
    num = torch.as_tensor(num, dtype=torch.float64)
    den = torch.as_tensor(den, dtype=torch.float64)
    n = num.numel()
    if n == 0 or den.numel() != n:
        raise ValueError(f"num and den must be non-empty and of equal length, got {num.numel()} "
                         f"and {den.numel()}")
    idx = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    stat = num[idx].sum(1) / den[idx].sum(1)
    if base_num is not None:
        base_num = torch.as_tensor(base_num, dtype=torch.float64)
        base_den = torch.as_tensor(base_den, dtype=torch.float64)
        stat = stat / (base_num[idx].sum(1) / base_den[idx].sum(1))
    tail = (1 - level) / 2
    lo, hi = torch.quantile(stat, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return [lo, hi]
