"""vsd_ext.weighted_linear_divergence (docs/design/OPS.md section 4): the VSD objective's divergence
terms of the drafter against the target, fused with the LM head.

Per row, with q = softmax(hidden @ weight.T + bias) (the drafter) and p = softmax(teacher_logits /
soft_temperature) (the target): the acceptance mass beta = sum_v min(p_v, q_v) (the probability that
one draft from q is accepted by lossless speculative sampling against p; 1 - beta = TV(p, q)) and
the reverse KL(q || p). ``loss_rows = tv_weights (1 - beta) + kl_weights KL``. The logits are
computed in row chunks exactly like `weighted_linear_cross_entropy` (the same C++ driver) and the
``[M, V]`` logits, probabilities or their gradient never exist. Specification:
:mod:`vsd_ext.reference.divergence`; the math and its gradient: csrc/weighted_ce_div_math.h.

Autograd: gradients w.r.t. ``hidden``, ``weight``, ``bias`` for any upstream gradient of
``loss_rows`` (``beta`` and ``kl`` are metrics: not differentiable). In grad mode the forward
computes the gradients of ``sum(loss_rows)`` while each chunk is hot; the backward rescales them
when the upstream gradient is the same on every row with a nonzero weight (the usual
``loss_rows.sum() / norm``) and otherwise recomputes the logits once (as the cross-entropy does).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .checks import (
    FLOATS,
    check_linear_head,
    check_positive,
    check_tensor,
    chunk_arg,
    real_scalar,
    requires_grad,
)
from .cross_entropy import _acc, grad_fakes, unit_grad_fakes

_OPS = torch.ops.vsd_ext


def _check_args(hidden, weight, teacher_logits, tv_weights, kl_weights, bias, soft_temperature,
                chunk_size):
    """The fake kernel's checks (`vsd_ext.ops.checks`): the same as csrc/weighted_ce_checks.h."""
    M, _, V = check_linear_head(hidden, weight, bias, chunk_size)
    check_tensor(teacher_logits, "teacher_logits", (M, V), FLOATS, hidden, "hidden")
    check_tensor(tv_weights, "tv_weights", (M,), (torch.float32,), hidden, "hidden")
    check_tensor(kl_weights, "kl_weights", (M,), (torch.float32,), hidden, "hidden")
    check_positive(soft_temperature, "soft_temperature")


def weighted_linear_divergence(
    hidden: Tensor,
    weight: Tensor,
    teacher_logits: Tensor,
    tv_weights: Tensor,
    kl_weights: Tensor,
    bias: Tensor | None = None,
    soft_temperature: float = 1.0,
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``tv_weights (1 - beta) + kl_weights KL(q || p)`` without materializing the logits.

    Args:
        hidden: ``[M, H]`` float16 / bfloat16 / float32 / float64 drafter hidden states.
            Differentiable.
        weight: ``[V, H]`` the drafter's LM head, dtype of ``hidden``. Differentiable.
        teacher_logits: ``[M, V]`` float16 / bfloat16 / float32 / float64 target logits s;
            ``p = softmax(s / soft_temperature)``. ``-inf`` masks a class.
        tv_weights, kl_weights: ``[M]`` float32 per-row weights of ``1 - beta`` and of ``KL``; any
            sign; a zero weight makes its term exactly 0 (and gives it no gradient).
        bias: ``[V]`` dtype of ``weight``, or None. Differentiable.
        soft_temperature: > 0, divides ``teacher_logits``.
        chunk_size: logits elements per chunk (whole rows: at least one row per chunk); None:
            1,024 rows, capped as in `weighted_linear_cross_entropy`.

    Returns:
        ``loss_rows``: ``[M]`` float32 (float64 for float64 inputs); differentiable.
        ``beta``: ``[M]`` the acceptance mass ``sum_v min(p_v, q_v)``, same dtype.
        ``kl``: ``[M]`` ``KL(q || p)`` (``+inf`` where q has mass on a class p masks), same dtype.
        Non-finite inputs follow docs/design/OPS.md: a teacher row without mass (all ``-inf``)
        gives loss 0 and no gradient; a ``+inf`` or NaN logit gives NaN.
    """
    chunk, temperature = chunk_arg(chunk_size), real_scalar(soft_temperature, "soft_temperature")
    track = torch.is_grad_enabled()
    grad_mask = [track and requires_grad(hidden, "hidden"),
                 track and requires_grad(weight, "weight"), track and requires_grad(bias, "bias")]
    loss, beta, kl, *_ = _OPS.weighted_linear_divergence_forward(
        hidden, weight, teacher_logits, tv_weights, kl_weights, bias, temperature, chunk, grad_mask)
    return loss, beta, kl


@torch.library.register_fake("vsd_ext::weighted_linear_divergence_forward")
def _forward_fake(hidden, weight, teacher_logits, tv_weights, kl_weights, bias, soft_temperature,
                  chunk_size, grad_mask):
    _check_args(hidden, weight, teacher_logits, tv_weights, kl_weights, bias, soft_temperature,
                chunk_size)
    M, acc = hidden.shape[0], _acc(hidden.dtype)
    rows = [hidden.new_empty(M, dtype=acc) for _ in range(6)]  # loss, beta, kl, lse, soft_lse, q<
    return (*rows, *unit_grad_fakes(hidden, weight, grad_mask))


@torch.library.register_fake("vsd_ext::weighted_linear_divergence_backward")
def _backward_fake(grad_loss_rows, hidden, weight, teacher_logits, tv_weights, kl_weights, bias,
                   lse, soft_lse, q_less, kl, dhidden_unit, dweight_unit, dbias_unit,
                   soft_temperature, chunk_size, output_mask):
    return grad_fakes(hidden, weight, bias, output_mask)


def _setup_context(ctx, inputs, output):
    (hidden, weight, teacher_logits, tv_weights, kl_weights, bias, soft_temperature, chunk_size,
     _grad_mask) = inputs
    _, beta, kl, lse, soft_lse, q_less, dhidden_unit, dweight_unit, dbias_unit = output
    ctx.mark_non_differentiable(beta, kl, lse, soft_lse, q_less, dhidden_unit, dweight_unit,
                                dbias_unit)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, teacher_logits, tv_weights, kl_weights, bias, lse,
                          soft_lse, q_less, kl, dhidden_unit, dweight_unit, dbias_unit)
    ctx.scalars = (soft_temperature, chunk_size)


def _backward(ctx, grad_loss_rows, *_unused):
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1], needs[5]]
    if not any(mask) or grad_loss_rows is None:
        return (None,) * 9
    dh, dw, db = _OPS.weighted_linear_divergence_backward(grad_loss_rows, *ctx.saved_tensors,
                                                          *ctx.scalars, mask)
    return (dh if mask[0] else None, dw if mask[1] else None, None, None, None,
            db if mask[2] else None, None, None, None)


torch.library.register_autograd("vsd_ext::weighted_linear_divergence_forward", _backward,
                                setup_context=_setup_context)
