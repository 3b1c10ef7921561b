"""The `vsd` command.

    vsd info      how the extension was built (versions, CUDA, architectures)
    vsd demo          the main job (see README.md)
    vsd verify-demo   lossless tree verification on a synthetic tree, all three modes
    vsd generate      speculative decoding with a target and a drafter (streams the output)
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
    from . import verify_demo

    rows = verify_demo.run(trials=args.trials, vocab=args.vocab, seed=args.seed)
    return 0 if all(r["lossless"] for r in rows) else 1


def _cmd_generate(args) -> int:
    import torch

    import vsd_ext
    from .decoding import OracleDrafter, TreeConfig, generate

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
    sizes = {"depth": args.depth, "topk": args.topk, "total_tokens": args.total_tokens}
    tree = TreeConfig(sampled=args.sampled, **{k: v for k, v in sizes.items() if v is not None})
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vsd", description="Variational Speculative Decoding")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="how vsd_ext was built")
    info.set_defaults(func=_cmd_info)

    for name, text in (("demo", "the main job (for now: the verification demo)"),
                       ("verify-demo", "lossless tree verification on a synthetic tree")):
        demo = sub.add_parser(name, help=text)
        demo.add_argument("--trials", type=int, default=20000, help="verifications per mode")
        demo.add_argument("--vocab", type=int, default=256, help="vocabulary of the synthetic tree")
        demo.add_argument("--seed", type=int, default=0)
        demo.set_defaults(func=_cmd_demo)

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
    gen.add_argument("--depth", type=int, help="draft tree depth (default: TreeConfig's)")
    gen.add_argument("--topk", type=int,
                     help="children per expanded node and nodes expanded per level")
    gen.add_argument("--total-tokens", type=int, help="draft nodes verified per step")
    gen.add_argument("--sampled", action="store_true",
                     help="sample the tree from the drafter (verified against its q; T > 0)")
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

    # ---- train (vsd_ext/training/cli_train.py) ----
    from .training.cli_train import add_train_command

    add_train_command(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
