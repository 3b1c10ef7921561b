"""Evaluate a drafter against plain autoregressive decoding of the default target.

Measures τ (tokens emitted per target forward = accepted draft tokens + 1), tokens/s and the
speedup over autoregressive decoding at T = 0 and T = 1 on held-out prompts, with 95%
bootstrap confidence intervals and the lossless checks (T = 0: identical outputs; T > 0: the
sampled tokens follow the target's distribution), then writes report.json and report.png.

    python python/evaluate_drafter.py runs/vsd/drafter --out runs/eval
    python python/evaluate_drafter.py oracle            # the decoding loop's ceiling
    python python/evaluate_drafter.py untrained         # a fresh head: the floor

(`vsd eval` is the same with more options.)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import vsd_ext
from vsd_ext.eval import LosslessConfig, evaluate, format_table, heldout_prompts, write_report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("drafter", help="drafter directory, 'oracle' or 'untrained'")
    parser.add_argument("--out", default="runs/eval")
    parser.add_argument("--num-prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--lossless-samples", type=int, default=LosslessConfig.samples)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    target = vsd_ext.load_target("default")
    if args.drafter == "oracle":
        name, drafter = "oracle", "oracle"
    elif args.drafter == "untrained":
        name, drafter = "untrained", vsd_ext.Drafter.for_target(target)
    else:
        name, drafter = Path(args.drafter).resolve().name, vsd_ext.load_drafter(args.drafter,
                                                                                   target)
    results = evaluate(target, {name: drafter}, heldout_prompts(args.num_prompts),
                       temperatures=args.temperature, max_new_tokens=args.max_new_tokens,
                       lossless_check=LosslessConfig(samples=args.lossless_samples),
                       threads=args.threads)
    print(format_table(results))
    paths = write_report(results, args.out, extra={"drafter": args.drafter})
    print(f"wrote {paths['json']} and {paths['plot']}")


if __name__ == "__main__":
    main()
