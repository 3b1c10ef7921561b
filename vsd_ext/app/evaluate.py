"""`vsd eval`: τ, tokens/s and speedup of drafters against autoregressive decoding, with the
lossless check, as a table, report.json and report.png (`vsd_ext.eval`)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from .._version import __version__
from ..eval import (
    EVAL_SETS,
    LosslessConfig,
    evaluate,
    evaluation_prompts,
    format_table,
    read_prompts_jsonl,
    write_report,
)
from ..models import Drafter, load_drafter, load_target
from .arguments import check_length, count, non_negative_float, positive_int
from .options import add_tree_args, tree_from_args


def add_eval_command(sub) -> None:
    ev = sub.add_parser("eval", help="tau, tokens/s and speedup of drafters vs autoregressive "
                                     "decoding on held-out prompts (report.json + plot)")
    ev.add_argument("--target", default="default",
                    help="Hugging Face checkpoint directory, or 'default' (the embedded model)")
    ev.add_argument("--draft", action="append",
                    help="drafter to evaluate (repeatable): NAME=DIR, DIR, 'oracle' (the "
                         "target's own greedy continuation: the loop's ceiling) or 'untrained' "
                         "(a fresh EAGLE-3 head: the floor); autoregressive is always included")
    ev.add_argument("--prompts", help="a fixed evaluation set (heldout, external, headers: "
                                      "vsd_ext/assets/prompts) or a JSONL file, one "
                                      "{\"prompt\": ...} or {\"text\": ...} per line "
                                      "(default: heldout, mid-file windows of held-out files)")
    ev.add_argument("--num-prompts", type=positive_int, default=8)
    ev.add_argument("--temperature", type=non_negative_float, nargs="+", default=[0.0, 1.0])
    ev.add_argument("--max-new-tokens", type=positive_int, default=64)
    add_tree_args(ev)
    ev.add_argument("--draft-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="drafters' dtype (default: the target's; bfloat16 drafts faster on "
                         "CPUs with bf16 GEMMs and stays lossless)")
    ev.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="sampling seeds; T > 0 runs repeat for each")
    ev.add_argument("--lossless-samples", type=positive_int, default=LosslessConfig.samples,
                    help="rows of the T > 0 distribution test per method and temperature")
    ev.add_argument("--no-lossless-check", action="store_true",
                    help="skip the T > 0 distribution test (T = 0 outputs are still compared)")
    ev.add_argument("--out", default="runs/eval", help="directory for report.json and report.png")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--seed", type=int, default=0, help="seed of the 'untrained' drafter")
    ev.add_argument("--threads", type=count, default=0,
                    help="CPU threads while decoding (default: torch's; 1 is fastest for the "
                         "small default target on a busy machine)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=run_eval)


def parse_drafts(specs: list[str]) -> list[tuple[str, str]]:
    """--draft values → (name, what): ``name=DIR``, ``DIR`` (named after the directory),
    ``oracle`` or ``untrained`` (optionally ``name=oracle`` ...); names made unique."""
    out, seen = [], {}
    for spec in specs:
        name, sep, what = spec.partition("=")
        if not sep:
            what = spec
            name = what if what in ("oracle", "untrained") else Path(what).resolve().name
        if not name or not what:
            raise ValueError(f"--draft {spec!r}: expected NAME=DIR, DIR, 'oracle' or "
                             f"'untrained'")
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}-{seen[name]}", what))
    return out


def _fail(message) -> int:
    print(f"vsd eval: {message}", file=sys.stderr)
    return 2


def _load_drafters(args, target, drafts) -> dict:
    dtype = getattr(torch, args.draft_dtype) if args.draft_dtype else None
    drafters = {}
    for name, what in drafts:
        if what == "oracle":
            drafters[name] = "oracle"
        elif what == "untrained":
            drafters[name] = Drafter.for_target(target, seed=args.seed)
        else:
            drafters[name] = load_drafter(what, target, dtype=dtype)
    return drafters


def run_eval(args) -> int:
    try:
        drafts = parse_drafts(args.draft or [])
    except ValueError as err:
        return _fail(err)
    target = load_target(args.target, device=args.device)
    if target.tokenizer is None:
        return _fail("the target has no tokenizer.json")
    if args.prompts and args.prompts not in EVAL_SETS:
        texts = read_prompts_jsonl(args.prompts)[: args.num_prompts]
    else:
        texts = evaluation_prompts(args.prompts or "heldout", args.num_prompts)
    check_length(target, [target.tokenizer.encode(t).ids for t in texts], args.max_new_tokens)
    check = False if args.no_lossless_check else LosslessConfig(samples=args.lossless_samples)
    results = evaluate(target, _load_drafters(args, target, drafts), texts,
                       temperatures=args.temperature, max_new_tokens=args.max_new_tokens,
                       tree=tree_from_args(args), seeds=args.seeds, lossless_check=check,
                       threads=args.threads or None, progress=not args.no_progress)
    print(format_table(results), flush=True)
    extra = {"target": args.target, "drafts": dict(drafts),
             "prompts": args.prompts or "heldout", "device": args.device,
             "threads": args.threads or torch.get_num_threads(),
             "torch": torch.__version__, "vsd_ext": __version__}
    paths = write_report(results, args.out, extra)
    print(f"wrote {paths['json']} and {paths['plot']}")
    return 0 if all(r["lossless"] is not False for r in results) else 1
