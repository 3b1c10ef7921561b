"""Speculative decoding: the loop, draft trees, the proposers that grow them, and the cost
model that sizes the trees.

- `loop.py`        `generate`: prefill, then speculative steps (draft → verify → commit)
- `draft_tree.py`  `TreeConfig`, `DraftTree` and the EAGLE-2 dynamic tree builder
- `proposer.py`    `DrafterProposer`: trees drafted by an EAGLE-3 `vsd_ext.Drafter`
- `oracle.py`      `OracleDrafter`: drafts that are known continuations (the loop's ceiling)
- `costs.py`       `StepCosts`: drafting and verification costs measured on this machine
- `planner.py`     `plan_tree`: the tree (or autoregressive decoding) the cost model expects
                   to be fastest, from the costs and the drafter's per-depth acceptance
- `policy.py`      `StepPolicy`: sizes each greedy tree within the plan (per-step gain/cost)
- `configure.py`   how `generate` turns a drafter, a `TreeConfig` and decode settings into a
                   proposer (plan, policy)
- `calibrate.py`   `calibrate_drafter`: fits a drafter's decode settings (ranking
                   temperature, per-depth acceptance; `vsd_ext.models.decode_settings`)
"""
from .calibrate import calibrate_drafter
from .costs import StepCosts, step_costs
from .draft_tree import DraftTree, TreeConfig, build_tree, child_slots
from .loop import GenerationOutput, generate
from .oracle import OracleDrafter
from .planner import Plan, plan_tree
from .proposer import DrafterProposer

__all__ = ["DraftTree", "DrafterProposer", "GenerationOutput", "OracleDrafter", "Plan",
           "StepCosts", "TreeConfig", "build_tree", "calibrate_drafter", "child_slots",
           "generate", "plan_tree", "step_costs"]
