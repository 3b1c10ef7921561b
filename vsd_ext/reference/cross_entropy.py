"""Pure-PyTorch specification of the weighted cross-entropy ops (docs/design/OPS.md, section 3).

Materializes the [M, V] logits and uses F.cross_entropy(reduction="none"): slow, memory-hungry and
obviously correct. Computes in float32 (float64 for float64 inputs); pass float64 inputs for an
accurate oracle. Differentiable through autograd w.r.t. logits / hidden / weight / bias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    row_weights: Tensor,
    soft_targets: Tensor | None = None,
    ignore_index: int = -100,
    soft_temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(loss_rows [M], lse [M]): loss_rows = row_weights * CE per row, 0 on ignored rows.

    Hard targets: CE = F.cross_entropy(logits, targets, reduction="none"). Soft targets: CE =
    -sum_v softmax(soft_targets / soft_temperature)_v * log_softmax(logits)_v, i.e.
    F.cross_entropy with probability targets (terms with probability 0 count 0).
    lse = logsumexp(logits) on every row.
    """
    dtype = _compute_dtype(logits.dtype)
    z = logits.to(dtype)
    lse = torch.logsumexp(z, dim=-1)
    active = targets != ignore_index
    zero = torch.zeros((), dtype=dtype, device=z.device)
    if soft_targets is None:
        ce = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction="none")
    else:
        # F.cross_entropy(z, p, reduction="none") with the convention 0 * log 0 = 0: teacher
        # entries of probability 0 (-inf teacher logits) add nothing, even where z = -inf.
        p = torch.softmax(soft_targets.to(dtype) / soft_temperature, dim=-1)
        log_q = torch.log_softmax(z, dim=-1)
        ce = -torch.where(p > 0, p * log_q, zero).sum(dim=-1)
    loss = torch.where(active, ce * row_weights.to(dtype), zero)
    return loss, lse


def weighted_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    row_weights: Tensor,
    soft_targets: Tensor | None = None,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    soft_temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """weighted_cross_entropy of the logits hidden @ weight.T (+ bias), materialized."""
    dtype = _compute_dtype(hidden.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return weighted_cross_entropy(logits, targets, row_weights, soft_targets, ignore_index,
                                  soft_temperature)
