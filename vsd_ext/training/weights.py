"""Per-node weights of the VSD M-step (docs/design/METHOD.md), as plain tensor functions.

A sampled chain z_1..z_K below a root; node k (k = 0..K−1) is the context (x, z_1..z_k) at
which the drafter proposed z_{k+1}. `alphas[..., i−1]` = α_i = min(1, p(z_i) / q(z_i)), the
probability that lossless speculative sampling accepts z_i given z_1..z_{i−1} were accepted
(stop-gradient; all distributions at the decoding temperature).

    reach           r_k = Π_{i≤k} α_i                  (decoding reaches node k; r_0 = 1)
    expected length L_m = α_m (1 + L_{m+1}), L_{K+1} = 0 (accepted tokens from z_m on)
    future value    Ŵ_k = L_{k+2}                       (accepted after z_{k+1}, if it is)
    path length     ℓ = L_1 = Σ_k Π_{i≤k} α_i           (the chain's expected accepted length)
"""
from __future__ import annotations

import torch


def reach_weights(alphas: torch.Tensor) -> torch.Tensor:
    """r `[..., K]`: r_k = Π_{i≤k} α_i, the probability that decoding reaches node k."""
    ones = torch.ones_like(alphas[..., :1])
    return torch.cumprod(torch.cat((ones, alphas[..., :-1]), -1).double(), -1).to(alphas.dtype)


def expected_lengths(alphas: torch.Tensor) -> torch.Tensor:
    """L `[..., K + 1]`: L[..., m − 1] = expected accepted tokens from z_m on (L_{K+1} = 0)."""
    K = alphas.shape[-1]
    out = [torch.zeros_like(alphas[..., 0], dtype=torch.float64)]
    for m in range(K - 1, -1, -1):
        out.append(alphas[..., m].double() * (1.0 + out[-1]))
    return torch.stack(out[::-1], -1).to(alphas.dtype)


def future_values(alphas: torch.Tensor) -> torch.Tensor:
    """Ŵ `[..., K]`: Ŵ_k = L_{k+2}, the tokens accepted after node k's proposal z_{k+1}."""
    return expected_lengths(alphas)[..., 1:]


def path_length(alphas: torch.Tensor) -> torch.Tensor:
    """ℓ `[...]`: the expected accepted length of each chain."""
    return expected_lengths(alphas)[..., 0]


def greedy_row_weights(num_accepted: torch.Tensor, depth: int, future_value: bool,
                       fail_value: float) -> torch.Tensor:
    """T = 0 rows along the greedy path below each root: `[R, depth + 1]`, row k (the node
    after y_1..y_k, predicting y_{k+1}) exists for k ≤ n (n = num_accepted) and weighs
    1 + Ŵ_k with Ŵ_k = n − k − 1 for k < n (the greedy tokens accepted after y_{k+1}) and
    `fail_value` for k = n (getting y_{n+1} into the tree is worth the mean accepted length);
    0 where the row does not exist. Without `future_value` every existing row weighs 1."""
    k = torch.arange(depth + 1, device=num_accepted.device)
    n = num_accepted[:, None]
    exists = k[None] <= n
    if not future_value:
        return exists.double()
    value = torch.where(k[None] < n, (n - k[None] - 1).double(), float(fail_value))
    return torch.where(exists, 1.0 + value, 0.0)
