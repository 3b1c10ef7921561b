"""Parsing of Hugging Face `config.json` files of the Llama family, and RoPE frequencies.

One `ModelConfig` describes every supported architecture; the differences are flags:

| architecture       | model_type | qkv bias             | q/k RMSNorm | notes                   |
|--------------------|------------|----------------------|-------------|-------------------------|
| LlamaForCausalLM   | llama      | `attention_bias`     | no          | Llama 2/3, llama3 RoPE  |
| MistralForCausalLM | mistral    | no                   | no          | `sliding_window`        |
| Qwen2ForCausalLM   | qwen2      | yes (q, k, v; not o) | no          | optional sliding window |
| Qwen3ForCausalLM   | qwen3      | `attention_bias`     | yes         | explicit `head_dim`     |

Both config formats are read: the `transformers` >= 5 one (`rope_parameters` holding
`rope_theta` and the scaling) and the older one (top-level `rope_theta` plus `rope_scaling`).
RoPE types supported: `default`, `linear`, `llama3`; anything else is a clear error.

Sliding-window attention is exact here as long as no sequence is longer than the window
(every key is then inside it); `ModelConfig.max_length` records that bound and the KV cache
refuses to grow past it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded (what is wrong is in the message)."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of one Llama-family checkpoint (see module docstring)."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool | None = None  # None: not stated, decided by the checkpoint
    sliding_window: int | None = None
    max_position_embeddings: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    @property
    def max_length(self) -> int | None:
        """Longest sequence this implementation runs exactly (the sliding window), or None."""
        return self.sliding_window

    def inv_freq(self, device=None) -> torch.Tensor:
        """RoPE inverse frequencies `[head_dim // 2]` (fp32), with the configured scaling."""
        return rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling, device)


def _number(raw: dict, key: str, default=None, integer: bool = False):
    """`raw[key]` (or `default` when absent/null), which must be a positive number (an
    integer when `integer`): a CheckpointError naming the field otherwise."""
    value = raw.get(key)
    if value is None:
        return default
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float)))
    if not ok or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
        kind = "a positive integer" if integer else "a positive finite number"
        raise CheckpointError(f"config.json: {key} must be {kind}, got {value!r}")
    return value


def _rope_settings(raw: dict) -> tuple[float, dict]:
    """(theta, scaling dict with a `rope_type` key) from either config format."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params:
        if "rope_theta" not in params and "rope_theta" not in raw:
            raise CheckpointError("config.json: rope_parameters has no rope_theta")
        theta = float(_number({**raw, **params}, "rope_theta"))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(_number(raw, "rope_theta", 10000.0))
        scaling = raw.get("rope_scaling")
        scaling = {} if scaling is None else scaling
        if not isinstance(scaling, dict):
            raise CheckpointError(f"config.json: rope_scaling must be an object or null, "
                                  f"got {scaling!r}")
        scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"config.json: RoPE scaling type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError("config.json: partial_rotary_factor != 1 is not supported")
    scaling.pop("partial_rotary_factor", None)
    required = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings")}.get(rope_type, ())
    missing = [k for k in required if k not in scaling]
    if missing:
        raise CheckpointError(f"config.json: {rope_type} RoPE scaling lacks {missing}")
    for key in required:
        _number(scaling, key, integer=key == "original_max_position_embeddings")
    return theta, {"rope_type": rope_type, **scaling}


def _sliding_window(raw: dict, model_type: str) -> int | None:
    window = _number(raw, "sliding_window", integer=True)
    if window is None:
        return None
    if model_type == "mistral":
        return int(window)
    layer_types = raw.get("layer_types") or []
    if raw.get("use_sliding_window", False) is True or (isinstance(layer_types, list)
                                                        and "sliding_attention" in layer_types):
        return int(window)
    return None


def _check_token_ids(raw: dict, key: str) -> None:
    value = raw.get(key)
    ids = value if isinstance(value, list) else [value]
    if value is not None and not all(isinstance(i, int) and not isinstance(i, bool)
                                     for i in ids):
        raise CheckpointError(f"config.json: {key} must be a token id (or a list of them), "
                              f"got {value!r}")


def parse_config(raw: dict) -> ModelConfig:
    """Validate an HF config dict and turn it into a `ModelConfig` (clear errors otherwise)."""
    archs = raw.get("architectures")
    archs = [] if archs is None else archs
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"config.json: architectures must be a list of names, got "
                              f"{archs!r}")
    model_type = raw.get("model_type")
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None and not archs:
        arch = next((a for a, t in SUPPORTED_ARCHITECTURES.items() if t == model_type), None)
    if arch is None:
        raise CheckpointError(
            f"unsupported architecture {archs or model_type!r}: vsd_ext runs "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    model_type = SUPPORTED_ARCHITECTURES[arch]
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if _number(raw, key, integer=True) is None:
            raise CheckpointError(f"config.json: {key} must be a positive integer, got None")
    heads = raw["num_attention_heads"]
    kv_heads = _number(raw, "num_key_value_heads", heads, integer=True)
    if heads % kv_heads:
        raise CheckpointError(f"config.json: num_attention_heads ({heads}) is not a multiple "
                              f"of num_key_value_heads ({kv_heads})")
    head_dim = _number(raw, "head_dim", raw["hidden_size"] // heads, integer=True)
    if head_dim < 2 or head_dim % 2:
        raise CheckpointError(f"config.json: head_dim must be even and >= 2 (RoPE rotates "
                              f"pairs), got {head_dim}")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        _check_token_ids(raw, key)
    if not isinstance(raw.get("tie_word_embeddings"), (bool, type(None))):
        raise CheckpointError(f"config.json: tie_word_embeddings must be true, false or "
                              f"absent, got {raw['tie_word_embeddings']!r}")
    theta, scaling = _rope_settings(raw)
    attention_bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        architecture=arch,
        model_type=model_type,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_number(raw, "rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias={"qwen2": True, "mistral": False}.get(model_type, attention_bias),
        o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
        mlp_bias=bool(raw.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=raw.get("tie_word_embeddings"),
        sliding_window=_sliding_window(raw, model_type),
        max_position_embeddings=_number(raw, "max_position_embeddings", integer=True),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
    )


def read_config(directory: str | Path) -> tuple[dict, ModelConfig]:
    """Read `<directory>/config.json`: (raw dict, parsed `ModelConfig`)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (not a Hugging Face checkpoint "
                              f"directory)")
    raw = read_json(path)
    try:
        return raw, parse_config(raw)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {str(err).removeprefix('config.json: ')}") from err


def read_json(path: Path, kind: type = dict):
    """`path` parsed as JSON, which must be a `kind` (a CheckpointError naming the file
    otherwise)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: expected a JSON {kind.__name__}, got "
                              f"{type(value).__name__}")
    return value


def rope_inv_freq(head_dim: int, theta: float, scaling: dict, device=None) -> torch.Tensor:
    """Inverse frequencies `theta ** (-2i / head_dim)`, i < head_dim/2, then scaled.

    - linear: every frequency divided by `factor` (positions stretched by `factor`).
    - llama3: wavelengths `2π / f` above `L / low_freq_factor` (L = original context) are
      divided by `factor`, those below `L / high_freq_factor` kept, and in between blended
      with `s = (L / wavelen − low) / (high − low)`: `f' = (1 − s) f / factor + s f`.
    Same float32 arithmetic as `transformers`, so the rotations agree to the last bit.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device,
                                                                   dtype=torch.float)
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = context / low, context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(medium, blended, scaled)
    return inv_freq
