"""`vsd generate`: speculative decoding of prompts, streamed, with a one-line stats summary."""
from __future__ import annotations

import sys

import torch

from ..decoding import OracleDrafter, generate
from ..decoding.oracle import DEFAULT_DEPTH
from ..models import load_drafter, load_target
from .arguments import check_length, count, non_negative_float, positive_int
from .options import add_tree_args, tree_from_args


def add_generate_command(sub) -> None:
    gen = sub.add_parser("generate", help="speculative decoding of prompts (streams the output)")
    gen.add_argument("--target", default="default",
                     help="Hugging Face checkpoint directory, or 'default' (the embedded model)")
    gen.add_argument("--draft", default=None,
                     help="EAGLE-3 drafter directory, 'default' / 'default-vsd' (the drafters "
                          "shipped for the default target), 'oracle' (the target's own greedy "
                          "continuation, the loop's ceiling) or 'none' (autoregressive "
                          "decoding); default: 'default' with --target default, else 'none'")
    gen.add_argument("--draft-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="the drafter's dtype (default: the target's)")
    gen.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    gen.add_argument("--prompts-file", help="one prompt per line (\\n for a newline)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=128)
    gen.add_argument("--temperature", type=non_negative_float, default=0.0, help="0: greedy")
    add_tree_args(gen)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--compare", action="store_true",
                     help="also decode autoregressively and report the speedup")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--threads", type=count, default=0,
                     help="CPU threads (default: torch's; 1 is fastest for the small default "
                          "target on a busy machine)")
    gen.set_defaults(func=run_generate)


def _fail(message: str) -> int:
    print(f"vsd generate: {message}", file=sys.stderr)
    return 2


def _prompt_texts(args) -> list[str]:
    texts = list(args.prompt or [])
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                texts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--prompts-file {args.prompts_file}: cannot be read as UTF-8 "
                             f"text ({type(err).__name__})") from err
    return texts


def _drafter(args, target, prompts, depth):
    draft = args.draft or ("default" if args.target == "default" else "none")
    if draft == "none":
        return None
    if draft == "oracle":
        return OracleDrafter.from_target(target, prompts, args.max_new_tokens,
                                         depth or DEFAULT_DEPTH)
    dtype = getattr(torch, args.draft_dtype) if args.draft_dtype else None
    return load_drafter(draft, target, dtype=dtype)


class _Stream:
    """callback(row, new_tokens) of one prompt: prints the text as it grows."""

    def __init__(self, decode):
        self.decode, self.tokens, self.text = decode, [], ""

    def __call__(self, row, new) -> None:
        self.tokens += new
        text = self.decode(self.tokens)
        print(text[len(self.text):], end="", flush=True)
        self.text = text


def _plan_text(plan) -> str:
    if plan is None:
        return ""
    tree = plan["tree"]
    if tree is None:
        return " | autoregressive (the cost model expects no speedup from drafting)"
    kind = "sampled" if tree["sampled"] else "top-k"
    return (f" | tree depth {tree['depth']} topk {tree['topk']} {tree['total_tokens']} nodes "
            f"{kind}")


def _stats_line(args, stats, target, prompts, drafter, gen) -> str:
    line = (f"[vsd] tau {stats['tau']:.2f} (accepted + 1 per target forward) | "
            f"{stats['tokens_per_second']:.1f} tok/s | {stats['new_tokens']} tokens, "
            f"{stats['target_forwards']} target forwards, batch {stats['batch_size']}, "
            f"T = {args.temperature:g}, mode {stats['mode']}{_plan_text(stats['plan'])}")
    if args.compare and drafter is not None:
        base = generate(target, None, prompts, args.max_new_tokens, args.temperature,
                        stop=args.stop, generator=gen, ignore_eos=args.ignore_eos)
        rate = base.stats["tokens_per_second"]
        line += (f" | speedup {stats['tokens_per_second'] / rate:.2f}x vs autoregressive "
                 f"({rate:.1f} tok/s)")
    return line


def run_generate(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(args.target, device=args.device)
    if target.tokenizer is None:
        return _fail("the target has no tokenizer.json")
    texts = _prompt_texts(args)
    if not texts:
        return _fail("give --prompt TEXT or --prompts-file FILE")
    prompts = [target.tokenizer.encode(t).ids for t in texts]
    if not all(prompts):
        return _fail(f"--prompt {texts[prompts.index([])]!r}: the prompt has no tokens")
    check_length(target, prompts, args.max_new_tokens)
    tree = tree_from_args(args)
    drafter = _drafter(args, target, prompts, tree.depth)
    decode = target.tokenizer.decode
    single = len(prompts) == 1
    gen = torch.Generator(device=target.device).manual_seed(args.seed)
    if single:
        print(texts[0], end="", flush=True)
    out = generate(target, drafter, prompts, args.max_new_tokens, args.temperature, tree,
                   stop=args.stop, generator=gen, ignore_eos=args.ignore_eos,
                   callback=_Stream(decode) if single else None,
                   decode_settings=args.decode_settings)
    if single:
        print(flush=True)
    else:
        for text, tokens in zip(texts, out.tokens):
            print(f"--- {text!r}\n{text}{decode(tokens)}", flush=True)
    print(_stats_line(args, out.stats, target, prompts, drafter, gen), file=sys.stderr)
    return 0
