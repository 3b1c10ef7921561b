"""Loading Hugging Face checkpoint directories: safetensors (single or sharded), the
tokenizer, and validation with clear errors.

A checkpoint directory holds `config.json`, the weights as `model.safetensors` or as shards
listed by `model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`),
and `tokenizer.json` (read with the `tokenizers` library). Every tensor the architecture
needs must be present with the right shape; anything else in the files is an error too
(except the RoPE `inv_freq` buffers some old checkpoints carry), so a checkpoint of another
architecture never loads silently half-initialized.

Embeddings are tied when `tie_word_embeddings` says so; when the config does not say, they
are tied exactly when the checkpoint has no `lm_head.weight`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import CheckpointError, read_config, read_json
from .target import Target

DEFAULT_TARGET_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_target"
# Drafters trained for the default target, by name (their training_info.json says how):
# "default" (EAGLE-3) and "default-vsd" (the same EAGLE-3 stage, then VSD for as long as
# "default" had EAGLE-3 fine-tuning).
_ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_DRAFTERS = {"default": _ASSETS / "default_drafter",
                    "default-vsd": _ASSETS / "default_drafter_vsd"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_checkpoint_dir(path_or_name: str | Path) -> Path:
    """`"default"` → the embedded default target; anything else must be a directory."""
    if str(path_or_name) == "default":
        return DEFAULT_TARGET_DIR
    path = Path(path_or_name).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f"{path_or_name!r} is not a directory; pass a local Hugging Face checkpoint "
            f"directory (config.json, *.safetensors, tokenizer.json) or 'default' "
            f"(vsd_ext downloads nothing)")
    return path


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a truncated or garbage file is a
    `CheckpointError` naming it."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types, OSError, ...
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def load_safetensors_dir(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors`, or of the shards its index lists."""
    directory = Path(directory)
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if not index.is_file():
        raise CheckpointError(f"{directory}: no model.safetensors and no "
                              f"model.safetensors.index.json")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                   for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a safetensors index (no weight_map of tensor "
                              f"name -> shard file)")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = directory / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{index} lists shard {shard!r}, which does not exist")
        state.update(read_safetensors(shard_path))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise CheckpointError(f"{index} maps tensors that no shard holds: {absent[:5]}")
    return state


def load_tokenizer(directory: str | Path):
    """`tokenizers.Tokenizer` from `<directory>/tokenizer.json`."""
    from tokenizers import Tokenizer

    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no tokenizer.json (vsd_ext needs the fast "
                              f"tokenizer file of the checkpoint)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises a bare Exception
        raise CheckpointError(f"{path}: not a readable tokenizer file ({err})") from err


def _few(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def validate_state(expected: dict[str, torch.Size], state: dict[str, torch.Tensor],
                   where: str, ignore=lambda name: False) -> None:
    """Raise `CheckpointError` naming missing, unexpected or mis-shaped tensors."""
    missing = set(expected) - set(state)
    if missing:
        raise CheckpointError(f"{where}: missing tensors {_few(missing)}")
    unexpected = {k for k in set(state) - set(expected) if not ignore(k)}
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensors {_few(unexpected)} (a checkpoint "
                              f"of another architecture or configuration?)")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise CheckpointError(f"{where}: tensor {name} has shape "
                                  f"{tuple(state[name].shape)}, expected {tuple(shape)}")


def check_floating(state: dict[str, torch.Tensor], names, where: str) -> None:
    """Weights must be floating point: an integer or bool weight is a corrupted (or foreign)
    checkpoint, never something to cast silently."""
    for name in names:
        if not state[name].is_floating_point():
            raise CheckpointError(f"{where}: tensor {name} has dtype {state[name].dtype}, "
                                  f"expected a floating-point weight")


def default_dtype(raw: dict, device: torch.device) -> torch.dtype:
    """float32 on CPU; on an accelerator the checkpoint's own dtype (`torch_dtype`/`dtype`)."""
    if device.type == "cpu":
        return torch.float32
    return _DTYPES.get(str(raw.get("torch_dtype") or raw.get("dtype")), torch.float32)


def load_target(path_or_name: str | Path, dtype: torch.dtype | None = None,
                device: str | torch.device | None = None, feature_layers=None) -> Target:
    """Load a Llama-family target from a Hugging Face checkpoint directory.

    path_or_name: a directory, or `"default"` for the small target shipped with vsd_ext.
    dtype: weights/compute dtype (default: `default_dtype`; bf16 weights are upcast).
    device: where to put it (default CPU). feature_layers: the layers whose inputs
    `TargetOutput.features` concatenates (default `default_feature_layers`).
    """
    directory = resolve_checkpoint_dir(path_or_name)
    raw, cfg = read_config(directory)
    tokenizer = load_tokenizer(directory)
    state = load_safetensors_dir(directory)
    device = torch.device(device or "cpu")
    dtype = dtype or default_dtype(raw, device)

    tied = cfg.tie_word_embeddings
    if tied is None:
        tied = "lm_head.weight" not in state
    if tied:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Target(cfg, raw, tokenizer, tie_word_embeddings=tied,
                       feature_layers=feature_layers)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    validate_state(expected, state, str(directory),
                   ignore=lambda name: name.endswith("rotary_emb.inv_freq"))
    check_floating(state, expected, str(directory))
    state = {k: state[k].to(dtype=dtype) for k in expected}
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = cfg.inv_freq()
    return model.to(device).eval().requires_grad_(False)
