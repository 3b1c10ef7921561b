"""Crash-safe training checkpoints: `out/checkpoint-<step>/`, committed by a rename.

A checkpoint is written whole into `out/.checkpoint-<step>.tmp/` (the drafter and
`trainer_state.pt`), every file and the directory fsynced, then renamed to
`out/checkpoint-<step>/`: a directory under that name is complete by construction. Only
then are older checkpoints deleted, so a process killed at any moment — during a save
included — leaves at least one complete checkpoint once one was ever written. Resume
picks the newest complete one (a `checkpoint/` of the older single-directory layout
counts too); temporary directories of interrupted saves are ignored and cleaned up.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..durable import publish_dir, remove_dir

PREFIX = "checkpoint-"
STATE = "trainer_state.pt"
REQUIRED = (STATE, "model.safetensors", "config.json")
_NAME = re.compile(r"checkpoint-(\d+)")


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read (the message names it)."""


def read_state(path: Path) -> dict:
    """The trainer state in `path` (tensors, numbers, strings and containers only)."""
    try:
        state = torch.load(str(path), weights_only=True)
    except Exception as err:  # torch.load fails on foreign files in many ways
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointReadError(f"{path}: not a readable trainer state ({first})") from err
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointReadError(f"{path}: not a trainer state written by vsd_ext")
    return state


class CheckpointStore:
    """The checkpoints of one output directory (module docstring)."""

    def __init__(self, out: Path):
        self.out = Path(out)

    def _complete(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.out.glob(f"{PREFIX}*"):
            match = _NAME.fullmatch(path.name)
            if match and all((path / name).is_file() for name in REQUIRED):
                found.append((int(match.group(1)), path))
        legacy = self.out / "checkpoint"
        if all((legacy / name).is_file() for name in REQUIRED):
            found.append((-1, legacy))  # older layout: below any numbered checkpoint
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory, or None."""
        found = self._complete()
        return found[-1][1] if found else None

    def save(self, step: int, write) -> Path:
        """`write(directory)` fills a fresh directory with the checkpoint of `step`; it is
        committed by a rename, then older checkpoints go."""
        final = self.out / f"{PREFIX}{step:08d}"
        if not final.is_dir():
            tmp = self.out / f".{PREFIX}{step:08d}.tmp"
            remove_dir(tmp)
            tmp.mkdir(parents=True)
            write(tmp)
            publish_dir(tmp, final)
        # Older checkpoints, and any a kill during an earlier deletion left half-removed
        # (incomplete, so `_complete` no longer lists them; renames make nothing else so).
        numbered = {p for p in self.out.glob(f"{PREFIX}*") if _NAME.fullmatch(p.name)}
        for path in (numbered | {path for _, path in self._complete()}) - {final}:
            remove_dir(path)
        for stale in self.out.glob(f".{PREFIX}*.tmp"):
            remove_dir(stale)
        return final
