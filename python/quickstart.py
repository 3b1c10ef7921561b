"""Quickstart: speculative decoding with the small target that ships with vsd_ext.

Loads the embedded default target (a 16-layer Llama trained on the standard library's
source), an EAGLE-3 drafter (the one shipped for it, a directory such as the output of
`vsd train`, or an untrained head), and continues a held-out prompt speculatively with the
library's defaults: the draft tree is sized by the cost model (the drafter's decode settings,
the costs measured on this machine), which decodes plainly when drafting would not pay. τ is
tokens emitted per target forward (accepted draft tokens + 1): about 1 for an untrained head.

    python python/quickstart.py                      # the shipped drafter ("default")
    python python/quickstart.py default-vsd          # the shipped VSD drafter
    python python/quickstart.py runs/vsd             # a drafter directory
    python python/quickstart.py untrained            # a fresh EAGLE-3 head
    python python/quickstart.py --temperature 1.0 --max-new-tokens 64
"""
from __future__ import annotations

import argparse

import torch

import vsd_ext


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("drafter", nargs="?", default="default",
                        help="drafter directory, 'default', 'default-vsd' or 'untrained'")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1 is fastest for this small model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    target = vsd_ext.load_target("default")
    if args.drafter == "untrained":
        drafter = vsd_ext.Drafter.for_target(target)
    else:
        drafter = vsd_ext.load_drafter(args.drafter, target)

    prompt = vsd_ext.corpus.prompts("heldout", limit=1)[0]  # unseen code, 12 lines
    ids = target.tokenizer.encode(prompt).ids
    out = vsd_ext.generate(target, drafter, ids, args.max_new_tokens, args.temperature,
                           ignore_eos=True, generator=torch.Generator().manual_seed(0))

    print(prompt + target.tokenizer.decode(out.tokens[0]))
    s = out.stats
    tree = s["plan"]["tree"]
    shape = ("autoregressive (drafting would not pay)" if tree is None else
             f"tree depth {tree['depth']}, top-k {tree['topk']}, {tree['total_tokens']} nodes")
    print(f"\ntau = {s['tau']:.2f} tokens per target forward (accepted + 1) | "
          f"{s['new_tokens']} tokens in {s['target_forwards']} target forwards | "
          f"{s['tokens_per_second']:.1f} tok/s | T = {args.temperature:g} | {shape}")


if __name__ == "__main__":
    main()
