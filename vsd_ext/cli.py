"""The `vsd` command.

    vsd info      how the extension was built (versions, CUDA, architectures)
    vsd demo      the main job (see README.md)
    vsd train     train a drafter (eagle3 | auf | vsd)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vsd", description="Variational Speculative Decoding")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="how vsd_ext was built")
    info.set_defaults(func=_cmd_info)

    demo = sub.add_parser("demo", help="the main job: lossless tree verification demo")
    demo.add_argument("--trials", type=int, default=20000, help="verifications per mode")
    demo.add_argument("--vocab", type=int, default=256, help="vocabulary size of the synthetic tree")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    # ---- train (vsd_ext/training/cli_train.py) ----
    from .training.cli_train import add_train_command

    add_train_command(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
