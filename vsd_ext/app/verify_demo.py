"""A self-contained demonstration of lossless tree verification (`vsd verify-demo`).

One synthetic "context": a tree of draft nodes whose target distributions p and draft
distributions q are fixed (q is p seen through noise, as a trained-but-imperfect drafter is).
Many independent trials verify that same tree with fresh randomness, in each mode. Because every
mode is lossless, the first emitted token of the trials must follow p at the root, whatever the
drafter did; the demo measures that (total-variation distance against its sampling-noise level),
the mean accepted length τ (accepted + 1, EAGLE's convention) and the op's throughput.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..eval.stats import chi_square_p_value
from ..ops.verify import verify_tree
from ..reference.verify_tree import verify_tree as verify_tree_reference
from .arguments import positive_int


@dataclass
class DemoTree:
    parents: torch.Tensor        # [N] int64, -1 at the root
    target_logits: torch.Tensor  # [N, V] fp32
    draft_probs: torch.Tensor    # [N, V] fp32, q at each node


def build_tree(branching=(4, 2, 2, 1), vocab=256, noise=1.0, seed=0) -> DemoTree:
    """A full tree with `branching[d]` children per node at depth d, random p and noisy q."""
    g = torch.Generator().manual_seed(seed)
    parents, frontier = [-1], [0]
    for width in branching:
        nxt = []
        for node in frontier:
            for _ in range(width):
                parents.append(node)
                nxt.append(len(parents) - 1)
        frontier = nxt
    n = len(parents)
    target_logits = 2.5 * torch.randn(n, vocab, generator=g)
    draft_logits = target_logits + noise * torch.randn(n, vocab, generator=g)
    return DemoTree(torch.tensor(parents), target_logits, torch.softmax(draft_logits, -1))


def draft_children(tree: DemoTree, trials: int, mode: str, g: torch.Generator) -> torch.Tensor:
    """Tokens of every non-root node for `trials` copies of the tree, [trials, N].

    The children of a node are its drafter's top-k (deterministic modes) or k draws without
    replacement from q (sampled mode; Gumbel-top-k), as a dynamic-tree drafter would emit.
    """
    n, vocab = tree.target_logits.shape
    tokens = torch.zeros(trials, n, dtype=torch.long)
    children = [[] for _ in range(n)]
    for i, p in enumerate(tree.parents.tolist()):
        if p >= 0:
            children[p].append(i)
    for node, kids in enumerate(children):
        if not kids:
            continue
        logq = tree.draft_probs[node].log().expand(trials, vocab)
        if mode == "sampled":
            u = torch.rand(trials, vocab, generator=g, dtype=torch.float64).clamp_min(1e-300)
            logq = logq - (-u.log()).log().float()
        tokens[:, kids] = logq.topk(len(kids), dim=-1).indices
    return tokens


def add_verify_demo_command(sub) -> None:
    vdemo = sub.add_parser("verify-demo", help="lossless tree verification on a synthetic tree")
    vdemo.add_argument("--trials", type=positive_int, default=20000,
                       help="verifications per mode")
    vdemo.add_argument("--vocab", type=positive_int, default=256,
                       help="vocabulary of the synthetic tree")
    vdemo.add_argument("--seed", type=int, default=0)
    vdemo.set_defaults(func=run_verify_demo)


def run_verify_demo(args) -> int:
    widest = max(build_tree.__defaults__[0])
    if args.vocab < widest:
        raise ValueError(f"--vocab must be >= {widest} (the demo tree's widest node has "
                         f"{widest} children), got {args.vocab}")
    rows = run(trials=args.trials, vocab=args.vocab, seed=args.seed)
    return 0 if all(r["lossless"] for r in rows) else 1


def _tv_noise_level(probs: torch.Tensor, trials: int) -> float:
    """Expected TV distance of an empirical distribution of `trials` draws from `probs`."""
    return 0.5 * float((probs * (1 - probs) * 2 / (math.pi * trials)).sqrt().sum())


def run(trials: int = 20000, vocab: int = 256, seed: int = 0, print_fn=print) -> list[dict]:
    tree = build_tree(vocab=vocab, seed=seed)
    n = tree.parents.numel()
    g = torch.Generator().manual_seed(seed + 1)
    rows = []
    for mode, temperature in (("greedy", 0.0), ("target_only", 1.0), ("sampled", 1.0)):
        tokens = draft_children(tree, trials, mode, g)
        logits = tree.target_logits.expand(trials, n, vocab).contiguous()
        parents = tree.parents.expand(trials, n).contiguous()
        q = tree.draft_probs.expand(trials, n, vocab).contiguous() if mode == "sampled" else None
        uniforms = torch.rand(trials, n + 1, generator=g, dtype=torch.float64)
        t0 = time.perf_counter()
        nodes, emitted, accepted = verify_tree(logits, tokens, parents, uniforms, q, mode=mode,
                                               temperature=max(temperature, 1.0))
        op_seconds = time.perf_counter() - t0
        sub = slice(0, min(trials, 200))
        t0 = time.perf_counter()
        ref = verify_tree_reference(logits[sub], tokens[sub], parents[sub], uniforms[sub],
                                    None if q is None else q[sub], mode=mode,
                                    temperature=max(temperature, 1.0))
        ref_seconds = (time.perf_counter() - t0) * trials / logits[sub].shape[0]
        outputs = (nodes[sub], emitted[sub], accepted[sub])
        agrees = all(torch.equal(a, b) for a, b in zip(outputs, ref))
        first = emitted[:, 0]
        if mode == "greedy":
            expected = torch.zeros(vocab)
            expected[tree.target_logits[0].argmax()] = 1.0
        else:
            expected = torch.softmax(tree.target_logits[0].double(), -1).float()
        counts = torch.bincount(first, minlength=vocab)
        tv = 0.5 * float((counts.float() / trials - expected).abs().sum())
        p_value = chi_square_p_value(counts, expected)
        rows.append({"mode": mode, "temperature": temperature,
                     "tau": float(accepted.float().mean()) + 1.0,
                     "tv_first_token": tv, "tv_noise_level": _tv_noise_level(expected, trials),
                     "chi_square_p": p_value,
                     "lossless": p_value > 1e-4 and agrees,
                     "matches_reference": agrees,
                     "op_rows_per_s": trials / op_seconds,
                     "reference_rows_per_s": trials / ref_seconds})
    print_fn(f"verify_tree on one {n}-node tree, vocab {vocab}, {trials} trials per mode "
             f"(τ = accepted + 1 per verification)")
    print_fn(f"{'mode':<12} {'T':>3} {'τ':>6} {'TV(first token, p)':>20} {'noise':>7} "
             f"{'χ² p':>7} {'lossless':>9} {'op rows/s':>11} {'ref rows/s':>11}")
    for r in rows:
        print_fn(f"{r['mode']:<12} {r['temperature']:>3.0f} {r['tau']:>6.3f} "
                 f"{r['tv_first_token']:>20.4f} {r['tv_noise_level']:>7.4f} "
                 f"{r['chi_square_p']:>7.3f} "
                 f"{'yes' if r['lossless'] else 'NO':>9} {r['op_rows_per_s']:>11.0f} "
                 f"{r['reference_rows_per_s']:>11.0f}")
    return rows
