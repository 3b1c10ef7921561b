"""Speculative decoding: the loop (`generate`), draft trees and the proposers that grow them.

- `loop.py`        `generate`: prefill, then speculative steps (draft → verify → commit)
- `draft_tree.py`  `TreeConfig`, `DraftTree` and the EAGLE-2 dynamic tree builder
- `proposer.py`    `DrafterProposer`: trees drafted by an EAGLE-3 `vsd_ext.Drafter`
- `oracle.py`      `OracleDrafter`: drafts that are known continuations (the loop's ceiling)
"""
from .draft_tree import DraftTree, TreeConfig, build_tree, child_slots
from .loop import GenerationOutput, generate
from .oracle import OracleDrafter
from .proposer import DrafterProposer

__all__ = ["DraftTree", "DrafterProposer", "GenerationOutput", "OracleDrafter", "TreeConfig",
           "build_tree", "child_slots", "generate"]
