"""Loading drafter checkpoints (the EAGLE-3 layout of `vsd_ext.models.drafter`), with every
file and tensor checked: a drafter that loads is one that drafts for this target."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import DEFAULT_DRAFTERS, check_floating, read_safetensors, validate_state
from .config import CheckpointError, read_json
from .decode_settings import read_decode_settings
from .drafter import ARCHITECTURE, LAYERS_KEY, Drafter

EMBEDDING = "embed_tokens.weight"


def read_drafter_config(directory: Path, target) -> dict:
    """`<directory>/config.json`, checked against `target` (clear errors naming the file)."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json")
    config = read_json(path)
    if ARCHITECTURE not in (config.get("architectures") or []):
        raise CheckpointError(f"{path}: architectures {config.get('architectures')} "
                              f"is not {[ARCHITECTURE]}")
    if config.get("num_hidden_layers") != 1:
        raise CheckpointError(f"{path}: num_hidden_layers must be 1, got "
                              f"{config.get('num_hidden_layers')}")
    if config.get("vocab_size") != target.vocab_size:
        raise CheckpointError(f"{path}: vocab_size {config.get('vocab_size')} does not "
                              f"match the target's {target.vocab_size}")
    layers = config.get(LAYERS_KEY)
    if layers is not None and (not isinstance(layers, list) or len(layers) != 3 or not all(
            isinstance(i, int) and 0 <= i < target.num_layers for i in layers)):
        raise CheckpointError(f"{path}: {LAYERS_KEY} must list 3 layers of the target "
                              f"(in [0, {target.num_layers})), got {layers!r}")
    draft_vocab = config.get("draft_vocab_size")
    if draft_vocab is not None and not (isinstance(draft_vocab, int)
                                        and 1 <= draft_vocab <= target.vocab_size):
        raise CheckpointError(f"{path}: draft_vocab_size must be in [1, "
                              f"{target.vocab_size}], got {draft_vocab!r}")
    return config


def check_vocab_maps(d2t: torch.Tensor, t2d: torch.Tensor, where: str) -> None:
    """d2t `[Vd]` int64 and t2d `[V]` bool must describe the same Vd distinct target ids."""
    if d2t.dtype != torch.int64 or t2d.dtype != torch.bool:
        raise CheckpointError(f"{where}: d2t must be int64 and t2d bool, got {d2t.dtype} "
                              f"and {t2d.dtype}")
    ids = torch.arange(d2t.numel()) + d2t
    V = t2d.numel()
    if bool((ids < 0).any() | (ids >= V).any()):
        raise CheckpointError(f"{where}: d2t maps draft ids outside the target vocabulary "
                              f"[0, {V}) (corrupted d2t)")
    if ids.unique().numel() != ids.numel() or int(t2d.sum()) != ids.numel() \
            or not bool(t2d[ids].all()):
        raise CheckpointError(f"{where}: d2t and t2d disagree (d2t must map the draft ids to "
                              f"distinct target ids, exactly those t2d marks)")


def check_embedding(saved: torch.Tensor, target, where: str) -> None:
    """A saved embedding copy must be the target's (equal in the lower of the two dtypes)."""
    own = target.embed_tokens.weight.detach().cpu()
    if saved.shape != own.shape or not saved.is_floating_point():
        raise CheckpointError(f"{where}: {EMBEDDING} is {saved.dtype} {tuple(saved.shape)}, "
                              f"the target's embedding {own.dtype} {tuple(own.shape)}")
    if not (torch.equal(own.to(saved.dtype), saved) or torch.equal(saved.to(own.dtype), own)):
        diff = float((saved.float() - own.float()).abs().max())
        raise CheckpointError(f"{where}: {EMBEDDING} differs from the target's embedding "
                              f"(max |diff| {diff:.3g}): the drafter was exported for another "
                              f"target")


def load_drafter(directory: str | Path, target, dtype: torch.dtype | None = None,
                 device=None) -> Drafter:
    """Load a drafter saved by `Drafter.save_pretrained` (or any EAGLE-3 checkpoint of this
    layout, with or without `embed_tokens.weight`) and attach it to `target` (sizes, feature
    layers and a saved embedding checked). dtype/device default to the target's.
    directory "default" / "default-vsd": the EAGLE-3 / VSD drafter shipped for the default
    target.

    The dtype may differ from the target's: a bf16 drafter reads the fp32 target's features
    (cast on entry) and drafts faster on a CPU with bf16 GEMMs (half the weight bytes, packed
    oneDNN weights, see `layers.linear`). Decoding stays lossless: verification uses the
    target's own logits; the drafter's precision only changes which tokens it proposes.

    A ``decode_settings.json`` in the directory (`vsd_ext.models.decode_settings`, written by
    `vsd_ext.calibrate_drafter`) is read into ``drafter.decode_settings``, which
    `vsd_ext.generate` applies by default."""
    directory = DEFAULT_DRAFTERS.get(str(directory), Path(directory))
    config = read_drafter_config(directory, target)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{directory}: no model.safetensors")
    state = read_safetensors(weights)
    try:
        with torch.device("meta"):
            drafter = Drafter(config)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{directory / 'config.json'}: {err}") from err
    expected = {k: v.shape for k, v in drafter.state_dict().items()}
    validate_state(expected, state, str(weights), ignore=lambda name: name == EMBEDDING)
    check_floating(state, [k for k in expected if k not in ("d2t", "t2d")], str(weights))
    check_vocab_maps(state["d2t"], state["t2d"], str(weights))
    if EMBEDDING in state:
        check_embedding(state[EMBEDDING], target, str(weights))
    dtype = dtype or target.dtype
    state = {k: (state[k].to(dtype) if state[k].is_floating_point() else state[k])
             for k in expected}
    drafter.load_state_dict(state, strict=True, assign=True)
    drafter.inv_freq = drafter.model_config.inv_freq()
    drafter.decode_settings = read_decode_settings(directory)
    try:
        return drafter.to(device or target.device).attach(target)
    except ValueError as err:
        raise CheckpointError(f"{directory}: {err}") from err
