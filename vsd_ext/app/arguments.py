"""Argument checking of the `vsd` commands: one-line errors that name the argument.

`Parser` is the `argparse.ArgumentParser` of every command: a bad argument prints
`vsd <command>: argument --flag: why` on one line (no usage block) and exits with status
2. The type functions below reject values a command cannot use (negative counts, NaN
temperatures, ...) before anything is loaded.
"""
from __future__ import annotations

import argparse
import math
import sys


class Parser(argparse.ArgumentParser):
    """argparse, with errors on one line (`--help` still prints the usage)."""

    def error(self, message: str):
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _integer(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _integer(text, 1)


def count(text: str) -> int:
    """An integer >= 0."""
    return _integer(text, 0)


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (temperatures, minutes)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def check_length(target, prompts: list[list[int]], max_new_tokens: int,
                 flag: str = "--max-new-tokens") -> None:
    """The longest prompt plus `max_new_tokens` must fit the target's positions
    (`max_position_embeddings`): a ValueError naming `flag` otherwise."""
    limit = target.max_positions
    longest = max((len(p) for p in prompts), default=0)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(f"{flag} {max_new_tokens}: with the longest prompt ({longest} "
                         f"tokens) it passes the target's max_position_embeddings ({limit})")
