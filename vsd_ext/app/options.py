"""Command-line options shared by several `vsd` commands: the draft tree and decode settings."""
from __future__ import annotations

from ..decoding import TreeConfig
from .arguments import positive_float, positive_int


def add_tree_args(parser) -> None:
    """The draft-tree options of `vsd generate` and `vsd eval`; unset ones are left to the
    cost model (`TreeConfig()`), and the drafter's decode settings apply unless
    --decode-settings says otherwise."""
    parser.add_argument("--depth", type=positive_int,
                        help="draft tree depth (default: the cost model's)")
    parser.add_argument("--topk", type=positive_int,
                        help="children per expanded node and nodes expanded per level")
    parser.add_argument("--total-tokens", type=positive_int,
                        help="draft nodes verified per step")
    parser.add_argument("--sampled", dest="sampled", action="store_const", const=True,
                        default=None,
                        help="sample trees from the drafter at T > 0 (verified against its q)")
    parser.add_argument("--top-k-trees", dest="sampled", action="store_const", const=False,
                        help="top-k trees at T > 0 (verified against the target alone)")
    parser.add_argument("--ranking-temperature", type=positive_float,
                        help="t_r of the tree ranking (default: the drafter's decode settings)")
    parser.add_argument("--decode-settings", default="drafter",
                        help="a decode_settings.json (or drafter directory) to apply, or "
                             "'off' (default: the drafter's own)")


def tree_from_args(args) -> TreeConfig:
    sizes = {"depth": args.depth, "topk": args.topk, "total_tokens": args.total_tokens}
    return TreeConfig(sampled=args.sampled, ranking_temperature=args.ranking_temperature,
                      **{k: v for k, v in sizes.items() if v is not None})
