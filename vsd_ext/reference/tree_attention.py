"""Reference tree-mask attention: a dense boolean mask over [prefix | tree] keys and plain
softmax attention, in float64 by default. Slow and obviously correct: the tests' oracle.

Contract: docs/design/OPS.md section 1 (same arguments as `vsd_ext.tree_attention`).
"""
from __future__ import annotations

import math

import torch

from ..tree import unpack_tree_mask


def dense_visibility(prefix_lens: torch.Tensor, tree_mask: torch.Tensor, cache_len: int,
                     n: int) -> torch.Tensor:
    """``[B, N, L + N]`` bool: row b, node i sees cache position p iff ``p < prefix_lens[b]``
    and tree node j iff bit j of ``tree_mask[b, i]`` is set."""
    B = tree_mask.shape[0]
    pos = torch.arange(cache_len, device=tree_mask.device)
    seen = pos < prefix_lens.to(tree_mask.device).view(B, 1)
    prefix = seen.view(B, 1, cache_len).expand(B, n, cache_len)
    return torch.cat([prefix, unpack_tree_mask(tree_mask, n)], dim=-1)


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_lens: torch.Tensor,
    k_tree: torch.Tensor,
    v_tree: torch.Tensor,
    tree_mask: torch.Tensor,
    sm_scale: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [B, N, Hq, D], lse [B, N, Hq])``, both in ``compute_dtype``.

    Differentiable (autograd) w.r.t. q and the four K/V tensors. A node that sees no key
    gets ``out = 0`` and ``lse = -inf`` with zero gradients (no NaN anywhere). A key that no
    node of its row sees (a padding node, a cache position past ``prefix_lens``) contributes
    exactly nothing, even when its k / v hold NaN or inf: it is replaced by zeros first.
    """
    B, N, Hq, D = q.shape
    Bc, L, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale

    def heads(x: torch.Tensor) -> torch.Tensor:  # [*, T, Hkv, D] -> [B, Hq, T, D]
        x = x.to(compute_dtype).expand(B, -1, -1, -1)
        return x.repeat_interleave(group, dim=2).transpose(1, 2)

    visible = dense_visibility(prefix_lens, tree_mask, L, N).unsqueeze(1)  # [B, 1, N, L + N]
    unseen = ~visible.any(2).view(B, 1, L + N, 1)  # keys no node of the row sees
    keys = torch.cat([heads(k_cache), heads(k_tree)], dim=2).masked_fill(unseen, 0)
    values = torch.cat([heads(v_cache), heads(v_tree)], dim=2).masked_fill(unseen, 0)
    scores = (q.to(compute_dtype).transpose(1, 2) @ keys.transpose(-1, -2)) * scale
    any_key = visible.any(-1, keepdim=True)
    # Rows that see nothing use zeros instead of -inf so logsumexp and its gradient stay finite.
    safe = scores.masked_fill(~visible, float("-inf")).masked_fill(~any_key, 0.0)
    lse = torch.logsumexp(safe, dim=-1, keepdim=True)
    probs = torch.exp(safe - lse).masked_fill(~visible, 0.0)
    out = (probs @ values).transpose(1, 2)  # [B, N, Hq, D]
    lse = lse.masked_fill(~any_key, float("-inf")).squeeze(-1).transpose(1, 2)  # [B, N, Hq]
    return out, lse
