"""Checks of `generate`'s public arguments: a bad prompt, length, temperature or tree is a
ValueError naming the argument before anything runs."""
from __future__ import annotations

import math
import numbers

import torch

from .draft_tree import TreeConfig


def _token_lists(prompts) -> list[list]:
    """One prompt (a list of ids) or several → a list of lists (element types unchecked)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() not in (1, 2) or prompts.is_floating_point() or prompts.is_complex():
            raise ValueError(f"prompts: expected a [T] or [B, T] integer tensor, got "
                             f"{prompts.dtype} {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts: expected a list of token ids or a list of such lists, "
                         f"got {type(prompts).__name__} {prompts!r:.60}")
    if all(isinstance(p, (list, tuple)) for p in prompts):
        return [list(p) for p in prompts]
    return [list(prompts)]


def check_generation(target, prompts, max_new_tokens, temperature,
                     stop=None) -> list[list[int]]:
    """The prompts as lists of ints, after checking every argument of `generate` that the
    loop takes on trust: ids in [0, vocab), non-empty prompts, an integer max_new_tokens
    >= 1 that fits `target.max_positions` after the longest prompt, a finite temperature
    >= 0, stop: None or a list of token ids and strings."""
    if stop is not None and (not isinstance(stop, (list, tuple)) or not all(
            isinstance(s, str) or (isinstance(s, numbers.Integral) and not isinstance(s, bool))
            for s in stop)):
        raise ValueError(f"stop must be a list of token ids and strings, got {stop!r}")
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    out = []
    for b, prompt in enumerate(_token_lists(prompts)):
        if not prompt:
            raise ValueError(f"prompts: prompt {b} is empty (expected one or more token ids)")
        for t in prompt:
            if not isinstance(t, numbers.Integral) or isinstance(t, bool) \
                    or not 0 <= t < target.vocab_size:
                raise ValueError(f"prompts: prompt {b} holds {t!r}, not a token id in [0, "
                                 f"{target.vocab_size})")
        out.append([int(t) for t in prompt])
    limit, longest = target.max_positions, max(len(p) for p in out)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens {max_new_tokens}: with the longest prompt "
                         f"({longest} tokens) it passes the target's max_position_embeddings "
                         f"({limit})")
    return out


def check_tree(tree) -> TreeConfig:
    """`generate`'s ``tree``: a `TreeConfig`, or None for ``TreeConfig()`` (the cost model
    sizes it)."""
    if tree is None:
        return TreeConfig()
    if not isinstance(tree, TreeConfig):
        raise ValueError(f"tree: expected a TreeConfig or None, got {type(tree).__name__} "
                         f"{tree!r:.60}")
    return tree
