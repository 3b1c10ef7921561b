"""The target model: one compact implementation of the Llama family, with cache steps.

`Target` runs any checkpoint `vsd_ext.models.config` accepts (Llama 2/3, Mistral, Qwen2,
Qwen3). Its state_dict keys are the Hugging Face ones (`model.layers.0.self_attn.q_proj
.weight`, ..., `lm_head.weight` unless the embeddings are tied), so checkpoints load as is.

Entry points (B rows, T new tokens, N tree nodes, V vocab, F = len(feature_layers)·H):

| call                                   | attention                       | cache effect        |
|----------------------------------------|---------------------------------|---------------------|
| `target(input_ids)` → logits `[B,T,V]` | causal SDPA, no cache           | none                |
| `run(input_ids)` → `TargetOutput`      | same, with features             | none                |
| `prefill(input_ids, cache, lengths)`   | SDPA when the cache is empty,   | appends `lengths[b]`|
|                                        | else a chain via tree_attention | tokens per row      |
| `decode(tokens, cache)`                | tree_attention (N = 1)          | appends 1 per row   |
| `tree_verify(tokens, parents, cache)`  | tree_attention: cache + the     | writes the nodes to |
|                                        | node's ancestors and itself     | scratch (no commit) |
| `commit(cache, accepted_nodes)`        | —                               | KV compaction       |

Positions: token t of a chunk appended to row b sits at `cache.lengths[b] + t`; tree node
i at `prefix_lens[b] + depth(i)` (the root, depth 0, is the last emitted token, whose
keys/values are not cached yet). Every step returns `TargetOutput(logits, features)`:
`features` concatenates the inputs of the `feature_layers` (default: layers 2, L/2, L−3,
made distinct for small L), the low/mid/high hidden states an EAGLE-3 drafter fuses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..tree import build_tree_mask, chain_mask, tree_depths
from .config import ModelConfig
from .kv_cache import KVCache
from .layers import AttentionContext, DecoderLayer, RMSNorm, rope_cos_sin, rope_tables


@dataclass
class TargetOutput:
    """logits `[B, T, V]` (model dtype) and features `[B, T, F]` (the fused hidden states)."""

    logits: torch.Tensor
    features: torch.Tensor


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low/mid/high choice, the inputs of layers (2, L // 2, L − 3), made distinct
    for every L ≥ 3 (vLLM and speculators need three distinct layers): low = min(2, L − 3),
    high = max(L − 3, low + 2), mid = L // 2 clamped to [low + 1, high − 1].
    L = 32 → (2, 16, 29); 16 → (2, 8, 13); 8 → (2, 4, 5); 6 → (2, 3, 4); 4 → (1, 2, 3);
    3 → (0, 1, 2). L < 3 has fewer than three layers: (0, 0, 0) and (0, 1, 1)."""
    if num_layers < 3:
        return 0, num_layers - 1, num_layers - 1
    low = min(2, num_layers - 3)
    high = max(num_layers - 3, low + 2)
    return low, min(max(num_layers // 2, low + 1), high - 1), high


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (the `model.` prefix of HF checkpoints)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Target(nn.Module):
    """A Llama-family causal LM (module docstring).

    Attributes: `config` (the checkpoint's config.json as a dict), `model_config`
    (`ModelConfig`), `tokenizer` (a `tokenizers.Tokenizer` or None), `feature_layers`.
    """

    def __init__(self, cfg: ModelConfig, config: dict | None = None, tokenizer=None,
                 tie_word_embeddings: bool = False, feature_layers=None):
        super().__init__()
        self.model_config = cfg
        self.config = dict(config or {})
        self.tokenizer = tokenizer
        self.model = LlamaModel(cfg)
        self.tie_word_embeddings = tie_word_embeddings
        self.lm_head = None if tie_word_embeddings else nn.Linear(cfg.hidden_size,
                                                                  cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", cfg.inv_freq(), persistent=False)
        layers = tuple(feature_layers or default_feature_layers(cfg.num_hidden_layers))
        if not all(0 <= i < cfg.num_hidden_layers for i in layers):
            raise ValueError(f"feature_layers {layers} must lie in [0, "
                             f"{cfg.num_hidden_layers})")
        self.feature_layers = layers

    # ---- properties -----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.model_config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.model_config.num_hidden_layers

    @property
    def max_positions(self) -> int | None:
        """Longest sequence the target takes: `max_position_embeddings` of its config (and
        the sliding window, see `ModelConfig.max_length`); None when the config names
        neither."""
        limits = [n for n in (self.model_config.max_position_embeddings,
                              self.model_config.max_length) if n is not None]
        return min(limits) if limits else None

    @property
    def feature_size(self) -> int:
        """Width of `TargetOutput.features`: len(feature_layers) · hidden_size."""
        return len(self.feature_layers) * self.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def output_weight(self) -> torch.Tensor:
        """The LM head `[V, H]` (the embedding when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # ---- core -----------------------------------------------------------------------
    def _check_ids(self, input_ids: torch.Tensor, name: str = "input_ids") -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.int64:
            raise ValueError(f"{name} must be an int64 tensor, got "
                             f"{getattr(input_ids, 'dtype', type(input_ids))}")
        if input_ids.dim() != 2:
            raise ValueError(f"{name} must be [B, T], got shape {tuple(input_ids.shape)}")

    def _check_length(self, end: int) -> None:
        """Positions must stay below `max_positions` (RoPE past the trained range gives
        fluent-looking but wrong outputs, so it is an error, not a warning)."""
        if self.max_positions is not None and end > self.max_positions:
            window = self.model_config.max_length
            what = (f"sliding window ({window}; longer sequences are not supported)"
                    if window == self.max_positions else
                    f"max_position_embeddings ({self.max_positions})")
            raise ValueError(f"input_ids: a sequence of {end} tokens passes the target's "
                             f"{what}")

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor,
             ctx_args: dict) -> TargetOutput:
        """Embed (−1 is padding: embedded as 0, outputs ignored), run every layer, collect
        the feature-layer inputs, project to logits."""
        if input_ids.numel():
            low, high = (int(v) for v in torch.aminmax(input_ids))
            if high >= self.vocab_size or low < -1:
                bad = high if high >= self.vocab_size else low
                raise ValueError(f"input_ids: token id {bad} is outside the vocabulary "
                                 f"[0, {self.vocab_size}) (−1 marks padding)")
        x = self.model.embed_tokens(input_ids.clamp(min=0))
        rope = rope_tables(*rope_cos_sin(self.inv_freq, positions, x.dtype))
        ctx = AttentionContext(rope=rope, **ctx_args)
        wanted = set(self.feature_layers)
        captured = {}
        for i, layer in enumerate(self.model.layers):
            if i in wanted:
                captured[i] = x
            x = layer(x, ctx, i)
        ctx.flush()
        logits = F.linear(self.model.norm(x), self.output_weight)
        return TargetOutput(logits, torch.cat([captured[i] for i in self.feature_layers], -1))

    def run(self, input_ids: torch.Tensor) -> TargetOutput:
        """Full causal forward without a cache: logits and features of every position."""
        self._check_ids(input_ids)
        self._check_length(input_ids.shape[1])
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return self._run(input_ids, positions, {"mode": "causal"})

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids `[B, T]` int64 → logits `[B, T, V]` (full causal forward, no cache)."""
        return self.run(input_ids).logits

    # ---- cache steps ----------------------------------------------------------------
    def new_cache(self, batch_size: int, capacity: int, dtype=None, device=None) -> KVCache:
        """An empty `KVCache` for this model (`capacity` positions per row)."""
        cfg = self.model_config
        return KVCache(cfg.num_hidden_layers, batch_size, capacity, cfg.num_key_value_heads,
                       cfg.head_dim, dtype or self.dtype, device or self.device,
                       max_length=cfg.max_length)

    def prefill(self, input_ids: torch.Tensor, cache: KVCache,
                lengths: torch.Tensor | None = None) -> TargetOutput:
        """Append a right-padded chunk `[B, T]` (row b holds `lengths[b]` real tokens,
        default T) to every row of the cache; returns outputs for all T positions (those
        past `lengths[b]` are padding, to be ignored)."""
        self._check_ids(input_ids)
        B, T = input_ids.shape
        if B != cache.batch_size:
            raise ValueError(f"input_ids has {B} rows but the cache has {cache.batch_size}")
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.int64, device=input_ids.device)
        lengths = lengths.to(device=cache.device, dtype=torch.int64)
        if lengths.shape != (B,) or bool((lengths < 0).any() | (lengths > T).any()):
            raise ValueError(f"lengths must be [B] = [{B}] with values in [0, {T}], got "
                             f"{lengths.tolist()}")
        cache.reserve(T)
        self._check_length(int((cache.lengths + lengths).max()))
        positions = cache.lengths[:, None] + torch.arange(T, device=cache.device)
        if bool((cache.lengths == 0).all()):
            out = self._run(input_ids, positions, {"mode": "causal", "cache": cache,
                                                   "write_positions": positions})
        else:
            out = self._run(input_ids, positions, self._chain_args(cache, T, positions))
        cache.advance(lengths)
        return out

    def decode(self, input_ids: torch.Tensor, cache: KVCache) -> TargetOutput:
        """One token per row (`[B]` or `[B, 1]`): logits `[B, 1, V]`; appended to the cache."""
        return self.prefill(input_ids.reshape(-1, 1), cache)

    def _chain_args(self, cache: KVCache, T: int, positions: torch.Tensor) -> dict:
        mask = chain_mask(T, device=cache.device).expand(cache.batch_size, -1, -1)
        return {"mode": "tree", "cache": cache, "write_positions": positions,
                "prefix_lens": cache.lengths.clone(), "tree_mask": mask}

    def tree_verify(self, input_ids: torch.Tensor, parents: torch.Tensor, cache: KVCache,
                    prefix_lens: torch.Tensor | None = None,
                    tree_mask: torch.Tensor | None = None,
                    depths: torch.Tensor | None = None) -> TargetOutput:
        """Score a token tree per row in one pass.

        input_ids `[B, N]` int64: node tokens, node 0 the root (the last emitted token, not
        yet cached), -1 for padding nodes. parents `[B, N]` int64: parent index, -1 for the
        root (topological order). Node i attends to the row's cached prefix and to its
        ancestors and itself, at position `prefix + depth(i)`.

        - Default (`prefix_lens=None`): the prefix is `cache.lengths`; the nodes' keys and
          values are written to the scratch positions `lengths[b] + i` so that `commit`
          can keep the accepted path. Needs `lengths + N <= capacity`.
        - `prefix_lens` `[B]` given: row b sees cache positions `[0, prefix_lens[b])` and
          nothing is written; the cache may then hold one row shared by all B rows (e.g.
          many anchor positions of one training sequence).

        `tree_mask` `[B, N, W]` and `depths` `[B, N]`: the tree's mask and depths when the
        caller built the tree itself and knows them (`DraftTree`), used unchecked; by default
        they are built from `parents` (and `input_ids >= 0`), which checks the tree.
        """
        self._check_ids(input_ids)
        self._check_ids(parents, "parents")
        B, N = input_ids.shape
        if parents.shape != (B, N):
            raise ValueError(f"parents must be [{B}, {N}] like input_ids, got "
                             f"{tuple(parents.shape)}")
        if tree_mask is None or depths is None:
            valid = input_ids >= 0
            tree_mask, depths = build_tree_mask(parents, valid), tree_depths(parents, valid)
        mask = tree_mask
        if prefix_lens is None:
            if B != cache.batch_size:
                raise ValueError(f"input_ids has {B} rows but the cache has "
                                 f"{cache.batch_size}")
            cache.reserve(N)
            prefix = cache.lengths
            write = prefix[:, None] + torch.arange(N, device=cache.device)
        else:
            if cache.batch_size not in (1, B):
                raise ValueError(f"with prefix_lens the cache must have 1 or {B} rows, got "
                                 f"{cache.batch_size}")
            prefix = prefix_lens.to(device=cache.device, dtype=torch.int64)
            cache.reserve(0, prefix)
            write = None
        positions = prefix[:, None] + depths.to(prefix.device)
        return self._run(input_ids, positions, {
            "mode": "tree", "cache": cache, "write_positions": write,
            "prefix_lens": prefix.clone(), "tree_mask": mask})

    @staticmethod
    def commit(cache: KVCache, accepted_nodes: torch.Tensor) -> torch.Tensor:
        """Keep the accepted path of the last `tree_verify` (see `KVCache.commit`)."""
        return cache.commit(accepted_nodes)
