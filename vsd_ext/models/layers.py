"""Building blocks shared by the target and the drafter: RMSNorm, RoPE, attention, SwiGLU.

Parameter names follow Hugging Face (`q_proj`, `input_layernorm`, ...) so that a module's
`state_dict` keys are exactly the checkpoint's keys.

Attention runs in one of two modes, chosen by an `AttentionContext`:

- `causal`: full causal self-attention over the T new tokens with
  `F.scaled_dot_product_attention(is_causal=True)` (plain forward, prefill into an empty
  cache; right-padded rows are exact for every real token because a real token only sees
  earlier positions, which are real too).
- `tree`: the N new tokens (a tree, or a chain for decode/extend) attend to the first
  `prefix_lens[b]` cached positions plus the tree nodes their bitmask allows, through
  `vsd_ext.tree_attention`; RoPE positions are supplied by the caller (prefix + depth).

In both modes the new keys/values can be written into a `KVCache` at given positions, and
collected for the caller (the drafter's next tree level, training's step-0 cache).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import tree_attention
from ..tree import persistent
from .config import ModelConfig

_ONEDNN_BF16: bool | None = None


def _onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 GEMMs on this CPU (checked once)."""
    global _ONEDNN_BF16
    if _ONEDNN_BF16 is None:
        _ONEDNN_BF16 = bool(torch.backends.mkldnn.is_available()
                            and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return _ONEDNN_BF16


def module_cache(owner: nn.Module, name: str, sources: tuple, build):
    """`build(*sources)`, cached in `owner.__dict__[name]` (out of its state_dict) and rebuilt
    when a source tensor changes: keyed by storage address and version counter (new storage
    or an in-place update). The entry keeps its sources alive, so that no new tensor can
    reuse their addresses."""
    key = tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in sources)
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        detached = tuple(t.detach() for t in sources)
        cached = (key, persistent(lambda: build(*detached)), detached)
        owner.__dict__[name] = cached
    return cached[1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           owner: nn.Module, name: str) -> torch.Tensor:
    """`F.linear`, except for bf16 inference on a CPU: a plain bf16 `F.linear` there goes
    through oneDNN, which re-packs the weight into its blocked layout at every call, and for
    decode-sized inputs (a few rows) that costs more than the product
    (docs/results/decoding_overheads_2026-11-29.md). The packed weight is cached on
    `owner` (see `module_cache`); the result is the same oneDNN product, bitwise. Training
    (grad enabled) and other dtypes take `F.linear`."""
    if (x.dtype is torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and weight.dtype is torch.bfloat16 and _onednn_bf16()):
        packed = module_cache(owner, name + "_packed", (weight,),
                              torch.ops.mkldnn._reorder_linear_weight)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` with `linear`'s packed bf16 inference path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self, "_weight")


def fused_linear(x: torch.Tensor, layers: tuple[Linear, ...]) -> torch.Tensor:
    """The outputs of several `Linear`s that read the same `x`, concatenated along the last
    dimension, from one GEMM over their concatenated weights (cached on the first layer, see
    `module_cache`). At decode sizes a GEMM call costs mostly a fixed overhead once the
    target's forward has evicted the weights from the caches, so fewer calls are faster
    (docs/results/decoding_overheads_2026-11-29.md).
    The rounding may differ from separate GEMMs: for inference of the drafter only (its
    precision never affects losslessness)."""
    head = layers[0]
    weight = module_cache(head, "_fused_weight", tuple(m.weight for m in layers),
                          lambda *w: torch.cat(w))
    bias = None if head.bias is None else module_cache(
        head, "_fused_bias", tuple(m.bias for m in layers), lambda *b: torch.cat(b))
    return linear(x, weight, bias, head, "_fused")


class RMSNorm(nn.Module):
    """`w · x / sqrt(mean(x²) + eps)`, computed in fp32 and cast back (as `transformers`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One F.rms_norm call instead of eight small ops (decoding runs thousands of norms
        # on tiny rows, where per-op overhead dominates). ATen evaluates the same ops,
        # x · rsqrt(mean(x²) + eps) then · w: bitwise equal in fp32. For half inputs it
        # would apply w before the cast back, so w is applied here, after the cast.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin `[B, T, D]` of the angles `position · inv_freq` (fp32, then cast), each
    frequency repeated for both halves of the head (the rotate-half convention)."""
    angles = positions[..., None].float() * inv_freq.float()
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[B, T, D]` → `[B, T, 1, D]` tables for `rotate`, the sign of rotate_half
    moved into sin: `rotate_half(x)·sin = roll(x, D/2)·(−sin_1, sin_2)` exactly. Built
    once for q and k: decoding rotates tiny tensors, where every op costs."""
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), -1)
    return cos[:, :, None], signed[:, :, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE of `x` `[B, T, H, D]` with tables from `rope_tables`: pairs (x_i, x_{i+D/2})
    turn by their angle, `x·cos + rotate_half(x)·sin` with `rotate_half(x) = (−x_2, x_1)`."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class Attention(nn.Module):
    """Grouped-query attention with optional qkv/o bias and per-head q/k RMSNorm (Qwen3).

    `in_features` is the width the q/k/v projections read (2·hidden in the EAGLE-3 drafter,
    whose layer input is norm(embedding) ⊕ norm(feature)). `fuse`: at inference (grad
    disabled), one GEMM for q, k and v (`fused_linear`); the drafter's, not the target's.
    """

    def __init__(self, cfg: ModelConfig, in_features: int | None = None, fuse: bool = False):
        super().__init__()
        d_in = in_features or cfg.hidden_size
        self.fuse = fuse
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = Linear(d_in, self.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(d_in, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(d_in, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, cfg.hidden_size,
                             bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def qkv(self, x: torch.Tensor, tables: tuple):
        """q `[B, T, Hq, D]`, k and v `[B, T, Hkv, D]`, RoPE applied to q and k by `tables`
        (the `[B, T, 1, D]` pair of `rope_tables`)."""
        B, T, _ = x.shape
        Hq, Hkv = self.num_heads, self.num_kv_heads
        if self.fuse and self.q_norm is None and not torch.is_grad_enabled():
            # One GEMM for q | k | v, one rotation for q | k (elementwise per head: exact).
            heads = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj))
            heads = heads.view(B, T, Hq + 2 * Hkv, self.head_dim)
            qk = rotate(heads[:, :, :Hq + Hkv], *tables)
            return qk[:, :, :Hq], qk[:, :, Hq:], heads[:, :, Hq + Hkv:]
        q = self.q_proj(x).view(B, T, Hq, self.head_dim)
        k = self.k_proj(x).view(B, T, Hkv, self.head_dim)
        v = self.v_proj(x).view(B, T, Hkv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return rotate(q, *tables), rotate(k, *tables), v

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """`[B, T, Hq, D]` attention output → `[B, T, hidden]`."""
        return self.o_proj(attn.reshape(*attn.shape[:2], -1))


class MLP(nn.Module):
    """SwiGLU: `down(silu(gate(x)) · up(x))`. `fuse`: one GEMM for gate and up at inference
    (as `Attention`'s)."""

    def __init__(self, cfg: ModelConfig, fuse: bool = False):
        super().__init__()
        self.fuse = fuse
        hidden, inner = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(hidden, inner, bias=cfg.mlp_bias)
        self.up_proj = Linear(hidden, inner, bias=cfg.mlp_bias)
        self.down_proj = Linear(inner, hidden, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse and not torch.is_grad_enabled():
            gate, up = fused_linear(x, (self.gate_proj, self.up_proj)).chunk(2, -1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


@dataclass
class AttentionContext:
    """How the attention layers of one forward pass see their keys (module docstring).

    - `rope`: the `(cos, signed sin)` tables `[B, T, 1, D]` of the new tokens (`rope_tables`),
      built once for all layers.
    - `cache`: a `KVCache` (or None); `write_positions` `[B, T]`: where each new token's
      k/v go in it (None: nothing is written). The writes wait in `written` until `flush`,
      which the model calls at the end of its forward: one copy for all layers (no layer
      reads positions written in the same forward: they lie past every row's prefix).
    - tree mode: `prefix_lens` `[B]` cached positions every new token sees, `tree_mask`
      `[B, N, W]` int64 bitmask over the new tokens (and `past` nodes first, see below). The
      cache holds one row shared by all B rows, one row per row, or G rows each shared by a
      group of B / G consecutive rows (training: many tree rows per sequence).
    - `past`: per layer `(k, v)` `[B, P, Hkv, D]` of P earlier tree nodes that are not in
      the cache (the drafter grows its tree level by level without recomputing them); the
      mask then covers P + T nodes, the earlier ones first.
    - `keep_kv`: collect every layer's keys/values in `kv` (past and new together): the
      next tree level's `past`, or training's step-0 cache.
    """

    rope: tuple | None = None
    mode: str = "causal"
    cache: object = None
    write_positions: torch.Tensor | None = None
    prefix_lens: torch.Tensor | None = None
    tree_mask: torch.Tensor | None = None
    past: list | None = None
    keep_kv: bool = False
    kv: list = field(default_factory=list)
    written: list = field(default_factory=list)

    def attend(self, layer: int, attn: Attention, x: torch.Tensor) -> torch.Tensor:
        q, k, v = attn.qkv(x, self.rope)
        if self.mode == "causal":
            if self.keep_kv:
                self.kv.append((k, v))
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                is_causal=True, enable_gqa=attn.num_heads != attn.num_kv_heads,
            ).transpose(1, 2)
        else:
            out = self._tree(layer, q, k, v)
        if self.write_positions is not None:
            self.written.append((k, v))
        return attn.output(out)

    def flush(self) -> None:
        """Write the keys/values collected by `attend` to the cache (see `write_positions`)."""
        if self.written:
            ks, vs = zip(*self.written)
            self.cache.write_layers(list(ks), list(vs), self.write_positions)
            self.written = []

    def _tree(self, layer: int, q, k, v) -> torch.Tensor:
        P = 0
        if self.past is not None:
            past_k, past_v = self.past[layer]
            P = past_k.shape[1]
            k, v = torch.cat((past_k, k), 1), torch.cat((past_v, v), 1)
            # The op takes as many queries as tree nodes: the earlier nodes get zero
            # queries whose outputs are dropped (their keys/values are what matters).
            q = torch.cat((q.new_zeros(q.shape[0], P, *q.shape[2:]), q), 1)
        if self.keep_kv:
            self.kv.append((k, v))
        if self.cache is not None:
            k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        else:  # no context at all: an empty cache of length 0
            k_cache = v_cache = k.new_zeros(1, 0, *k.shape[2:])
        out = grouped_tree_attention(q, k_cache, v_cache, self.prefix_lens, k, v,
                                     self.tree_mask)
        return out[:, P:] if P else out


def grouped_tree_attention(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask):
    """`vsd_ext.tree_attention`'s output where the cache has 1 row (shared), B rows, or G
    rows each read by a group of B / G consecutive rows: one op call per group then, its
    rows split (not sliced), so that the backward is one concatenation."""
    B, G = q.shape[0], k_cache.shape[0]
    if G in (1, B):
        return tree_attention(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask)[0]
    if B % G:
        raise ValueError(f"a cache of {G} rows cannot be shared by {B} rows in equal groups")
    R = B // G
    groups = zip(q.split(R), k_cache.split(1), v_cache.split(1), prefix_lens.split(R),
                 k_tree.split(R), v_tree.split(R), tree_mask.split(R))
    return torch.cat([tree_attention(*args)[0] for args in groups])


class DecoderLayer(nn.Module):
    """Pre-norm Llama block: `x += attn(norm(x)); x += mlp(norm(x))`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, index: int) -> torch.Tensor:
        x = x + ctx.attend(index, self.self_attn, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))
