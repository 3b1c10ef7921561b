"""The EAGLE-3 style drafter: fused target features → one decoder layer → draft LM head.

Data flow for a token t at position p (H = hidden size, Ht = the target's, Vd = draft vocab):

    g   = fc(f)                f: [3·Ht] target features (inputs of a low, mid, high layer)
                               or, deeper in a draft, the drafter's own previous h: [H]
    x   = RMSNorm_in(embed(t)) ⊕ RMSNorm_hidden(g)            [2H] (embedding: the target's)
    h   = g + attn(x)          q/k/v read 2H, RoPE at position p, attention to the drafter's
                               KV cache and (in a tree step) to the node's tree ancestors
    h   = h + mlp(RMSNorm_post(h))                            → returned (pre-norm) as the
                                                                next step's input feature
    z   = lm_head(RMSNorm(h))  [Vd]; draft id d ↔ target id d + d2t[d]

Checkpoint layout (what SGLang / vLLM EAGLE-3 load): `config.json` is a Llama config with
`num_hidden_layers = 1`, `architectures = ["LlamaForCausalLMEagle3"]`, `draft_vocab_size`
(and `target_hidden_size` when it differs from `hidden_size`), and
`eagle_aux_hidden_state_layer_ids`: the target layers whose inputs the drafter fuses (the
name vLLM and speculators read; `Target.feature_layers`); `model.safetensors` holds
exactly `fc.weight`, `midlayer.{hidden_norm, input_layernorm, post_attention_layernorm}
.weight`, `midlayer.self_attn.{q,k,v,o}_proj.weight`, `midlayer.mlp.{gate,up,down}_proj
.weight`, `norm.weight`, `lm_head.weight`, `d2t` (int64 `[Vd]`, target id = draft id +
d2t[draft id]) and `t2d` (bool `[V]`, True for target ids in the draft vocabulary), plus,
with `save_pretrained(..., include_embedding=True)`, `embed_tokens.weight`: a copy of the
target's embedding for loaders that do not take it from the target (speculators). The
drafter always uses the target's own embedding; `load_drafter` checks a saved copy
against it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..durable import atomic_write
from ..tree import build_tree_mask, chain_mask, tree_depths
from .config import ModelConfig, parse_config
from .kv_cache import KVCache
from .layers import (
    MLP,
    Attention,
    AttentionContext,
    Linear,
    RMSNorm,
    module_cache,
    rope_cos_sin,
    rope_tables,
)

ARCHITECTURE = "LlamaForCausalLMEagle3"
LAYERS_KEY = "eagle_aux_hidden_state_layer_ids"  # the target layers the features come from


@dataclass
class DrafterOutput:
    """hidden `[B, T, H]` (pre-norm, the next step's feature), logits `[B, T, Vd]` over the
    draft vocabulary, tree_kv: per layer (k, v) of every tree node so far (tree steps)."""

    hidden: torch.Tensor
    logits: torch.Tensor
    tree_kv: list | None = None


def draft_vocab_maps(token_counts: torch.Tensor, draft_vocab_size: int):
    """(d2t `[Vd]` int64, t2d `[V]` bool) for the `draft_vocab_size` most frequent tokens.

    Ties are broken by the lower token id; draft ids follow increasing target id (EAGLE-3),
    so `d2t[d] = target_id(d) − d` is non-decreasing and ≥ 0.
    """
    counts = torch.as_tensor(token_counts).flatten().to(torch.float64)
    V = counts.numel()
    if not 1 <= draft_vocab_size <= V:
        raise ValueError(f"draft_vocab_size must be in [1, {V}], got {draft_vocab_size}")
    order = torch.argsort(-counts, stable=True)
    kept = torch.sort(order[:draft_vocab_size]).values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[kept] = True
    return kept - torch.arange(draft_vocab_size), t2d


def token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Frequency of every token id in `token_ids` (negative ids, padding, are skipped)."""
    ids = token_ids.flatten()
    return torch.bincount(ids[ids >= 0], minlength=vocab_size)[:vocab_size]


class DraftLayer(nn.Module):
    """EAGLE-3's `midlayer`: a Llama decoder layer whose attention reads
    norm(embedding) ⊕ norm(feature) (2H) and whose residual is the feature."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden_size
        self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        # Fused q/k/v and gate/up GEMMs at inference: fewer calls per draft step.
        self.self_attn = Attention(cfg, in_features=2 * H, fuse=True)
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, fuse=True)

    def forward(self, embeds, hidden, ctx: AttentionContext) -> torch.Tensor:
        x = torch.cat((self.input_layernorm(embeds), self.hidden_norm(hidden)), -1)
        h = hidden + ctx.attend(0, self.self_attn, x)
        return h + self.mlp(self.post_attention_layernorm(h))


def _drafter_config(target, draft_vocab_size: int, intermediate_size: int | None) -> dict:
    cfg, raw = target.model_config, target.config
    config = {
        "architectures": [ARCHITECTURE], "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": intermediate_size or cfg.intermediate_size,
        "num_hidden_layers": 1, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": raw.get("max_position_embeddings", 4096),
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling.get("rope_type") == "default"
        else dict(cfg.rope_scaling),
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "vocab_size": cfg.vocab_size, "draft_vocab_size": draft_vocab_size,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "torch_dtype": str(target.dtype).removeprefix("torch."),
        LAYERS_KEY: list(target.feature_layers),
    }
    return config


class Drafter(nn.Module):
    """EAGLE-3 draft head (module docstring). Build with `Drafter.for_target` or
    `vsd_ext.load_drafter`; `attach(target)` (done by both) lends it the target's
    embedding, which is not one of its parameters."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.model_config = cfg = parse_config({**config, "architectures": ["LlamaForCausalLM"]})
        H = cfg.hidden_size
        self.target_hidden_size = config.get("target_hidden_size") or H
        self.draft_vocab_size = config.get("draft_vocab_size") or cfg.vocab_size
        self.fc = Linear(3 * self.target_hidden_size, H, bias=False)
        self.midlayer = DraftLayer(cfg)
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.lm_head = Linear(H, self.draft_vocab_size, bias=False)
        # `DecodeSettings` fitted for this drafter (`load_drafter` reads them; None: none).
        self.decode_settings = None
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.ones(cfg.vocab_size, dtype=torch.bool))
        self.register_buffer("inv_freq", cfg.inv_freq(), persistent=False)
        self._embed = None

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def for_target(cls, target, draft_vocab_size: int | None = None,
                   token_counts: torch.Tensor | None = None,
                   intermediate_size: int | None = None, seed: int = 0,
                   init_lm_head_from_target: bool = True) -> Drafter:
        """A freshly initialized drafter for `target`.

        draft_vocab_size: size of the reduced vocabulary (default: the full vocabulary);
        a reduced one keeps the most frequent ids of `token_counts` `[V]` (required then).
        init_lm_head_from_target: start the draft LM head from the target's rows of the
        kept tokens (else N(0, 0.02) like every other projection).
        """
        V = target.vocab_size
        draft_vocab_size = draft_vocab_size or V
        if draft_vocab_size < V and token_counts is None:
            raise ValueError("a reduced draft vocabulary needs token_counts (token "
                             "frequencies of the training data, e.g. drafter.token_counts)")
        drafter = cls(_drafter_config(target, draft_vocab_size, intermediate_size))
        gen = torch.Generator().manual_seed(seed)
        for name, p in drafter.named_parameters():
            p.data.copy_(torch.ones_like(p) if name.endswith("norm.weight")
                         else torch.randn(p.shape, generator=gen) * 0.02)
        if draft_vocab_size < V:
            d2t, t2d = draft_vocab_maps(token_counts, draft_vocab_size)
            drafter.d2t.copy_(d2t)
            drafter.t2d.copy_(t2d)
        if init_lm_head_from_target:
            ids = torch.arange(draft_vocab_size) + drafter.d2t
            drafter.lm_head.weight.data.copy_(target.output_weight.detach().float().cpu()[ids])
        return drafter.to(device=target.device, dtype=target.dtype).attach(target)

    @property
    def feature_layers(self) -> tuple[int, ...] | None:
        """The target layers whose inputs this drafter fuses (config
        `eagle_aux_hidden_state_layer_ids`); None for an old checkpoint that does not say."""
        layers = self.config.get(LAYERS_KEY)
        return None if layers is None else tuple(layers)

    def attach(self, target) -> Drafter:
        """Use `target`'s token embedding (checked against this drafter's sizes) and its
        features (their layers checked against the drafter's; a drafter that does not record
        them takes the target's from now on, and saves them)."""
        emb = target.embed_tokens
        if emb.weight.shape != (self.model_config.vocab_size, self.model_config.hidden_size):
            raise ValueError(f"drafter expects a target embedding "
                             f"[{self.model_config.vocab_size}, "
                             f"{self.model_config.hidden_size}], the target's is "
                             f"{tuple(emb.weight.shape)}")
        if target.hidden_size != self.target_hidden_size:
            raise ValueError(f"drafter fuses features of hidden size "
                             f"{self.target_hidden_size}, the target's is {target.hidden_size}")
        layers = tuple(target.feature_layers)
        if self.feature_layers not in (None, layers):
            raise ValueError(f"the drafter fuses the inputs of target layers "
                             f"{list(self.feature_layers)} ({LAYERS_KEY}), the target gives "
                             f"{list(layers)}: load the target with "
                             f"load_target(..., feature_layers={self.feature_layers})")
        self.config[LAYERS_KEY] = list(layers)
        # Kept out of the module tree: the embedding belongs to (and is saved with) the
        # target, never to the drafter's parameters or state_dict.
        self.__dict__["_embed"] = emb
        return self

    # ---- vocabulary -----------------------------------------------------------------
    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary ids → target ids (`d + d2t[d]`)."""
        return draft_ids + self.d2t[draft_ids]

    def to_target_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """`[..., Vd]` draft logits → `[..., V]` target-vocabulary logits, −inf outside the
        draft vocabulary (so softmax gives the draft distribution over target ids)."""
        out = logits.new_full((*logits.shape[:-1], self.model_config.vocab_size),
                              float("-inf"))
        ids = self.to_target_ids(torch.arange(self.draft_vocab_size, device=logits.device))
        out[..., ids] = logits
        return out

    # ---- forward passes -------------------------------------------------------------
    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layer input g (module docstring): `fc` of target features `[..., 3·Ht]`, or
        drafter states `[..., H]` as they are; cast to the drafter's dtype first (a bf16
        drafter reads the fp32 target's features)."""
        dtype = self.fc.weight.dtype
        if hidden.shape[-1] == self.fc.in_features:
            return self.fc(hidden.to(dtype))
        if hidden.shape[-1] == self.model_config.hidden_size:
            return hidden if hidden.dtype == dtype else hidden.to(dtype)
        raise ValueError(f"hidden must end in {self.fc.in_features} (target features) or "
                         f"{self.model_config.hidden_size} (drafter states), got "
                         f"{tuple(hidden.shape)}")

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple:
        """`rope_tables` of `positions` `[B, T]`, looked up in the tables of every position
        below max_position_embeddings, built once per dtype (and again if inv_freq is
        replaced, see `module_cache`): a draft forward would otherwise rebuild them from the
        angles, a dozen small ops. Other positions (padding nodes' −1, past the end) are
        computed directly; the values are the same either way. CPU only: checking the range
        would synchronize a GPU."""
        limit = self.config.get("max_position_embeddings") or 0
        if positions.device.type == "cpu" and positions.numel():
            low, high = (int(v) for v in torch.aminmax(positions))
            if 0 <= low and high < limit:
                def build(inv_freq):
                    every = torch.arange(limit, device=inv_freq.device)[None]
                    return rope_tables(*rope_cos_sin(inv_freq, every, dtype))

                cos, sin = module_cache(self, f"_rope_{dtype}", (self.inv_freq,), build)
                return cos[0, positions], sin[0, positions]
        return rope_tables(*rope_cos_sin(self.inv_freq, positions, dtype))

    def layer(self, input_ids: torch.Tensor, g: torch.Tensor, positions: torch.Tensor,
              ctx: AttentionContext) -> torch.Tensor:
        """The draft decoder layer (module docstring: x, then h) on tokens `[B, T]` with layer
        inputs g `[B, T, H]` (`features`) at positions `[B, T]`, attending as `ctx` says
        (its RoPE tables are set here). Decoding (the passes below) and training
        (`vsd_ext.training.drafting`) both run it. Returns h `[B, T, H]` (pre-norm)."""
        if self._embed is None:
            raise RuntimeError("drafter has no embedding: call drafter.attach(target)")
        embeds = self._embed(input_ids.clamp(min=0))
        if embeds.dtype != self.fc.weight.dtype:  # a bf16 drafter on an fp32 target
            embeds = embeds.to(self.fc.weight.dtype)
        # Under autocast (mixed-precision training) the projections return the autocast
        # dtype: the RoPE tables follow it so that q and k keep one dtype.
        device = embeds.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else embeds.dtype)
        ctx.rope = self._rope(positions, dtype)
        return self.midlayer(embeds, g, ctx)

    def _run(self, input_ids, hidden, positions, ctx_args: dict,
             logits_at: torch.Tensor | None = None) -> DrafterOutput:
        if input_ids.shape != hidden.shape[:2]:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and hidden "
                             f"{tuple(hidden.shape)} must agree on [B, T]")
        tree = ctx_args.get("mode") == "tree"
        ctx = AttentionContext(keep_kv=tree, **ctx_args)
        h = self.layer(input_ids, self.features(hidden), positions, ctx)
        ctx.flush()
        # The LM head is the largest GEMM: run it only where the caller needs logits.
        head_in = h if logits_at is None else h.gather(
            1, logits_at[..., None].expand(-1, -1, h.shape[-1]))
        logits = self.lm_head(self.norm(head_in))
        return DrafterOutput(h, logits, ctx.kv if tree else None)

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor,
                positions: torch.Tensor | None = None) -> DrafterOutput:
        """Causal pass over whole sequences without a cache (training, step 0).
        input_ids `[B, T]`, hidden `[B, T, 3·Ht]` features (or `[B, T, H]` drafter states);
        positions `[B, T]` default `0..T−1`."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return self._run(input_ids, hidden, positions, {"mode": "causal"})

    def new_cache(self, batch_size: int, capacity: int, dtype=None, device=None) -> KVCache:
        cfg = self.model_config
        return KVCache(1, batch_size, capacity, cfg.num_key_value_heads, cfg.head_dim,
                       dtype or self.fc.weight.dtype, device or self.fc.weight.device)

    def prefill(self, input_ids: torch.Tensor, hidden: torch.Tensor, cache: KVCache,
                lengths: torch.Tensor | None = None, logits: bool = True) -> DrafterOutput:
        """Append a right-padded chunk (tokens `[B, T]`, their features `[B, T, ·]`, real
        lengths `[B]`) to the drafter's cache, as `Target.prefill` does. `logits=False`
        skips the LM head (`logits` is then `[B, 0, Vd]`): filling the cache needs only
        the keys and values."""
        B, T = input_ids.shape
        if B != cache.batch_size:
            raise ValueError(f"input_ids has {B} rows but the cache has {cache.batch_size}")
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.int64, device=cache.device)
        cache.reserve(T)
        positions = cache.lengths[:, None] + torch.arange(T, device=cache.device)
        if bool((cache.lengths == 0).all()):
            args = {"mode": "causal", "cache": cache, "write_positions": positions}
        else:
            args = {"mode": "tree", "cache": cache, "write_positions": positions,
                    "prefix_lens": cache.lengths.clone(),
                    "tree_mask": chain_mask(T, device=cache.device).expand(B, -1, -1)}
        skip = None if logits else torch.zeros(B, 0, dtype=torch.int64, device=cache.device)
        out = self._run(input_ids, hidden, positions, args, skip)
        cache.advance(lengths.to(device=cache.device, dtype=torch.int64))
        return out

    def tree_step(self, input_ids: torch.Tensor, hidden: torch.Tensor, parents: torch.Tensor,
                  cache: KVCache | None, past: list | None = None,
                  prefix_lens: torch.Tensor | None = None) -> DrafterOutput:
        """Run the newest n nodes of a growing draft tree.

        input_ids `[B, n]`, hidden `[B, n, ·]`: tokens and input features of the new nodes
        (the target features at the root, the parent's `DrafterOutput.hidden` below it).
        parents `[B, P + n]`: parent index of every node so far, the P earlier nodes first
        (−1 for the root, node 0; a later node with parent −1 is padding, as in
        `vsd_ext.tree`); `past`: the `tree_kv` of the previous call (None when P = 0).
        Each new node attends to the cache prefix (`prefix_lens`, default
        `cache.lengths`; the cache may hold one row shared by all B) and to its ancestors
        and itself, at position `prefix + depth`. Nothing is written to the cache; the
        returned `tree_kv` (earlier and new nodes) feeds the next call.
        """
        B, n = input_ids.shape
        P = 0 if past is None else past[0][0].shape[1]
        if parents.shape != (B, P + n):
            raise ValueError(f"parents must be [{B}, {P + n}] (earlier + new nodes), got "
                             f"{tuple(parents.shape)}")
        if prefix_lens is None:
            prefix_lens = (cache.lengths if cache is not None
                           else torch.zeros(B, dtype=torch.int64, device=input_ids.device))
        prefix_lens = prefix_lens.to(device=input_ids.device, dtype=torch.int64)
        if cache is not None:
            cache.reserve(0, prefix_lens)
        depths = tree_depths(parents)[:, P:].to(input_ids.device)
        return self.grow_tree(input_ids, hidden, depths, build_tree_mask(parents), cache,
                              past, prefix_lens)

    def grow_tree(self, input_ids: torch.Tensor, hidden: torch.Tensor, depths: torch.Tensor,
                  tree_mask: torch.Tensor, cache: KVCache | None, past: list | None = None,
                  prefix_lens: torch.Tensor | None = None,
                  logits_at: torch.Tensor | None = None) -> DrafterOutput:
        """`tree_step` for a caller that already knows the tree's shape: the new nodes'
        depths `[B, n]` and the `[B, P + n, W]` tree mask of all nodes (e.g. grown
        incrementally, as `DrafterProposer` does). Nothing is validated, so that a draft
        step does not re-walk the tree it built itself on every level.

        logits_at `[B, k]` int64: compute logits only at these new nodes of each row
        (`logits` `[B, k, Vd]`), e.g. the root of a pending chain, the only node whose
        distribution is used; None: at every new node.
        """
        if prefix_lens is None:
            prefix_lens = (cache.lengths if cache is not None
                           else torch.zeros(input_ids.shape[0], dtype=torch.int64,
                                            device=input_ids.device))
        positions = prefix_lens[:, None] + depths
        return self._run(input_ids, hidden, positions, {
            "mode": "tree", "cache": cache, "prefix_lens": prefix_lens.clone(),
            "tree_mask": tree_mask, "past": past}, logits_at)

    # ---- checkpoints ----------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None,
                        include_embedding: bool = False) -> None:
        """Write config.json and model.safetensors (the EAGLE-3 layout, module docstring);
        floating tensors in `dtype` (default: as they are). include_embedding: also save the
        attached target's embedding as `embed_tokens.weight` (for loaders that need it in
        the drafter, e.g. speculators). Each file is written to a temporary name, fsynced and
        renamed: a crash never leaves a half-written file under the final name."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = dict(self.state_dict())
        if include_embedding:
            if self._embed is None:
                raise RuntimeError("include_embedding: the drafter has no embedding; call "
                                   "drafter.attach(target) first")
            state["embed_tokens.weight"] = self._embed.weight
        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
                   .detach().cpu().contiguous() for k, v in state.items()}
        config = dict(self.config)
        config["torch_dtype"] = str(dtype or self.fc.weight.dtype).removeprefix("torch.")
        atomic_write(out / "model.safetensors", lambda path: save_file(
            tensors, str(path), metadata={"format": "pt"}))
        atomic_write(out / "config.json", lambda path: path.write_text(
            json.dumps(config, indent=2) + "\n"))
