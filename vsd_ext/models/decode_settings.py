"""Decode settings fitted for one drafter: the `decode_settings.json` of a drafter directory.

`vsd_ext.calibrate_drafter` measures and writes them; `load_drafter` reads them into
``drafter.decode_settings`` and `vsd_ext.generate` applies them by default. The file:

    {"format": "vsd_ext.decode_settings", "version": 1,
     "ranking_temperature": 0.5,              # or [t_1, t_2, ...]: one per depth, the last
                                              # repeated below
     "acceptance": [                          # per-depth acceptance of the drafter
        {"mode": "greedy", "temperature": 0.0,
         "cumulative": [[a_11, ..., a_1K], [a_21, ...], ...],   # row d-1: depth d
         "reached": [n_1, n_2, ...]},
        {"mode": "target_only", "temperature": 1.0, ...},
        {"mode": "sampled", "temperature": 1.0, ...}],
     "fit": {...}}                            # how it was fitted: prompts, grid, measurements

- ``ranking_temperature`` t_r: deterministic (top-k) draft trees rank candidates by the
  cumulative ``log softmax(logits / t_r)`` of their path instead of ``log softmax(logits)``.
  Which tokens are drafted does not change, only which of them are kept; any deterministic
  tree is verified losslessly, so this never changes what is generated at T = 0.
- ``acceptance`` ``cumulative[d - 1][k - 1]``: at depth d, given that the target accepted
  the draft path down to depth d - 1 (``reached[d - 1]`` such cases were measured), the
  probability that the target accepts one of the drafter's first k children:
  ``greedy`` (T = 0): the target's argmax is among the drafter's top k;
  ``target_only`` (T > 0, top-k children verified against the target alone): the target's
  probability mass (at that temperature) of the drafter's top k;
  ``sampled`` (T > 0, k children drawn without replacement from the drafter at that
  temperature): recursive rejection sampling accepts one of them.
- ``fit``: free-form provenance (recorded, never read back by the code).

The costs of drafting and verifying depend on the machine and are measured at run time
(`vsd_ext.decoding.costs`), never stored here.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "vsd_ext.decode_settings"
VERSION = 1
FILE_NAME = "decode_settings.json"
MODES = ("greedy", "target_only", "sampled")


class DecodeSettingsError(ValueError):
    """A decode-settings file or dict that cannot be used (what is wrong is in the message)."""


def _fail(where: str, field_name: str, message: str):
    raise DecodeSettingsError(f"{where}: '{field_name}' {message}")


@dataclass(frozen=True)
class Acceptance:
    """Per-depth acceptance of one verification mode at one temperature (module docstring)."""

    mode: str
    temperature: float
    cumulative: tuple[tuple[float, ...], ...]
    reached: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"mode": self.mode, "temperature": self.temperature,
                "cumulative": [list(row) for row in self.cumulative],
                "reached": list(self.reached)}

    @classmethod
    def from_dict(cls, raw, where: str) -> Acceptance:
        if not isinstance(raw, dict):
            _fail(where, "acceptance", f"entries must be objects, got {type(raw).__name__}")
        mode, temperature = raw.get("mode"), raw.get("temperature")
        if mode not in MODES:
            _fail(where, "acceptance.mode", f"must be one of {MODES}, got {mode!r}")
        if not _number(temperature) or temperature < 0 or (mode == "greedy") != (temperature == 0):
            _fail(where, "acceptance.temperature", f"must be 0 for 'greedy' and > 0 otherwise, "
                  f"got {temperature!r} for {mode!r}")
        rows = raw.get("cumulative")
        if not isinstance(rows, list) or not rows or not all(
                isinstance(r, list) and r and all(_number(v) and 0 <= v <= 1 for v in r)
                for r in rows):
            _fail(where, "acceptance.cumulative", "must be a non-empty list (one per depth) of "
                  "non-empty lists of probabilities in [0, 1]")
        if any(any(b < a - 1e-9 for a, b in zip(r, r[1:])) for r in rows):
            _fail(where, "acceptance.cumulative", "must be non-decreasing in k within a depth")
        reached = raw.get("reached", [0] * len(rows))
        if not isinstance(reached, list) or len(reached) != len(rows) or not all(
                isinstance(n, int) and n >= 0 for n in reached):
            _fail(where, "acceptance.reached", f"must list one count >= 0 per depth "
                  f"({len(rows)})")
        return cls(mode, float(temperature), tuple(tuple(float(v) for v in r) for r in rows),
                   tuple(reached))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value)


@dataclass(frozen=True)
class DecodeSettings:
    """Decode settings of one drafter (module docstring). ``ranking_temperature``: a float
    or a tuple with one temperature per depth (the last one repeats)."""

    ranking_temperature: float | tuple[float, ...] = 1.0
    acceptance: tuple[Acceptance, ...] = ()
    fit: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        values = self.ranking_temperatures
        if not values or not all(_number(t) and t > 0 for t in values):
            _fail("DecodeSettings", "ranking_temperature", f"must be a number > 0 or a "
                  f"non-empty list of them, got {self.ranking_temperature!r}")

    @property
    def ranking_temperatures(self) -> tuple[float, ...]:
        t = self.ranking_temperature
        return tuple(t) if isinstance(t, (tuple, list)) else (t,)

    def ranking_temperature_at(self, depth: int) -> float:
        """t_r of candidates at ``depth`` (1 = the root's children)."""
        values = self.ranking_temperatures
        return float(values[min(max(depth, 1), len(values)) - 1])

    def find(self, mode: str) -> list[Acceptance]:
        """The stored tables of ``mode``, by increasing temperature."""
        return sorted((a for a in self.acceptance if a.mode == mode),
                      key=lambda a: a.temperature)

    # ---- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        t = self.ranking_temperature
        return {"format": FORMAT, "version": VERSION,
                "ranking_temperature": list(t) if isinstance(t, tuple) else t,
                "acceptance": [a.to_dict() for a in self.acceptance], "fit": dict(self.fit)}

    @classmethod
    def from_dict(cls, raw, where: str = "decode settings") -> DecodeSettings:
        if not isinstance(raw, dict):
            raise DecodeSettingsError(f"{where}: expected a JSON object, got "
                                      f"{type(raw).__name__}")
        if raw.get("format", FORMAT) != FORMAT:
            _fail(where, "format", f"must be {FORMAT!r}, got {raw.get('format')!r}")
        if raw.get("version", VERSION) != VERSION:
            _fail(where, "version", f"must be {VERSION} (this vsd_ext reads version "
                  f"{VERSION}), got {raw.get('version')!r}")
        t = raw.get("ranking_temperature", 1.0)
        if isinstance(t, list):
            t = tuple(t)
        if not (_number(t) or isinstance(t, tuple)) or not all(
                _number(v) and v > 0 for v in (t if isinstance(t, tuple) else (t,))) or t == ():
            _fail(where, "ranking_temperature", f"must be a number > 0 or a non-empty list of "
                  f"them, got {raw.get('ranking_temperature')!r}")
        acceptance = raw.get("acceptance", [])
        if not isinstance(acceptance, list):
            _fail(where, "acceptance", "must be a list")
        fit = raw.get("fit", {})
        if not isinstance(fit, dict):
            _fail(where, "fit", "must be an object")
        return cls(t, tuple(Acceptance.from_dict(a, where) for a in acceptance), fit)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the settings to ``path`` (a ``.json`` file) or to
        ``path/decode_settings.json`` (a drafter directory); returns the file's path."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> DecodeSettings:
        """Read a settings file, or the ``decode_settings.json`` of a directory."""
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise DecodeSettingsError(f"{path}: no such file") from None
        except json.JSONDecodeError as err:
            raise DecodeSettingsError(f"{path}: not JSON ({err.msg}, line {err.lineno})") from None
        return cls.from_dict(raw, str(path))


def read_decode_settings(directory: str | Path) -> DecodeSettings | None:
    """The settings saved in a drafter directory, or None when it has none (a
    ``decode_settings.json`` that is not a readable file is an error naming it)."""
    path = Path(directory) / FILE_NAME
    if not path.exists():
        return None
    if not path.is_file():
        raise DecodeSettingsError(f"{path}: not a file")
    return DecodeSettings.load(path)
