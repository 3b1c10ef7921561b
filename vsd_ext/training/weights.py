"""ARW and CAR weights of the VSD M-step (docs/design/METHOD.md), as tensor functions.

Notation: C contexts (anchor positions), S sampled draft paths per context, K tokens per path.
`alphas[c, s, i]` = α_i = min(1, p(z_i | ·) / q(z_i | ·)) of token i of path s (stop-gradient).

Path utility (docs/design/METHOD.md, E-step 4):
    expected:  U_s = ℓ(x, z_s) = Σ_{k=1..K} Π_{i≤k} α_i        (expected accepted length)
    realized:  U_s = n_s + 1                                  (accepted count + the bonus token)
ARW path weights:  w_s = S · softmax_s(log U_s / T_w), with T_w ≥ `min_temperature` the smallest
    temperature whose effective sample size ESS = (Σ w)² / Σ w² reaches ρ·S, found by bisection
    per context. ESS grows monotonically with T (T → ∞ gives uniform weights, ESS = S), so the
    bisection is well posed; utilities are floored at `utility_floor` so that a zero-utility path
    keeps a finite log and the bound stays reachable.
ARW position weights:  r_{s,i} = max(r_min, Π_{j<i} α_{s,j})   (probability decoding reaches i).
CAR confidence:  c_t = (max_v p_t(v))^β  or  (1 − H(p_t) / log V)^β  ("neg_entropy").
"""
from __future__ import annotations

import math

import torch

UTILITIES = ("expected", "realized")
CONFIDENCES = ("maxprob", "neg_entropy")


def path_utility(alphas: torch.Tensor, kind: str = "expected",
                 accepted: torch.Tensor | None = None) -> torch.Tensor:
    """U per path. alphas [..., K] float; accepted [...] int (required for kind="realized")."""
    if kind == "expected":
        return torch.cumprod(alphas.double(), dim=-1).sum(-1).to(alphas.dtype)
    if kind == "realized":
        if accepted is None:
            raise ValueError("path_utility: kind='realized' needs `accepted` (accepted counts)")
        return accepted.to(alphas.dtype) + 1.0
    raise ValueError(f"path_utility: kind must be one of {UTILITIES}, got {kind!r}")


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """ESS = (Σ w)² / Σ w² over the last dimension."""
    return weights.sum(-1).square() / weights.square().sum(-1)


def arw_path_weights(utility: torch.Tensor, rho: float = 0.5, min_temperature: float = 1.0,
                     utility_floor: float = 1e-6, iterations: int = 40) -> torch.Tensor:
    """ARW path weights [C, S] (mean 1 per context) from utilities [C, S] ≥ 0.

    T_w per context is the smallest T ≥ min_temperature with ESS(T) ≥ rho·S (bisection on log T).
    Equal utilities give exactly uniform weights.
    """
    if utility.dim() != 2:
        raise ValueError(f"arw_path_weights: utility must be [C, S], got {tuple(utility.shape)}")
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"arw_path_weights: rho must be in (0, 1], got {rho}")
    if min_temperature <= 0:
        raise ValueError(f"arw_path_weights: min_temperature must be > 0, got {min_temperature}")
    if bool((utility < 0).any()) or not bool(torch.isfinite(utility).all()):
        raise ValueError("arw_path_weights: utilities must be finite and non-negative")
    s = utility.shape[1]
    logu = utility.double().clamp_min(utility_floor).log()
    spread = (logu.max(-1, keepdim=True).values - logu.min(-1, keepdim=True).values)

    def weights_at(temp):
        return s * torch.softmax(logu / temp, dim=-1)

    target = rho * s * (1 - 1e-9)
    lo = torch.full_like(spread, math.log(min_temperature))
    ok_at_lo = effective_sample_size(weights_at(lo.exp())) >= target
    # An upper temperature where ESS ≥ ρS surely holds: at T ≥ spread / ε the weights differ by
    # at most a factor e^ε, so ESS ≥ S·e^{-2ε}; ε = -log(ρ)/2 (ρ < 1) suffices.
    eps = max(-math.log(rho) / 2.0, 1e-6)
    hi = torch.maximum((spread / eps).clamp_min(1e-12).log(), lo) + 1e-3
    for _ in range(iterations):
        mid = (lo + hi) / 2
        good = effective_sample_size(weights_at(mid.exp())).unsqueeze(-1) >= target
        hi = torch.where(good, mid, hi)
        lo = torch.where(good, lo, mid)
    temp = torch.where(ok_at_lo.unsqueeze(-1), torch.full_like(hi, min_temperature), hi.exp())
    return weights_at(temp).to(utility.dtype)


def arw_position_weights(alphas: torch.Tensor, r_min: float = 0.05) -> torch.Tensor:
    """r[..., i] = max(r_min, Π_{j<i} α_j): the reach probability of position i (r[..., 0] = 1)."""
    if not 0.0 <= r_min <= 1.0:
        raise ValueError(f"arw_position_weights: r_min must be in [0, 1], got {r_min}")
    reach = torch.cumprod(alphas.double(), dim=-1)
    reach = torch.cat([torch.ones_like(reach[..., :1]), reach[..., :-1]], dim=-1)
    return reach.clamp_min(r_min).to(alphas.dtype)


def normalize_mean_one(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scale weights so their mean over `mask` (True = counted token) is 1; 0 outside the mask."""
    weights = torch.where(mask, weights, torch.zeros_like(weights))
    count = mask.sum()
    if int(count) == 0:
        return weights
    return weights * (count / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny))


def car_confidence(target_logits: torch.Tensor, beta: float = 1.0, kind: str = "maxprob",
                   temperature: float = 1.0) -> torch.Tensor:
    """c_t per row of target_logits [M, V]: the target's confidence, in [0, 1]."""
    logp = torch.log_softmax(target_logits.float() / temperature, dim=-1)
    if kind == "maxprob":
        conf = logp.max(-1).values.exp()
    elif kind == "neg_entropy":
        entropy = -(logp.exp() * logp).sum(-1)
        conf = (1.0 - entropy / math.log(target_logits.shape[-1])).clamp(0.0, 1.0)
    else:
        raise ValueError(f"car_confidence: kind must be one of {CONFIDENCES}, got {kind!r}")
    return conf.pow(beta)
