"""Models: the Llama-family target (HF checkpoints, KV-cache steps) and the EAGLE-3 drafter.

- `load_target(path_or_name, dtype=None, device=None)`: a `Target` from a Hugging Face
  checkpoint directory, or `"default"` for the small target shipped in vsd_ext/assets.
- `Drafter.for_target(target, draft_vocab_size=...)`, `Drafter.save_pretrained(dir)`,
  `load_drafter(dir, target)` (drafter_io.py): the EAGLE-3 style draft head and its
  checkpoints.
- `KVCache`: the static cache both use (prefill / decode / tree steps, KV compaction).
- `DecodeSettings`: a drafter's fitted decode settings (its `decode_settings.json`).
"""
from .checkpoint import load_target
from .config import CheckpointError, ModelConfig, parse_config
from .decode_settings import DecodeSettings, DecodeSettingsError
from .drafter import Drafter, DrafterOutput, draft_vocab_maps, token_counts
from .drafter_io import load_drafter
from .kv_cache import KVCache
from .target import Target, TargetOutput, default_feature_layers

__all__ = ["CheckpointError", "DecodeSettings", "DecodeSettingsError", "Drafter",
           "DrafterOutput", "KVCache", "ModelConfig", "Target", "TargetOutput",
           "default_feature_layers", "draft_vocab_maps", "load_drafter", "load_target",
           "parse_config", "token_counts"]
