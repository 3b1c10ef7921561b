"""Pure-PyTorch specification of vsd_ext.weighted_linear_divergence (docs/design/OPS.md, section 4).

Materializes the [M, V] logits and probabilities: slow, memory-hungry and obviously correct.
Computes in float32 (float64 for float64 inputs); pass float64 inputs for an accurate oracle.
Differentiable through autograd w.r.t. hidden / weight / bias; the gradients are those the
contract states (ties q_v = p_v take the p branch of min(p_v, q_v): no gradient through them).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weighted(w: Tensor, x: Tensor) -> Tensor:
    """w * x, exactly 0 where w == 0 (a zero-weight term adds nothing, even where x is inf/NaN)."""
    return torch.where(w != 0, w * x, torch.zeros_like(x))


def divergence_terms(z: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """(beta [M], kl [M]) of drafter logits z and teacher logits u (already over the temperature).

    beta = sum_v min(p_v, q_v), kl = sum_v q_v (log q_v - log p_v), q = softmax(z), p = softmax(u);
    classes with z_v = -inf count 0 (masked), one with z_v > -inf and p_v = 0 gives kl = +inf. Rows
    whose divergence is undefined give NaN: a +inf or NaN logit, or no mass (all -inf) on either
    side. The subgradient of min at q_v = p_v is that of p_v (zero).
    """
    lse_z, lse_u = torch.logsumexp(z, -1, keepdim=True), torch.logsumexp(u, -1, keepdim=True)
    defined = (lse_z.isfinite() & lse_u.isfinite()).squeeze(-1)
    # Undefined rows compute on zeros (no NaN enters the graph) and are set to NaN at the end.
    z = torch.where(defined[:, None], z, torch.zeros_like(z))
    u = torch.where(defined[:, None], u, torch.zeros_like(u))
    log_q, log_p = torch.log_softmax(z, -1), torch.log_softmax(u, -1)
    q, p = log_q.exp(), log_p.exp()
    beta = torch.where(log_q < log_p, q, p).sum(-1)  # ties: the p branch
    # q (log q - log p) over the classes the drafter does not mask (log q > -inf); +inf as soon as
    # one of them has p = 0. The +inf enters as a constant, so the gradient stays that of the
    # finite terms (a row with KL = +inf has no meaningful gradient; the kernels give NaN).
    drafted, p_zero = log_q > float("-inf"), log_p == float("-inf")
    ratio = torch.where(drafted & ~p_zero, log_q - log_p, torch.zeros_like(q))
    kl = torch.where(drafted, q * ratio, torch.zeros_like(q)).sum(-1)
    kl = torch.where((drafted & p_zero).any(-1), torch.full_like(kl, float("inf")), kl)
    nan = torch.full_like(beta, float("nan"))
    return torch.where(defined, beta, nan), torch.where(defined, kl, nan)


def weighted_linear_divergence(
    hidden: Tensor,
    weight: Tensor,
    teacher_logits: Tensor,
    tv_weights: Tensor,
    kl_weights: Tensor,
    bias: Tensor | None = None,
    soft_temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss_rows, beta, kl), each [M]: loss_rows = tv_weights (1 - beta) + kl_weights kl.

    z = hidden @ weight.T (+ bias), u = teacher_logits / soft_temperature. A zero weight makes its
    term exactly 0. A teacher row without mass (every entry -inf, e.g. padding) has no target:
    loss 0 and no gradient (beta and kl NaN). The gradient of a row flows only through the terms
    with nonzero weights (where the other term is inf or NaN, it does not poison the row). The
    gradient of a row whose loss is not finite is left unspecified here (the kernels give NaN).
    """
    dtype = _compute_dtype(hidden.dtype)
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    u = teacher_logits.to(dtype) / soft_temperature
    tv_w, kl_w = tv_weights.to(dtype), kl_weights.to(dtype)
    beta, kl = divergence_terms(z, u)
    # Each term sees z only on rows where its weight is nonzero: elsewhere it is a constant, so an
    # inf or NaN it holds there cannot turn into a 0 * inf gradient.
    beta_g, _ = divergence_terms(torch.where((tv_w != 0)[:, None], z, z.detach()), u)
    _, kl_g = divergence_terms(torch.where((kl_w != 0)[:, None], z, z.detach()), u)
    loss = _weighted(tv_w, 1 - beta_g) + _weighted(kl_w, kl_g)
    has_mass = torch.logsumexp(u, -1) != float("-inf")  # NaN counts as mass: NaN propagates
    loss = torch.where(has_mass, loss, torch.zeros_like(loss))
    return loss, beta.detach(), kl.detach()
