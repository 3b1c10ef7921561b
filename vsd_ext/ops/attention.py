"""Tree-mask attention: typed wrapper, fake (meta) kernels and autograd of
``torch.ops.vsd_ext.tree_attention`` (contract: shared/design/OPS.md section 1)."""
from __future__ import annotations

import math

import torch

__all__ = ["tree_attention"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(arg: str, msg: str) -> None:
    raise ValueError(f"vsd_ext.tree_attention: argument '{arg}': {msg}")


def _check_args(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask) -> None:
    """Metadata checks (shapes, dtypes, devices, strides): no data access, so they also run in
    the fake kernel under torch.compile. Value checks (prefix_lens in [0, L]) are the kernels'."""
    named = dict(q=q, k_cache=k_cache, v_cache=v_cache, prefix_lens=prefix_lens, k_tree=k_tree,
                 v_tree=v_tree, tree_mask=tree_mask)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            _fail(name, f"expected a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        _fail("q", f"expected a 4-D tensor [B, N, Hq, D], got shape {tuple(q.shape)}")
    if q.dtype not in _FLOATS:
        _fail("q", f"expected dtype float16, bfloat16, float32 or float64, got {q.dtype}")
    B, N, Hq, D = q.shape
    if k_cache.dim() != 4:
        _fail("k_cache", f"expected a 4-D tensor [Bc, L, Hkv, D], got shape {tuple(k_cache.shape)}")
    Bc, L, Hkv, Dk = k_cache.shape
    if Bc not in (1, B):
        _fail("k_cache", f"expected batch size 1 (shared cache) or B = {B}, got shape {tuple(k_cache.shape)}")
    if Dk != D:
        _fail("k_cache", f"expected head dim D = {D} (that of 'q'), got shape {tuple(k_cache.shape)}")
    if Hkv < 1 or Hq % Hkv != 0:
        _fail("k_cache", f"expected a number of kv heads that divides Hq = {Hq}, got shape {tuple(k_cache.shape)}")
    W = (N + 63) // 64
    expected = dict(v_cache=(Bc, L, Hkv, D), k_tree=(B, N, Hkv, D), v_tree=(B, N, Hkv, D),
                    tree_mask=(B, N, W), prefix_lens=(B,))
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            _fail(name, f"expected shape {list(shape)}, got {list(named[name].shape)}")
    if tree_mask.dtype != torch.int64:
        _fail("tree_mask", f"expected dtype torch.int64, got {tree_mask.dtype}")
    if prefix_lens.dtype not in (torch.int32, torch.int64):
        _fail("prefix_lens", f"expected dtype torch.int32 or torch.int64, got {prefix_lens.dtype}")
    for name in ("k_cache", "v_cache", "k_tree", "v_tree"):
        if named[name].dtype != q.dtype:
            _fail(name, f"expected the dtype of 'q' ({q.dtype}), got {named[name].dtype}")
    for name, t in named.items():
        if t.device != q.device:
            _fail(name, f"expected device {q.device} (that of 'q'), got {t.device}")
    for name in ("q", "k_cache", "v_cache", "k_tree", "v_tree", "tree_mask"):
        t = named[name]
        if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
            _fail(name, f"expected a contiguous last dimension, got strides {t.stride()}")


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
    _check_args(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return torch.ops.vsd_ext.tree_attention(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask, scale)


@torch.library.register_fake("vsd_ext::tree_attention")
def _tree_attention_fake(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask, sm_scale):
    _check_args(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=_lse_dtype(q), device=q.device)
    return out, lse


@torch.library.register_fake("vsd_ext::tree_attention_backward")
def _tree_attention_backward_fake(grad_out, grad_lse, q, k_cache, v_cache, prefix_lens, k_tree, v_tree,
                                  tree_mask, out, lse, sm_scale):
    _check_args(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask)
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k_cache, v_cache, k_tree, v_tree))


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
        grad_out, grad_lse, q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask, out, lse, ctx.sm_scale
    )
    return dq, dk_cache, dv_cache, None, dk_tree, dv_tree, None, None


torch.library.register_autograd("vsd_ext::tree_attention", _backward, setup_context=_setup_context)
