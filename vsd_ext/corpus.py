"""The built-in corpus: the Python standard library's own source files.

Every machine that runs vsd_ext has a Python interpreter, and with it a few megabytes of
real, varied, well-written source code. The embedded default target is trained on it and
the drafters and benchmarks use it too, so nothing needs to be downloaded.

- Files: every `*.py` under the running interpreter's stdlib directory
  (`sysconfig.get_paths()["stdlib"]`), except third-party packages (`site-packages`), test
  suites (`test`, `tests`, `idle_test` directories) and machine-generated tables or data
  (`encodings`, `pydoc_data`, `_sysconfigdata*`, `config-*`, `lib-dynload`).
- Test suites: `include_tests=True` adds the `test` / `tests` / `idle_test` files (the same
  split rule applies to them; the default target trains on the train split with them, which
  about triples its text). The held-out figures the project reports use the default
  (no tests), so they compare across targets.
- External code: `external_files()` is Python code that is not in the corpus at all, present
  wherever vsd_ext runs: the sources of a few subpackages of the installed torch
  (`EXTERNAL_PACKAGES`). It measures how a model does on code a user brings.
- Split: deterministic, by file. `sha256(relative POSIX path)` read as an integer decides:
  `value % 1000 < HELDOUT_PER_MILLE` puts the file in `heldout`, else in `train`. The split
  of a file never changes, on any machine; different Python versions have (slightly)
  different files, so the corpus is that of the interpreter running. Inside `train`, the
  files with `HELDOUT_PER_MILLE <= value < TUNE_PER_MILLE` form `tune`: drafters never train
  on them (their training rows come from `drafter` = train minus tune), so decode settings
  are fitted and methods are tuned there, never on `heldout`, which only evaluation reads.
- Prompts: `prompts` (file openings), `midfile_windows` (cuts from the middle of a file, as
  the evaluation prompt sets of `python/make_eval_sets.py` are made) and `tune_prompts`
  (mid-file windows of the tune files: what decode settings are fitted on).
- Tokens: helpers turn files into token sequences with a `tokenizers.Tokenizer`, each file
  followed by the end-of-text id, and cut the stream into fixed-length training rows.
"""
from __future__ import annotations

import hashlib
import random
import sysconfig
from pathlib import Path

import torch

HELDOUT_PER_MILLE = 50
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "lib-dynload",
                           "encodings", "pydoc_data"}) | TEST_DIRS
EXTERNAL_PACKAGES = ("torch/nn/modules", "torch/optim", "torch/utils/data")
TUNE_PER_MILLE = 100
SPLITS = ("train", "heldout", "all", "tune", "drafter")


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _split_value(relative_path: str) -> int:
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000


def split_of(relative_path: str) -> str:
    """`"train"` or `"heldout"` for a path relative to the stdlib root (POSIX separators)."""
    return "heldout" if _split_value(relative_path) < HELDOUT_PER_MILLE else "train"


def _in_split(relative_path: str, split: str) -> bool:
    value = _split_value(relative_path)
    if split == "all":
        return True
    if split == "heldout":
        return value < HELDOUT_PER_MILLE
    if split == "tune":
        return HELDOUT_PER_MILLE <= value < TUNE_PER_MILLE
    if split == "drafter":
        return value >= TUNE_PER_MILLE
    return value >= HELDOUT_PER_MILLE  # train


def _excluded(relative: Path, include_tests: bool = False) -> bool:
    parts = relative.parts
    excluded = EXCLUDED_DIRS - TEST_DIRS if include_tests else EXCLUDED_DIRS
    if any(p in excluded or p.startswith("config-") for p in parts[:-1]):
        return True
    return parts[-1].startswith("_sysconfigdata")


def stdlib_files(split: str = "train", root: str | Path | None = None,
                 include_tests: bool = False) -> list[Path]:
    """Source files of one split (`SPLITS`: `train`, `heldout`, `all`, or the parts of train
    `tune` and `drafter`), sorted by relative path; `include_tests` adds the test suites'
    files of that split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    base = Path(root) if root is not None else stdlib_root()
    if not base.is_dir():
        raise FileNotFoundError(f"standard library directory {base} does not exist")
    files = []
    for path in base.rglob("*.py"):
        relative = path.relative_to(base)
        if not path.is_file() or _excluded(relative, include_tests):
            continue
        if _in_split(relative.as_posix(), split):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


def read_source(path: str | Path) -> str:
    """A source file's text (UTF-8; undecodable bytes replaced, which the stdlib avoids)."""
    return Path(path).read_bytes().decode("utf-8", errors="replace")


def stdlib_texts(split: str = "train", root: str | Path | None = None,
                 include_tests: bool = False) -> list[str]:
    """The texts of `stdlib_files(split, root, include_tests)`, same order."""
    return [read_source(p) for p in stdlib_files(split, root, include_tests)]


def external_files() -> list[Path]:
    """Python files outside the corpus (module docstring): every `*.py` under the
    `EXTERNAL_PACKAGES` directories of the installed torch, sorted by relative path."""
    base = Path(torch.__file__).parent.parent
    files = [p for package in EXTERNAL_PACKAGES for p in (base / package).rglob("*.py")
             if "__pycache__" not in p.parts]
    if not files:
        raise FileNotFoundError(f"no Python sources under {base} for {EXTERNAL_PACKAGES}")
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


def texts_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Texts as one int64 stream `[n]`, each followed by end-of-text."""
    end = eos_id(tokenizer)
    ids: list[int] = []
    for seq in encode_texts(tokenizer, texts):
        ids.extend(seq)
        ids.append(end)
    return torch.tensor(ids, dtype=torch.int64)


def eos_id(tokenizer) -> int:
    """The end-of-text id of a tokenizer trained by vsd_ext (`<|endoftext|>`)."""
    token_id = tokenizer.token_to_id("<|endoftext|>")
    if token_id is None:
        raise ValueError("tokenizer has no <|endoftext|> token")
    return token_id


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens added)."""
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def token_stream(tokenizer, split: str = "train", root: str | Path | None = None,
                 include_tests: bool = False) -> torch.Tensor:
    """All files of a split as one int64 stream `[n]`, each file followed by end-of-text."""
    return texts_stream(tokenizer, stdlib_texts(split, root, include_tests))


def chunk_stream(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a stream into `[n // seq_len, seq_len]` rows (the tail that does not fill a row
    is dropped)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def token_sequences(tokenizer, split: str = "train", seq_len: int = 512,
                    root: str | Path | None = None) -> torch.Tensor:
    """`chunk_stream(token_stream(tokenizer, split), seq_len)`: int64 `[rows, seq_len]`."""
    return chunk_stream(token_stream(tokenizer, split, root), seq_len)


def prompts(split: str = "heldout", num_lines: int = 12, limit: int | None = None,
            root: str | Path | None = None) -> list[str]:
    """The first `num_lines` lines of each file of a split (files with more lines than
    that, in path order): prompts whose continuation is real, unseen code."""
    out = []
    for text in stdlib_texts(split, root):
        lines = text.splitlines(keepends=True)
        if len(lines) > 2 * num_lines:
            out.append("".join(lines[:num_lines]))
        if limit is not None and len(out) >= limit:
            break
    return out


def midfile_windows(text: str, name: str, per_file: int = 3, max_chars: int = 1000,
                    min_chars: int = 300, min_after: int = 300) -> list[dict]:
    """Up to ``per_file`` prompts cut from the middle of one file: each ends at a line
    boundary between 20% and 80% of the file and holds the complete lines before the cut, at
    most ``max_chars`` characters (at least ``min_chars``), with at least ``min_after``
    characters of the file after it; cuts at least 40 lines apart, drawn by a generator
    seeded from ``name``. Each: {"prompt", "source": name, "line": line number of the cut}."""
    lines = text.splitlines(keepends=True)
    n = len(lines)
    candidates = list(range(max(1, n // 5), max(1, (4 * n) // 5)))
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    random.Random(seed).shuffle(candidates)
    windows, used = [], []
    for cut in candidates:
        if len(windows) == per_file:
            break
        if any(abs(cut - u) < 40 for u in used):
            continue
        prompt = ""
        for line in reversed(lines[:cut]):
            if len(prompt) + len(line) > max_chars:
                break
            prompt = line + prompt
        after = "".join(lines[cut:])
        if len(prompt) < min_chars or len(after) < min_after or not prompt.strip():
            continue
        used.append(cut)
        windows.append({"prompt": prompt, "source": name, "line": cut + 1})
    return windows


def tune_prompts(limit: int = 48, root: str | Path | None = None) -> list[str]:
    """Mid-file windows (`midfile_windows`) of the tune files: the first window of every
    file in path order, then the second ones, ...: the prompts decode settings are fitted
    on (module docstring)."""
    base = Path(root) if root is not None else stdlib_root()
    per_file = [midfile_windows(read_source(p), p.relative_to(base).as_posix())
                for p in stdlib_files("tune", root)]
    rounds = max((len(w) for w in per_file), default=0)
    out = [w[r]["prompt"] for r in range(rounds) for w in per_file if r < len(w)]
    return out[:limit]
