"""How `generate` turns its drafter, `TreeConfig` and decode settings into a proposer: the
decode settings to apply, the plan of the cost model (`vsd_ext.decoding.planner`) or the tree
given in full, and at T = 0 the per-step policy (`vsd_ext.decoding.policy`) with the envelope
it may size trees in."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..models.decode_settings import DecodeSettings
from .costs import step_costs
from .draft_tree import TreeConfig
from .planner import MAX_DEPTH, MAX_NODES, Plan, acceptance_table, plan_tree
from .policy import StepPolicy
from .proposer import DrafterProposer

__all__ = ["configure_proposer", "envelope", "resolve_decode_settings"]

ENVELOPE_DEPTH = 2  # levels a per-step policy may draft past the planned depth


def resolve_decode_settings(drafter, decode_settings) -> DecodeSettings | None:
    """`generate`'s ``decode_settings`` argument → the settings to apply (or None)."""
    if decode_settings is None or (isinstance(decode_settings, str)
                                   and decode_settings == "off"):
        return None
    if isinstance(decode_settings, str) and decode_settings == "drafter":
        return getattr(drafter, "decode_settings", None)
    if isinstance(decode_settings, DecodeSettings):
        return decode_settings
    if isinstance(decode_settings, dict):
        return DecodeSettings.from_dict(decode_settings, "decode_settings")
    if isinstance(decode_settings, (str, Path)):
        return DecodeSettings.load(decode_settings)
    raise ValueError(f"decode_settings: expected 'drafter', None, 'off', a DecodeSettings, a "
                     f"dict or a path, got {type(decode_settings).__name__}")


def configure_proposer(target, drafter, tree: TreeConfig, temperature: float, generator, settings,
              batch_size: int, max_new_tokens: int | None = None):
    """(proposer, plan): None for autoregressive decoding (no drafter, or the plan says it is
    faster), the drafter itself when it is a proposer (anything with ``propose``, e.g.
    `OracleDrafter`; plan None), or a `DrafterProposer` of an EAGLE-3 drafter drafting the
    planned trees (`vsd_ext.decoding.planner`, for ``batch_size`` rows of ``max_new_tokens``;
    a fully sized ``tree`` is used as given),
    sized per step at T = 0 (`vsd_ext.decoding.policy`, see `TreeConfig.adaptive`)."""
    if drafter is None or hasattr(drafter, "propose"):
        return drafter, None
    if tree.is_sized and (temperature == 0 or tree.sampled is not None):
        ranking = tree.ranking_temperature
        if ranking is None and settings is not None:
            ranking = settings.ranking_temperature
        sampled = bool(tree.sampled) and temperature > 0
        mode = "greedy" if temperature == 0 else "sampled" if sampled else "target_only"
        plan = Plan(replace(tree, sampled=sampled, ranking_temperature=ranking), mode,
                    float("nan"), float("nan"), "given", None)
    else:
        plan = plan_tree(tree, settings, lambda mode: step_costs(
            target, drafter, batch_size, mode, temperature), temperature, batch_size,
            max_new_tokens)
    if plan.tree is None:
        return None, plan
    adaptive = temperature == 0 and (tree.adaptive or (tree.adaptive is None
                                                       and plan.costs is not None))
    if not adaptive:
        return DrafterProposer(drafter, plan.tree, temperature, generator), plan
    plan = replace(plan, tree=envelope(plan.tree, tree))
    costs = plan.costs or step_costs(target, drafter, batch_size)
    proposer = DrafterProposer(drafter, plan.tree, temperature, generator)
    expected = plan.expected_tau if plan.costs is not None else 1.0
    proposer.policy = StepPolicy(costs, acceptance_table(settings, "greedy", 0.0)[0], expected,
                                 plan.tree, batch_size)
    return proposer, plan


def envelope(planned: TreeConfig, given: TreeConfig) -> TreeConfig:
    """The tree a per-step policy may use around a planned one: ``ENVELOPE_DEPTH`` more
    levels and half as many nodes again (within the planner's limits), where ``given`` left
    the size to the cost model; chains stay chains."""
    depth = given.depth or min(planned.depth + ENVELOPE_DEPTH, MAX_DEPTH)
    if given.total_tokens is not None:
        total = given.total_tokens
    elif planned.topk == 1:
        total = depth
    else:
        total = min(planned.total_tokens + (planned.total_tokens + 1) // 2, MAX_NODES)
    return replace(planned, depth=depth, total_tokens=total, adaptive=True)
