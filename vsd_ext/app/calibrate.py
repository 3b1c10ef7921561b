"""`vsd calibrate`: fit a drafter's decode settings and write its `decode_settings.json`.

    vsd calibrate --target default --draft DIR [--prompts FILE.jsonl] [--num-prompts N]

Measures the drafter's per-depth acceptance (T = 0 and each --temperature) and chooses its
ranking temperature by τ over --grid (`vsd_ext.decoding.calibrate`), on the tune files'
mid-file windows unless --prompts names a JSONL file. `load_drafter` and `vsd generate` /
`vsd eval` apply the written settings by default.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from .. import corpus
from ..decoding.calibrate import GRID, calibrate_drafter
from ..eval import read_prompts_jsonl
from ..models import load_target
from ..models.checkpoint import DEFAULT_DRAFTERS
from .arguments import count, positive_float, positive_int


def add_calibrate_command(sub) -> None:
    cal = sub.add_parser("calibrate", help="fit a drafter's decode settings (ranking "
                                           "temperature, per-depth acceptance)")
    cal.add_argument("--target", default="default",
                     help="Hugging Face checkpoint directory, or 'default' (the embedded model)")
    cal.add_argument("--draft", required=True,
                     help="drafter directory ('default' / 'default-vsd': the shipped ones)")
    cal.add_argument("--prompts", help="JSONL file of prompts (default: mid-file windows of "
                                       "the tune files, vsd_ext.corpus.tune_prompts)")
    cal.add_argument("--num-prompts", type=positive_int, default=48)
    cal.add_argument("--max-new-tokens", type=positive_int, default=48)
    cal.add_argument("--temperature", type=positive_float, nargs="+", default=[1.0],
                     help="T > 0 of the sampled acceptance tables (T = 0 is always measured)")
    cal.add_argument("--grid", type=positive_float, nargs="+", default=list(GRID),
                     help="ranking temperatures tried")
    cal.add_argument("--out", help="file or directory written (default: the drafter's "
                                   "directory)")
    cal.add_argument("--draft-dtype", default="bfloat16",
                     choices=["float32", "bfloat16", "float16"])
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--threads", type=count, default=0, help="CPU threads (default: torch's)")
    cal.set_defaults(func=run_calibrate)


def run_calibrate(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(args.target, device=args.device)
    if target.tokenizer is None:
        print("vsd calibrate: the target has no tokenizer.json", file=sys.stderr)
        return 2
    prompts = source = None
    if args.prompts:
        prompts = read_prompts_jsonl(args.prompts)[: args.num_prompts]
        source = f"{args.prompts} (first {len(prompts)})"
    else:
        prompts = corpus.tune_prompts(args.num_prompts)
        source = f"vsd_ext.corpus.tune_prompts({args.num_prompts}): tune files, mid-file"
    draft = DEFAULT_DRAFTERS.get(args.draft, args.draft)
    start = time.perf_counter()
    settings = calibrate_drafter(
        target, draft, prompts, out=args.out, max_new_tokens=args.max_new_tokens,
        temperatures=[0.0, *args.temperature], grid=args.grid, seed=args.seed,
        dtype=getattr(torch, args.draft_dtype), prompts_source=source,
        progress=lambda m: print(f"[{time.perf_counter() - start:5.0f} s] {m}", flush=True))
    fit = settings["fit"]
    print(json.dumps({"ranking_temperature": settings["ranking_temperature"],
                      "grid": fit["grid"], "tau": fit["tau"], "nll_best": fit["nll_best"]}))
    print(f"wrote {args.out or draft}")
    return 0
