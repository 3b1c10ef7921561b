"""Command-line options shared by several `vsd` commands: the draft tree."""
from __future__ import annotations

from ..decoding import TreeConfig
from .arguments import positive_int


def add_tree_args(parser) -> None:
    """The draft-tree options of `vsd generate` and `vsd eval` (unset: TreeConfig's)."""
    parser.add_argument("--depth", type=positive_int,
                        help="draft tree depth (default: TreeConfig's)")
    parser.add_argument("--topk", type=positive_int,
                        help="children per expanded node and nodes expanded per level")
    parser.add_argument("--total-tokens", type=positive_int,
                        help="draft nodes verified per step")
    parser.add_argument("--sampled", action="store_true",
                        help="sample trees from the drafter at T > 0 (verified against its q)")


def tree_from_args(args) -> TreeConfig:
    sizes = {"depth": args.depth, "topk": args.topk, "total_tokens": args.total_tokens}
    return TreeConfig(sampled=args.sampled, **{k: v for k, v in sizes.items() if v is not None})
