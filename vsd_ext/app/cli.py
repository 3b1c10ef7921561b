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
command. A user error prints one line naming the argument or file (`arguments.py`) and exits
with status 2; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys

from .._loader import build_info
from .arguments import Parser
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
    parser = Parser(prog="vsd", description="Variational Speculative Decoding")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (any position on the line)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    return parser


def main(argv=None) -> int:
    """Run one command. A user error (a bad argument, file or config: ValueError, OSError)
    prints one line naming it and returns 2; an interrupted command returns 130; with
    --debug errors are raised with their traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        if debug:
            raise
        print(f"vsd {args.command}: interrupted{f' ({err})' if str(err) else ''}",
              file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        print(f"vsd {args.command}: {_describe(err)}", file=sys.stderr)
        return 2


def _describe(err: Exception) -> str:
    """One line for an error: the message of a user error (it names the argument or file),
    the exception type too for anything else."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (ValueError, OSError)):
        return text
    return f"{type(err).__name__}: {text} (an internal error: rerun with --debug and report it)"
