"""The `vsd` command.

    vsd info          how the extension was built (versions, CUDA, architectures)
    vsd demo          the main job (see README.md)
    vsd verify-demo   lossless tree verification on a synthetic tree, all three modes
    vsd generate      speculative decoding with a target and a drafter (streams the output)
    vsd eval          τ, tokens/s and speedup of drafters vs autoregressive decoding (report)
    vsd train         train a drafter (eagle3 | auf | vsd)
"""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    import vsd_ext

    print(json.dumps(vsd_ext.build_info(), indent=2))
    return 0


def _cmd_demo(args) -> int:
    from .demo import DemoConfig, run

    fields = DemoConfig.__dataclass_fields__
    cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in fields},
                     progress=not args.no_progress)
    report = run(cfg)
    return 0 if all(r["lossless"] is not False for r in report["results"]) else 1


def _cmd_verify_demo(args) -> int:
    from . import verify_demo

    rows = verify_demo.run(trials=args.trials, vocab=args.vocab, seed=args.seed)
    return 0 if all(r["lossless"] for r in rows) else 1


def _cmd_generate(args) -> int:
    import torch

    import vsd_ext
    from .decoding import OracleDrafter, generate

    if args.threads:
        torch.set_num_threads(args.threads)
    target = vsd_ext.load_target(args.target, device=args.device)
    if target.tokenizer is None:
        print("vsd generate: the target has no tokenizer.json", file=sys.stderr)
        return 2
    if args.draft is None:
        drafter = None
    elif args.draft == "oracle":
        drafter = "oracle"
    else:
        drafter = vsd_ext.load_drafter(args.draft, target)
    texts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            texts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    if not texts:
        print("vsd generate: give --prompt TEXT or --prompts-file FILE", file=sys.stderr)
        return 2
    prompts = [target.tokenizer.encode(t).ids for t in texts]
    tree = _tree_from_args(args)
    if drafter == "oracle":
        drafter = OracleDrafter.from_target(target, prompts, args.max_new_tokens, tree.depth)
    decode = target.tokenizer.decode
    streamed = {"tokens": [], "text": ""}

    def stream(row, new):  # one prompt: print the text as it grows
        streamed["tokens"] += new
        text = decode(streamed["tokens"])
        print(text[len(streamed["text"]):], end="", flush=True)
        streamed["text"] = text

    gen = torch.Generator(device=target.device).manual_seed(args.seed)
    if len(prompts) == 1:
        print(texts[0], end="", flush=True)
    out = generate(target, drafter, prompts, args.max_new_tokens, args.temperature, tree,
                   stop=args.stop, generator=gen, ignore_eos=args.ignore_eos,
                   callback=stream if len(prompts) == 1 else None)
    if len(prompts) == 1:
        print(flush=True)
    else:
        for text, tokens in zip(texts, out.tokens):
            print(f"--- {text!r}\n{text}{decode(tokens)}", flush=True)
    s = out.stats
    line = (f"[vsd] tau {s['tau']:.2f} (accepted + 1 per target forward) | "
            f"{s['tokens_per_second']:.1f} tok/s | {s['new_tokens']} tokens, "
            f"{s['target_forwards']} target forwards, batch {s['batch_size']}, "
            f"T = {args.temperature:g}, mode {s['mode']}")
    if args.compare and drafter is not None:
        base = generate(target, None, prompts, args.max_new_tokens, args.temperature,
                        stop=args.stop, generator=gen, ignore_eos=args.ignore_eos)
        rate = base.stats["tokens_per_second"]
        line += f" | speedup {s['tokens_per_second'] / rate:.2f}x vs autoregressive " \
                f"({rate:.1f} tok/s)"
    print(line, file=sys.stderr)
    return 0


def _add_tree_args(parser) -> None:
    """The draft-tree options of `vsd generate` and `vsd eval` (unset: TreeConfig's)."""
    parser.add_argument("--depth", type=int, help="draft tree depth (default: TreeConfig's)")
    parser.add_argument("--topk", type=int,
                        help="children per expanded node and nodes expanded per level")
    parser.add_argument("--total-tokens", type=int, help="draft nodes verified per step")
    parser.add_argument("--sampled", action="store_true",
                        help="sample trees from the drafter at T > 0 (verified against its q)")


def _tree_from_args(args):
    from .draft_tree import TreeConfig

    sizes = {"depth": args.depth, "topk": args.topk, "total_tokens": args.total_tokens}
    return TreeConfig(sampled=args.sampled, **{k: v for k, v in sizes.items() if v is not None})


def _parse_drafts(specs: list[str]) -> list[tuple[str, str]]:
    """--draft values → (name, what): ``name=DIR``, ``DIR`` (named after the directory),
    ``oracle`` or ``untrained`` (optionally ``name=oracle`` ...); names made unique."""
    from pathlib import Path

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


def _cmd_eval(args) -> int:
    import torch

    import vsd_ext
    from .evaluation import (LosslessConfig, evaluate, format_table, heldout_prompts,
                             read_prompts_jsonl, write_report)

    try:
        drafts = _parse_drafts(args.draft or [])
    except ValueError as err:
        print(f"vsd eval: {err}", file=sys.stderr)
        return 2
    target = vsd_ext.load_target(args.target, device=args.device)
    if target.tokenizer is None:
        print("vsd eval: the target has no tokenizer.json", file=sys.stderr)
        return 2
    if args.prompts:
        texts = read_prompts_jsonl(args.prompts)[: args.num_prompts]
    else:
        texts = heldout_prompts(args.num_prompts)
    drafters = {}
    for name, what in drafts:
        if what == "oracle":
            drafters[name] = "oracle"
        elif what == "untrained":
            drafters[name] = vsd_ext.Drafter.for_target(target, seed=args.seed)
        else:
            drafters[name] = vsd_ext.load_drafter(
                what, target, dtype=getattr(torch, args.draft_dtype) if args.draft_dtype else None)
    tree = _tree_from_args(args)
    check = False if args.no_lossless_check else LosslessConfig(samples=args.lossless_samples)
    results = evaluate(target, drafters, texts, temperatures=args.temperature,
                       max_new_tokens=args.max_new_tokens, tree=tree, seeds=args.seeds,
                       lossless_check=check, threads=args.threads or None,
                       progress=not args.no_progress)
    print(format_table(results), flush=True)
    extra = {"target": args.target, "drafts": dict(drafts),
             "prompts": args.prompts or "built-in held-out", "device": args.device,
             "threads": args.threads or torch.get_num_threads(),
             "torch": torch.__version__, "vsd_ext": vsd_ext.__version__}
    paths = write_report(results, args.out, extra)
    print(f"wrote {paths['json']} and {paths['plot']}")
    return 0 if all(r["lossless"] is not False for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vsd", description="Variational Speculative Decoding")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="how vsd_ext was built")
    info.set_defaults(func=_cmd_info)

    from .demo import DemoConfig

    dflt = DemoConfig()
    demo = sub.add_parser("demo", help="the main job: fine-tune eagle3 and vsd drafters for the "
                                       "default target, evaluate them against autoregressive "
                                       "decoding at T = 0 and 1 (report.json + plot)")
    demo.add_argument("--out", default=dflt.out, help="output directory (reused when re-run)")
    demo.add_argument("--minutes", type=float, default=dflt.minutes,
                      help="wall-clock training budget of each fine-tune")
    demo.add_argument("--rows", type=int, default=dflt.rows, help="regenerated training rows")
    demo.add_argument("--num-prompts", type=int, default=dflt.num_prompts,
                      help="held-out prompts of the evaluation")
    demo.add_argument("--max-new-tokens", type=int, default=dflt.max_new_tokens)
    demo.add_argument("--depth", type=int, default=dflt.depth, help="draft tree depth")
    demo.add_argument("--topk", type=int, default=dflt.topk,
                      help="children per expanded node (1: a chain)")
    demo.add_argument("--total-tokens", type=int, default=dflt.total_tokens,
                      help="draft nodes verified per step")
    demo.add_argument("--threads", type=int, default=dflt.threads,
                      help="CPU threads of data and training (0: torch's default)")
    demo.add_argument("--eval-threads", type=int, default=dflt.eval_threads,
                      help="CPU threads of the timed decoding (0: torch's default; 1 is "
                           "fastest for the small default target)")
    demo.add_argument("--draft-dtype", default=dflt.draft_dtype,
                      choices=["float32", "bfloat16", "float16"],
                      help="the drafters' dtype while decoding (the target stays fp32)")
    demo.add_argument("--seed", type=int, default=dflt.seed)
    demo.add_argument("--fresh", action="store_true",
                      help="start over (default: reuse the data and drafters in --out)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    vdemo = sub.add_parser("verify-demo", help="lossless tree verification on a synthetic tree")
    vdemo.add_argument("--trials", type=int, default=20000, help="verifications per mode")
    vdemo.add_argument("--vocab", type=int, default=256, help="vocabulary of the synthetic tree")
    vdemo.add_argument("--seed", type=int, default=0)
    vdemo.set_defaults(func=_cmd_verify_demo)

    gen = sub.add_parser("generate", help="speculative decoding of prompts (streams the output)")
    gen.add_argument("--target", default="default",
                     help="Hugging Face checkpoint directory, or 'default' (the embedded model)")
    gen.add_argument("--draft", default=None,
                     help="EAGLE-3 drafter directory ('oracle': the target's own greedy "
                          "continuation, the loop's ceiling); none: autoregressive decoding")
    gen.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    gen.add_argument("--prompts-file", help="one prompt per line (\\n for a newline)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    _add_tree_args(gen)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--compare", action="store_true",
                     help="also decode autoregressively and report the speedup")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--threads", type=int, default=0,
                     help="CPU threads (default: torch's; 1 is fastest for the small default "
                          "target on a busy machine)")
    gen.set_defaults(func=_cmd_generate)

    from .lossless import LosslessConfig

    ev = sub.add_parser("eval", help="tau, tokens/s and speedup of drafters vs autoregressive "
                                     "decoding on held-out prompts (report.json + plot)")
    ev.add_argument("--target", default="default",
                    help="Hugging Face checkpoint directory, or 'default' (the embedded model)")
    ev.add_argument("--draft", action="append",
                    help="drafter to evaluate (repeatable): NAME=DIR, DIR, 'oracle' (the "
                         "target's own greedy continuation: the loop's ceiling) or 'untrained' "
                         "(a fresh EAGLE-3 head: the floor); autoregressive is always included")
    ev.add_argument("--prompts", help="JSONL file, one {\"prompt\": ...} or {\"text\": ...} per "
                                      "line (default: the built-in held-out prompts)")
    ev.add_argument("--num-prompts", type=int, default=8)
    ev.add_argument("--temperature", type=float, nargs="+", default=[0.0, 1.0])
    ev.add_argument("--max-new-tokens", type=int, default=64)
    _add_tree_args(ev)
    ev.add_argument("--draft-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="drafters' dtype (default: the target's; bfloat16 drafts faster on "
                         "CPUs with bf16 GEMMs and stays lossless)")
    ev.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="sampling seeds; T > 0 runs repeat for each")
    ev.add_argument("--lossless-samples", type=int, default=LosslessConfig.samples,
                    help="rows of the T > 0 distribution test per method and temperature")
    ev.add_argument("--no-lossless-check", action="store_true",
                    help="skip the T > 0 distribution test (T = 0 outputs are still compared)")
    ev.add_argument("--out", default="runs/eval", help="directory for report.json and report.png")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--seed", type=int, default=0, help="seed of the 'untrained' drafter")
    ev.add_argument("--threads", type=int, default=0,
                    help="CPU threads while decoding (default: torch's; 1 is fastest for the "
                         "small default target on a busy machine)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=_cmd_eval)

    # ---- train (vsd_ext/training/cli_train.py) ----
    from .training.cli_train import add_train_command

    add_train_command(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
