"""Measure the library's default decoding (`TreeConfig()`, the drafter's decode settings)
against autoregressive decoding, side by side in one run, on the fixed evaluation prompt sets.

    python python/measure_defaults.py                     # default target, shipped drafter
    python python/measure_defaults.py --draft DIR --sets heldout external --num-prompts 72

For each prompt set and temperature: τ, tokens/s and the speedup over autoregressive decoding
with 95% bootstrap intervals, the tree the cost model chose, and the lossless check (T = 0:
token-identical to autoregressive decoding; T > 0: the χ² test of `vsd_ext.eval`). Batch 1,
one thread, the methods interleaved prompt by prompt (`vsd_ext.evaluate`); the machine's
load average (`os.getloadavg`) is printed before and after every set. Writes
``OUT/<set>/report.json`` and ``report.png`` (`vsd_ext.eval.write_report`) and
``OUT/summary.md``.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import vsd_ext
from vsd_ext.eval import (
    EVAL_SETS,
    LosslessConfig,
    evaluate,
    evaluation_prompts,
    format_table,
    write_report,
)
from vsd_ext.eval.report import tree_text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="default")
    p.add_argument("--draft", default="default", help="drafter directory or 'default'")
    p.add_argument("--draft-dtype", default="bfloat16")
    p.add_argument("--sets", nargs="+", default=["heldout", "external"], choices=sorted(EVAL_SETS))
    p.add_argument("--num-prompts", type=int, default=72)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--lossless-samples", type=int, default=256)
    p.add_argument("--out", default="runs/measure_defaults")
    return p.parse_args(argv)


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    target = vsd_ext.load_target(args.target)
    drafter = vsd_ext.load_drafter(args.draft, target, dtype=getattr(torch, args.draft_dtype))
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    summary = [f"# Default decoding vs autoregressive ({date})", "",
               f"target {args.target}, drafter {args.draft} ({args.draft_dtype}), "
               f"decode settings: {'yes' if drafter.decode_settings else 'none (prior)'}, "
               f"batch 1, one thread, {args.max_new_tokens} new tokens per prompt", ""]
    for name in args.sets:
        prompts = evaluation_prompts(name)[: args.num_prompts]
        before = load_text()
        print(f"== {name}: {len(prompts)} prompts; {before}", flush=True)
        results = evaluate(target, {"default": drafter}, prompts,
                           temperatures=args.temperatures, max_new_tokens=args.max_new_tokens,
                           lossless_check=LosslessConfig(samples=args.lossless_samples),
                           threads=1, progress=True)
        after = load_text()
        table = format_table(results)
        print(table, f"\n{after}", flush=True)
        write_report(results, out / name, {"set": name, "load_before": before,
                                           "load_after": after, "draft": args.draft})
        summary += [f"## {name} ({len(prompts)} prompts)", "", f"before: {before}; after: "
                    f"{after}", "", "```", table, "```", "",
                    "trees: " + ", ".join(f"T={r['temperature']:g}: {tree_text(r)}"
                                          for r in results if r["method"] == "default"), ""]
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print(f"wrote {out / 'summary.md'}")


if __name__ == "__main__":
    main()
