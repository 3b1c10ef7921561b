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
    -sum_v p_v log_softmax(logits)_v with p = softmax(soft_targets / soft_temperature), i.e.
    F.cross_entropy with probability targets, terms with p_v = 0 counting 0 (even where the logit
    is -inf). lse = logsumexp(logits) on every row.

    Non-finite inputs (docs/design/OPS.md): lse is the exact log-sum-exp (+inf with a +inf logit,
    NaN with a NaN one, -inf for an all -inf row). A +inf logit on either side makes CE NaN (no
    distribution), as does an all -inf drafter row. A teacher row without mass (all -inf) has no
    target: the row counts as ignored. A zero row weight gives loss exactly 0.
    """
    dtype = _compute_dtype(logits.dtype)
    z = logits.to(dtype)
    lse = torch.logsumexp(z, dim=-1)
    active = targets != ignore_index
    zero = torch.zeros((), dtype=dtype, device=z.device)
    nan = torch.full((), float("nan"), dtype=dtype, device=z.device)
    undefined = lse == float("inf")
    if soft_targets is None:
        ce = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction="none")
    else:
        u = soft_targets.to(dtype) / soft_temperature
        soft_lse = torch.logsumexp(u, dim=-1)
        active = active & (soft_lse != float("-inf"))  # NaN counts as mass: it propagates
        undefined = undefined | (soft_lse == float("inf")) | soft_lse.isnan()
        # p = 0 on rows without a distribution (exp(u - soft_lse) would be NaN there): no NaN
        # enters the graph, so the gradients of the other rows stay finite.
        p = torch.where(soft_lse.isfinite()[:, None], torch.exp(u - soft_lse[:, None]), zero)
        log_q = torch.log_softmax(z, dim=-1)
        ce = -torch.where(p == 0, zero, p * log_q).sum(dim=-1)
    ce = torch.where(undefined, nan, ce)
    w = row_weights.to(dtype)
    loss = torch.where(active & (w != 0), ce * w, zero)
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
