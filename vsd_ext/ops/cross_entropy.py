"""vsd_ext.weighted_cross_entropy / weighted_linear_cross_entropy (docs/design/OPS.md section 3).

Per-row weighted cross-entropy with hard or soft (teacher-logit) targets, returning per-row losses
and the log-sum-exp of the drafter's logits. The fused linear variant computes the logits
``hidden @ weight.T + bias`` in row chunks and never materializes the ``[M, V]`` logits,
probabilities or their gradient. Specification: :mod:`vsd_ext.reference.cross_entropy`.

Autograd (register_autograd on the internal forward ops) gives gradients w.r.t. ``logits`` /
``hidden``, ``weight``, ``bias`` for any upstream gradient of ``loss_rows`` *and* ``lse``. The
fused forward computes the gradients of ``sum(loss_rows)`` while the logits chunk is hot; its
backward rescales them when the upstream gradient of ``loss_rows`` is the same on every
contributing row (the usual ``loss_rows.sum() / norm``) and nothing flows into ``lse``, and
otherwise recomputes the logits once.

Chunks (``chunk_size``: logits elements per chunk, rows x vocabulary entries). The default is
1,024 rows (which keeps the per-chunk GEMMs compute-bound), capped at 2^25 logits on CPU
(128 MiB fp32) and 2^27 on CUDA (512 MiB fp32 + 256 MiB fp16/bf16 gradient). A chunk holds at
least one whole row when gradients are computed; without them, rows longer than the chunk
stream through vocabulary tiles with an online log-sum-exp. When only some rows are active, a
chunk's rows (and soft targets) are gathered copies of the same size.

Precomputed gradients (``precompute_grad``). A backward whose upstream gradient is uniform over
the rows that contribute (the usual ``loss_rows.sum() / norm``; per-row scales belong in
``row_weights``) and does not reach ``lse`` then costs no GEMM: 6MHV FLOPs in total.
Otherwise the backward recomputes the logits once (2MHV, plus 2MHV per gradient it still
needs: up to 12MHV in total with precomputation, 8MHV without). Gradient GEMMs skip rows that
cannot have a gradient (ignored targets, zero row weights; 4MHV becomes 4·M_active·HV), at the
cost of one host synchronization per call. Memory: precomputation keeps fp32 ``[V, H]`` and
``[M, H]`` unit gradients from forward to backward, where the scaled gradients are allocated
next to them; without it the backward accumulates straight into the gradients (peak about one
fp32 ``[V, H]`` + ``[M, H]`` + one chunk).

The C++ ops check every argument and value; the wrappers add what only Python sees
(``chunk_size=None``, which gradients to precompute). The fake kernels check the metadata
themselves (the same checks as csrc/weighted_ce_args.h): fake and meta tensors never reach C++.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .checks import (
    FLOATS,
    check_dtype,
    check_linear_head,
    check_positive,
    check_rank,
    check_tensor,
    chunk_arg,
    fail,
    real_scalar,
    requires_grad,
)

_OPS = torch.ops.vsd_ext


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_rows(targets, row_weights, soft_targets, M, V, ref, ref_name, ignore_index,
                soft_temperature):
    check_tensor(targets, "targets", (M,), (torch.int64,), ref, ref_name)
    check_tensor(row_weights, "row_weights", (M,), (torch.float32,), ref, ref_name)
    if soft_targets is not None:
        check_tensor(soft_targets, "soft_targets", (M, V), FLOATS, ref, ref_name)
    if not isinstance(ignore_index, int):
        fail("ignore_index", f"expected an int, got {type(ignore_index).__name__}")
    check_positive(soft_temperature, "soft_temperature")


def _check_logits_args(logits, targets, row_weights, soft_targets, ignore_index,
                       soft_temperature):
    """The fake kernels' checks (`vsd_ext.ops.checks`) of the non-fused op."""
    M, V = check_rank(logits, "logits", 2, "[M, V]")
    check_dtype(logits, "logits", FLOATS)
    if V < 1:
        fail("logits", f"expected at least one class, got shape {list(logits.shape)}")
    _check_rows(targets, row_weights, soft_targets, M, V, logits, "logits", ignore_index,
                soft_temperature)


def _check_linear_args(hidden, weight, targets, row_weights, soft_targets, bias, ignore_index,
                       soft_temperature, chunk_size):
    """The fake kernels' checks (`vsd_ext.ops.checks`) of the fused op."""
    M, _, V = check_linear_head(hidden, weight, bias, chunk_size)
    _check_rows(targets, row_weights, soft_targets, M, V, hidden, "hidden", ignore_index,
                soft_temperature)


# ---- non-fused variant --------------------------------------------------------------------------


def weighted_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    row_weights: Tensor,
    soft_targets: Tensor | None = None,
    ignore_index: int = -100,
    soft_temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-row weighted cross-entropy of given logits (one fused softmax pass per row).

    Args:
        logits: ``[M, V]`` float16 / bfloat16 / float32 / float64 (any row stride). Differentiable.
        targets: ``[M]`` int64 class indices in ``[0, V)``; rows equal to ``ignore_index`` get
            loss 0 and no gradient from ``loss_rows``. With ``soft_targets`` only the ignore test
            is used. An out-of-range target raises a ValueError (on every device).
        row_weights: ``[M]`` float32 per-row (not per-class) weights.
        soft_targets: ``[M, V]`` float16 / bfloat16 / float32 / float64 teacher logits, or None.
            Then ``CE_m = -sum_v softmax(soft_targets[m] / soft_temperature)_v
            log softmax(logits[m])_v``.
        ignore_index: the target value of ignored rows.
        soft_temperature: > 0, divides ``soft_targets``.

    Returns:
        ``loss_rows``: ``[M]`` float32 (float64 for float64 logits), ``row_weights * CE``, 0 on
        ignored rows. ``lse``: ``[M]`` same dtype, ``logsumexp(logits)`` of every row (ignored ones
        too); differentiable (``d lse / d logits = softmax``), e.g. for a z-loss.
    """
    loss, lse, _ = _OPS.weighted_cross_entropy_forward(
        logits, targets, row_weights, soft_targets, ignore_index,
        real_scalar(soft_temperature, "soft_temperature"))
    return loss, lse


@torch.library.register_fake("vsd_ext::weighted_cross_entropy_forward")
def _ce_forward_fake(logits, targets, row_weights, soft_targets, ignore_index, soft_temperature):
    _check_logits_args(logits, targets, row_weights, soft_targets, ignore_index, soft_temperature)
    M, acc = logits.shape[0], _acc(logits.dtype)
    return (logits.new_empty(M, dtype=acc), logits.new_empty(M, dtype=acc),
            logits.new_empty(M if soft_targets is not None else 0, dtype=acc))


@torch.library.register_fake("vsd_ext::weighted_cross_entropy_backward")
def _ce_backward_fake(grad_loss_rows, grad_lse, logits, targets, row_weights, soft_targets, lse,
                      soft_lse, ignore_index, soft_temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _ce_setup_context(ctx, inputs, output):
    logits, targets, row_weights, soft_targets, ignore_index, soft_temperature = inputs
    _, lse, soft_lse = output
    ctx.mark_non_differentiable(soft_lse)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
    ctx.save_for_backward(logits, targets, row_weights, soft_targets, lse, soft_lse)
    ctx.ignore_index, ctx.soft_temperature = ignore_index, soft_temperature


def _ce_backward(ctx, grad_loss_rows, grad_lse, _grad_soft_lse):
    logits, targets, row_weights, soft_targets, lse, soft_lse = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0] and (grad_loss_rows is not None or grad_lse is not None):
        grad_logits = _OPS.weighted_cross_entropy_backward(
            grad_loss_rows, grad_lse, logits, targets, row_weights, soft_targets, lse, soft_lse,
            ctx.ignore_index, ctx.soft_temperature)
    return grad_logits, None, None, None, None, None


torch.library.register_autograd(
    "vsd_ext::weighted_cross_entropy_forward", _ce_backward, setup_context=_ce_setup_context)


# ---- fused linear variant -----------------------------------------------------------------------


def weighted_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    row_weights: Tensor,
    soft_targets: Tensor | None = None,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    soft_temperature: float = 1.0,
    *,
    chunk_size: int | None = None,
    precompute_grad: bool = True,
) -> tuple[Tensor, Tensor]:
    """Weighted cross-entropy of ``hidden @ weight.T + bias`` without materializing the logits.

    Equals ``weighted_cross_entropy(hidden @ weight.T + bias, ...)`` but works on row chunks of at
    most ``chunk_size`` logits (whole rows when gradients are computed), so its extra memory is
    O(chunk_size + V·H + M·H) instead of O(M·V). GEMMs accumulate in fp32 (cuBLAS with fp32 output
    for fp16/bf16 on CUDA; on CPU the operands are cast to fp32), gradients accumulate over chunks
    in fp32, and results are deterministic.

    Args:
        hidden: ``[M, H]`` float16 / bfloat16 / float32 / float64. Differentiable.
        weight: ``[V, H]`` LM head, dtype of ``hidden``. Differentiable.
        targets: ``[M]`` int64 class indices in ``[0, V)`` or ``ignore_index`` (ignored rows: loss
            0, no gradient from ``loss_rows``); with ``soft_targets`` only the ignore test is used.
            An out-of-range target raises a ValueError (on every device, before any gradient).
        row_weights: ``[M]`` float32 per-row weights.
        soft_targets: ``[M, V]`` float16 / bfloat16 / float32 / float64 teacher logits, or None
            (see ``weighted_cross_entropy``).
        bias: ``[V]`` dtype of ``weight``, or None. Differentiable.
        ignore_index: the target value of ignored rows.
        soft_temperature: > 0, divides ``soft_targets``.
        chunk_size: logits elements per chunk (rows x vocabulary entries); None: 1,024 rows,
            capped (module docstring).
        precompute_grad: compute the gradients of ``sum(loss_rows)`` in the forward (only when
            grad mode is on and ``hidden`` / ``weight`` / ``bias`` require grad): a backward
            with a uniform upstream gradient then costs no GEMM (module docstring). Pass False
            when the upstream gradient is known to vary per row or to flow into ``lse``
            (z-loss).

    Returns:
        ``loss_rows``: ``[M]`` float32 (float64 for float64 inputs), ``row_weights * CE``, 0 on
        ignored rows. ``lse``: ``[M]`` same dtype, log-sum-exp of every row's logits;
        differentiable.
    """
    chunk, temperature = chunk_arg(chunk_size), real_scalar(soft_temperature, "soft_temperature")
    track = precompute_grad and torch.is_grad_enabled()
    grad_mask = [track and requires_grad(hidden, "hidden"),
                 track and requires_grad(weight, "weight"), track and requires_grad(bias, "bias")]
    loss, lse, *_ = _OPS.weighted_linear_cross_entropy_forward(
        hidden, weight, targets, row_weights, soft_targets, bias, ignore_index, temperature, chunk,
        grad_mask)
    return loss, lse


@torch.library.register_fake("vsd_ext::weighted_linear_cross_entropy_forward")
def _lce_forward_fake(hidden, weight, targets, row_weights, soft_targets, bias, ignore_index,
                      soft_temperature, chunk_size, grad_mask):
    _check_linear_args(hidden, weight, targets, row_weights, soft_targets, bias, ignore_index,
                       soft_temperature, chunk_size)
    M, acc = hidden.shape[0], _acc(hidden.dtype)
    return (hidden.new_empty(M, dtype=acc), hidden.new_empty(M, dtype=acc),
            hidden.new_empty(M if soft_targets is not None else 0, dtype=acc),
            *unit_grad_fakes(hidden, weight, grad_mask))


def unit_grad_fakes(hidden, weight, grad_mask):
    """The fused forwards' unit gradients (acc dtype) for grad_mask = (hidden, weight, bias), [0]
    where not asked (shared with vsd_ext.ops.divergence)."""
    (M, H), V, acc = hidden.shape, weight.shape[0], _acc(hidden.dtype)
    return (hidden.new_empty((M, H) if grad_mask[0] else (0,), dtype=acc),
            hidden.new_empty((V, H) if grad_mask[1] else (0,), dtype=acc),
            hidden.new_empty((V,) if grad_mask[2] else (0,), dtype=acc))


def grad_fakes(hidden, weight, bias, output_mask):
    """The fused backwards' gradients, in the dtypes of their inputs, [0] where not asked."""
    acc = _acc(hidden.dtype)
    return (hidden.new_empty(hidden.shape) if output_mask[0] else hidden.new_empty(0, dtype=acc),
            weight.new_empty(weight.shape) if output_mask[1] else hidden.new_empty(0, dtype=acc),
            bias.new_empty(bias.shape) if output_mask[2] else hidden.new_empty(0, dtype=acc))


@torch.library.register_fake("vsd_ext::weighted_linear_cross_entropy_backward")
def _lce_backward_fake(grad_loss_rows, grad_lse, hidden, weight, targets, row_weights, soft_targets,
                       bias, lse, soft_lse, dhidden_unit, dweight_unit, dbias_unit, ignore_index,
                       soft_temperature, chunk_size, output_mask):
    return grad_fakes(hidden, weight, bias, output_mask)


def _lce_setup_context(ctx, inputs, output):
    (hidden, weight, targets, row_weights, soft_targets, bias, ignore_index, soft_temperature,
     chunk_size, _grad_mask) = inputs
    _, lse, soft_lse, dhidden_unit, dweight_unit, dbias_unit = output
    ctx.mark_non_differentiable(soft_lse, dhidden_unit, dweight_unit, dbias_unit)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, targets, row_weights, soft_targets, bias, lse, soft_lse,
                          dhidden_unit, dweight_unit, dbias_unit)
    ctx.scalars = (ignore_index, soft_temperature, chunk_size)


def _lce_backward(ctx, grad_loss_rows, grad_lse, *_unused):
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1], needs[5]]
    none = (None,) * 10
    if not any(mask) or (grad_loss_rows is None and grad_lse is None):
        return none
    saved = ctx.saved_tensors
    dh, dw, db = _OPS.weighted_linear_cross_entropy_backward(grad_loss_rows, grad_lse, *saved,
                                                             *ctx.scalars, mask)
    return (dh if mask[0] else None, dw if mask[1] else None, None, None, None,
            db if mask[2] else None, None, None, None, None)


torch.library.register_autograd("vsd_ext::weighted_linear_cross_entropy_forward", _lce_backward,
                                setup_context=_lce_setup_context)
