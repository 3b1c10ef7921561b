"""Tree-mask attention: typed wrapper, fake (meta) kernels and autograd of
``torch.ops.vsd_ext.tree_attention`` (contract: docs/design/OPS.md section 1).

The C++ op checks every argument and value; the wrapper adds only the default scale. The fake
kernels check the metadata themselves: fake and meta tensors (torch.compile tracing, a call
with a meta tensor) never reach the C++ checks."""
from __future__ import annotations

import math

import torch

from .checks import FLOATS, check_device, check_dtype, check_rank, check_tensor, fail, real_scalar

__all__ = ["tree_attention"]


def _check_args(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask, sm_scale) -> None:
    """The fake kernels' checks (`vsd_ext.ops.checks`): shapes, dtypes, devices, strides, a
    finite sm_scale. Value checks (prefix_lens in [0, L]) need the data: the kernels make them."""
    B, N, Hq, D = check_rank(q, "q", 4, "[B, N, Hq, D]")
    check_dtype(q, "q", FLOATS)
    if Hq < 1:
        fail("q", f"expected at least one query head (Hq >= 1), got shape {list(q.shape)}")
    if D < 1:
        fail("q", f"expected a head dim D >= 1, got shape {list(q.shape)}")
    if not math.isfinite(sm_scale):
        fail("sm_scale", f"expected a finite softmax scale, got {sm_scale}")
    Bc, L, Hkv, Dk = check_rank(k_cache, "k_cache", 4, "[Bc, L, Hkv, D]")
    shape = list(k_cache.shape)
    if Bc not in (1, B):
        fail("k_cache", f"expected batch size 1 (shared cache) or B = {B}, got shape {shape}")
    if Dk != D:
        fail("k_cache", f"expected head dim D = {D} (that of 'q'), got shape {shape}")
    if Hkv < 1 or Hq % Hkv != 0:
        fail("k_cache", f"expected a number of kv heads that divides Hq = {Hq}, got shape {shape}")
    check_device(k_cache, "k_cache", q, "q")
    W = (N + 63) // 64
    named = dict(v_cache=(v_cache, (Bc, L, Hkv, D), (q.dtype,)),
                 k_tree=(k_tree, (B, N, Hkv, D), (q.dtype,)),
                 v_tree=(v_tree, (B, N, Hkv, D), (q.dtype,)),
                 tree_mask=(tree_mask, (B, N, W), (torch.int64,)),
                 prefix_lens=(prefix_lens, (B,), (torch.int32, torch.int64)))
    check_dtype(k_cache, "k_cache", (q.dtype,))
    for name, (t, expected, dtypes) in named.items():
        check_tensor(t, name, expected, dtypes, q, "q")
    for name, t in dict(q=q, k_cache=k_cache, v_cache=v_cache, k_tree=k_tree, v_tree=v_tree,
                        tree_mask=tree_mask).items():
        if t.dim() and t.numel() and t.shape[-1] > 1 and t.stride(-1) != 1:
            fail(name, f"expected a contiguous last dimension, got strides {t.stride()}")


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_lens: torch.Tensor,
    k_tree: torch.Tensor,
    v_tree: torch.Tensor,
    tree_mask: torch.Tensor,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of N tree nodes over a KV-cache prefix plus the tree itself.

    Row b, node i attends to cache positions ``[0, prefix_lens[b])`` (all of them, no mask)
    and to the tree nodes j whose bit is set in ``tree_mask[b, i]`` (its ancestors and itself;
    build it with `vsd_ext.tree.build_tree_mask`).

    Args:
        q: ``[B, N, Hq, D]`` float16 / bfloat16 / float32 (float64 also works: fp64 math, for
            gradcheck), queries of the tree nodes.
        k_cache, v_cache: ``[Bc, L, Hkv, D]``, dtype of ``q``; ``Bc`` is 1 (one cache shared by
            all rows) or B. ``Hq % Hkv == 0``: query head h uses kv head ``h // (Hq / Hkv)``.
        prefix_lens: ``[B]`` int32 / int64, values in ``[0, L]``.
        k_tree, v_tree: ``[B, N, Hkv, D]``, dtype of ``q``: keys/values of the tree nodes.
        tree_mask: ``[B, N, ceil(N / 64)]`` int64 bitmask: bit ``j % 64`` of word ``j // 64``
            of row i is set iff node j is visible to node i.
        sm_scale: softmax scale, default ``1 / sqrt(D)``.

    Every tensor's last dimension must be contiguous; other strides are free.

    Returns:
        ``out`` ``[B, N, Hq, D]`` (dtype of ``q``) and ``lse`` ``[B, N, Hq]`` float32 (float64
        for float64 inputs), the
        natural-log softmax denominator of the scaled scores. A node that sees no key gets
        ``out = 0`` and ``lse = -inf``. Differentiable w.r.t. q and the four K/V tensors
        (with ``Bc = 1`` the cache gradients sum over rows).
    """
    if sm_scale is None:  # (a q the op rejects, D = 0 too, gets its error there)
        head_dim = q.shape[-1] if isinstance(q, torch.Tensor) and q.dim() else 1
        sm_scale = 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    return torch.ops.vsd_ext.tree_attention(q, k_cache, v_cache, prefix_lens, k_tree, v_tree,
                                            tree_mask, real_scalar(sm_scale, "sm_scale"))


@torch.library.register_fake("vsd_ext::tree_attention")
def _tree_attention_fake(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask, sm_scale):
    _check_args(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask, sm_scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=_lse_dtype(q), device=q.device)
    return out, lse


@torch.library.register_fake("vsd_ext::tree_attention_backward")
def _tree_attention_backward_fake(grad_out, grad_lse, q, k_cache, v_cache, prefix_lens, k_tree,
                                  v_tree, tree_mask, out, lse, sm_scale):
    _check_args(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask, sm_scale)
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device)
                 for t in (q, k_cache, v_cache, k_tree, v_tree))


def _setup_context(ctx, inputs, output):
    q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask, sm_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask, out, lse)
    ctx.sm_scale = sm_scale


def _backward(ctx, grad_out, grad_lse):
    q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask, out, lse = ctx.saved_tensors
    # Incoming gradients may be expanded (stride 0, e.g. from .sum()); the kernels need a
    # contiguous last dimension.
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    grad_lse = None if grad_lse is None else grad_lse.contiguous()
    dq, dk_cache, dv_cache, dk_tree, dv_tree = torch.ops.vsd_ext.tree_attention_backward(
        grad_out, grad_lse, q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask, out, lse,
        ctx.sm_scale
    )
    return dq, dk_cache, dv_cache, None, dk_tree, dv_tree, None, None


torch.library.register_autograd("vsd_ext::tree_attention", _backward, setup_context=_setup_context)
