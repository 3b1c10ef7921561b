"""Write the fixed, versioned evaluation prompt sets of vsd_ext (JSONL, one prompt per line).

Every τ and speedup the project reports is measured on these files, so they are committed
and never regenerated silently: a new version gets a new file name (`_v2`, ...).

- `heldout_midfile_v1.jsonl`: mid-file windows of the held-out standard-library files
  (`vsd_ext.corpus`, split by a hash of the path, never trained on). A window ends at a line
  boundary between 20% and 80% of the file; its prompt is the complete lines before the cut,
  at most `--max-chars` characters (at least `--min-chars`), and at least `--min-after`
  characters of the file follow it (real code to continue). At most `--per-file` windows per
  file, cut points drawn by a generator seeded from the file's path.
- `heldout_headers_v1.jsonl`: the first 12 lines of held-out files (file openings: licence
  headers and docstrings, whose greedy continuations often loop; reported separately).
- `external_midfile_v1.jsonl`: the same kind of windows of Python code outside the corpus
  (`vsd_ext.corpus.external_files`: sources of the installed torch), what a new user brings.

Each line: {"prompt": text, "source": relative path, "line": line number of the cut}.

    python python/make_eval_sets.py --out vsd_ext/assets/prompts
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vsd_ext import corpus


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="vsd_ext/assets/prompts")
    p.add_argument("--per-file", type=int, default=3)
    p.add_argument("--windows", type=int, default=72, help="mid-file windows per set")
    p.add_argument("--max-chars", type=int, default=1000)
    p.add_argument("--min-chars", type=int, default=300)
    p.add_argument("--min-after", type=int, default=300)
    p.add_argument("--headers", type=int, default=32)
    return p.parse_args(argv)


def midfile_windows(text: str, name: str, args) -> list[dict]:
    """Up to `args.per_file` windows of one file (`vsd_ext.corpus.midfile_windows`)."""
    return corpus.midfile_windows(text, name, args.per_file, args.max_chars, args.min_chars,
                                  args.min_after)


def build_set(files: list[Path], base: Path, args) -> list[dict]:
    """Windows of `files` in path order, round-robin until `args.windows` are collected."""
    per_file = [midfile_windows(corpus.read_source(f), f.relative_to(base).as_posix(), args)
                for f in files]
    out = []
    for round_ in range(args.per_file):
        for windows in per_file:
            if round_ < len(windows) and len(out) < args.windows:
                out.append(windows[round_])
    if len(out) < args.windows:
        raise SystemExit(f"only {len(out)} windows found, {args.windows} asked for")
    return out


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{path}: {len(rows)} prompts")


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    root = corpus.stdlib_root()
    heldout = corpus.stdlib_files("heldout")
    write_jsonl(build_set(heldout, root, args), out / "heldout_midfile_v1.jsonl")
    headers = [{"prompt": t, "source": f.relative_to(root).as_posix(), "line": 13}
               for f, t in zip(heldout, corpus.stdlib_texts("heldout"))
               if len(t.splitlines()) > 24][:args.headers]
    write_jsonl([{"prompt": "".join(h["prompt"].splitlines(keepends=True)[:12]),
                  "source": h["source"], "line": 13} for h in headers],
                out / "heldout_headers_v1.jsonl")
    base = Path(torch.__file__).parent.parent  # the site-packages holding torch
    write_jsonl(build_set(corpus.external_files(), base, args), out / "external_midfile_v1.jsonl")


if __name__ == "__main__":
    main()
