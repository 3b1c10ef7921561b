"""The machinery of the hostile-input fuzz suite (issue #17): a `Case` (a call and what
must happen), `outcome` (what one did), the `World` the cases run in (a tiny target, a
drafter for it, a dataset), `run_cli` (a `vsd` command in this process) and small file
corruptors. The cases themselves: tests/fuzz_cases.py and the `fuzz_*` modules it gathers.
"""
from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from vsd_ext.app.cli import main as vsd_main
from vsd_ext.models import Drafter
from vsd_ext.training.data import DataSplits

from helpers import random_dataset, write_tiny_target

SEED = 17
NAN, INF = float("nan"), float("inf")

@dataclass
class Case:
    """name: unique id; run(): the call; names: substrings of which an error message must
    hold one (None: the call must succeed and `check(result)` must hold); cli: run() returns
    (exit status, stderr text) of a `vsd` command."""

    name: str
    run: object
    names: tuple | None = None
    check: object = None
    cli: bool = False


def outcome(case: Case) -> str:
    try:
        result = case.run()
    except Exception as err:  # noqa: BLE001 - classifying any failure is the point
        if case.cli:  # a `vsd` command that lets an exception escape prints a traceback
            return "traceback"
        if isinstance(err, (ValueError, OSError)):
            return _error_outcome(case, str(err))
        return "unclear error"
    if case.cli:
        status, err = result
        if status == 0:
            return "silently wrong"
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if len(lines) != 1 or "Traceback" in err:
            return "unclear error"
        return _error_outcome(case, lines[0])
    if case.names is not None:
        return "silently wrong"
    return "correct" if case.check is None or case.check(result) else "silently wrong"


def _error_outcome(case: Case, message: str) -> str:
    if case.names is None:
        return "unclear error"
    return "clean error" if any(n in message for n in case.names) else "unclear error"


# ---- the world the cases run in --------------------------------------------------------
class World:
    """A tiny target checkpoint, a drafter for it and a dataset, in `root`."""

    def __init__(self, root: Path, seed: int = SEED):


        self.root = Path(root)
        self.target_dir = self.root / "target"
        self.target = write_tiny_target(self.target_dir, layers=4)
        self.drafter_dir = self.root / "drafter"
        Drafter.for_target(self.target, seed=1).save_pretrained(self.drafter_dir)
        data = random_dataset(self.target, 12, 12, seed=2)
        self.data = self.root / "data.pt"
        DataSplits(data.rows(torch.arange(8)), data.rows(torch.arange(8, 12)),
                   [[1, 2, 3]], "fuzz").save(self.data)
        self.rng = random.Random(seed)
        self._copies = 0

    def copy(self, what: str) -> Path:
        """A fresh copy of the target or drafter directory to corrupt."""
        self._copies += 1
        out = self.root / f"{what}_{self._copies}"
        shutil.copytree(self.target_dir if what == "target" else self.drafter_dir, out)
        return out


def write_json(path: Path, value) -> None:
    path.write_text(value if isinstance(value, str) else json.dumps(value))


def corrupt_bytes(path: Path, rng: random.Random, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[:rng.randrange(1, len(data))])
    elif how == "garbage":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
    elif how == "empty":
        path.write_bytes(b"")
    else:  # header length field that points past the end
        path.write_bytes((10 ** 9).to_bytes(8, "little") + data[8:64])



def run_cli(argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of `vsd argv` in this process (stdout discarded)."""

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = vsd_main(argv)
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
    return status, err.getvalue()

