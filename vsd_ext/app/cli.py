"""The `vsd` command.

    vsd info          how the extension was built (versions, CUDA, architectures)
    vsd demo          the main job (see README.md)
    vsd verify-demo   lossless tree verification on a synthetic tree, all three modes
    vsd generate      speculative decoding with a target and a drafter (streams the output)
    vsd eval          τ, tokens/s and speedup of drafters vs autoregressive decoding (report)
    vsd train         train a drafter (eagle3 | auf | vsd)
    vsd calibrate     fit a drafter's decode settings (ranking temperature, acceptance)

Each command's parser and body live in its own module (`demo.py`, `verify_demo.py`,
`generate.py`, `evaluate.py`, `train.py`, `calibrate.py`); `python -m vsd_ext` runs the same
command.
"""
from __future__ import annotations

import argparse
import json
import sys

from .._loader import build_info
from .calibrate import add_calibrate_command
from .demo import add_demo_command
from .evaluate import add_eval_command
from .generate import add_generate_command
from .train import add_train_command
from .verify_demo import add_verify_demo_command


def add_info_command(sub) -> None:
    info = sub.add_parser("info", help="how vsd_ext was built")
    info.set_defaults(func=run_info)


def run_info(args) -> int:
    print(json.dumps(build_info(), indent=2))
    return 0


COMMANDS = (add_info_command, add_demo_command, add_verify_demo_command, add_generate_command,
            add_eval_command, add_train_command, add_calibrate_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vsd", description="Variational Speculative Decoding")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
