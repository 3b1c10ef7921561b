"""The cost model (vsd_ext.decoding.costs, vsd_ext.decoding.planner): acceptance tables and
their interpolation in T, the expected tokens of EAGLE-2 trees against hand-computed values,
the plans chosen for cheap and for expensive drafting, fixed fields kept, the measured costs,
the fallback to autoregressive steps when drafts do not pay, `TreeConfig()` decoding exactly
(T = 0) whatever it plans; the per-step policy (vsd_ext.decoding.policy) against hand-computed
decisions."""
from dataclasses import replace
from statistics import NormalDist
from types import SimpleNamespace

import pytest
import torch
from test_decoding import PROMPTS, greedy_reference, random_drafter

from vsd_ext.decoding import StepCosts, TreeConfig, generate, plan_tree, step_costs
from vsd_ext.decoding.loop import CHECK_EVERY, _Decoding, _tau_and_stderr, check_drafting
from vsd_ext.decoding.planner import (
    MAX_DEPTH,
    PRIOR,
    acceptance_table,
    batch_tail,
    drafting_pays,
    expected_tokens,
    tokens_variance,
)
from vsd_ext.decoding.policy import StepPolicy
from vsd_ext.models import DecodeSettings
from vsd_ext.models.decode_settings import Acceptance

from helpers import tiny_target

pytestmark = pytest.mark.usefixtures("one_thread")


def settings(greedy=0.9, sampled=0.8, target_only=0.3):
    def table(mode, t, a):
        return Acceptance(mode, t, ((a, min(1.0, a + 0.05), min(1.0, a + 0.08)),), (100,))
    return DecodeSettings(0.5, (table("greedy", 0.0, greedy), table("sampled", 1.0, sampled),
                                table("target_only", 1.0, target_only)))


def costs(verify_base=10.0, verify_node=0.5, draft=1.0, B=1, autoregressive=None,
          mode="greedy"):
    return StepCosts(B, verify_base, verify_node, draft, draft, draft, draft, 0.1 * draft,
                     autoregressive, mode)


def test_acceptance_tables_interpolate_in_temperature():
    s = settings()
    greedy, source = acceptance_table(s, "greedy", 0.0)
    assert source == "decode_settings" and len(greedy) == MAX_DEPTH
    assert greedy[0] == greedy[-1] == pytest.approx([0.9, 0.95, 0.98])
    assert acceptance_table(s, "sampled", 1.0)[0][0] == pytest.approx([0.8, 0.85, 0.88])
    assert acceptance_table(s, "sampled", 2.0)[0][0] == pytest.approx([0.8, 0.85, 0.88])
    half = acceptance_table(s, "sampled", 0.5)[0][0]
    assert half == pytest.approx([0.85, 0.9, 0.93])
    prior, source = acceptance_table(None, "target_only", 1.0)
    assert source == "prior" and prior[0] == list(PRIOR.find("target_only")[0].cumulative[0])
    # Columns past the measured k add nothing.
    short = DecodeSettings(1.0, (Acceptance("greedy", 0.0, ((0.5,),), (1,)),))
    assert acceptance_table(short, "greedy", 0.0)[0][0] == [0.5]


def test_expected_tokens_of_chains_and_trees():
    a = 0.8
    chain = [[a, a]] * MAX_DEPTH
    taus = expected_tokens(chain, 4, 1, 10)
    assert taus == pytest.approx([1, 1.8, 1.8 + a ** 2, 1.8 + a ** 2 + a ** 3,
                                  1.8 + a ** 2 + a ** 3 + a ** 4])
    # topk 2, marginals 0.6 and 0.2: level 1 {0.6, 0.2}; level 2 {0.36, 0.12, 0.12, 0.04}.
    tree = [[0.6, 0.8]] * MAX_DEPTH
    assert expected_tokens(tree, 2, 2, 3) == pytest.approx([1, 1.6, 1.96, 2.16])
    assert expected_tokens(tree, 2, 2, 100)[-1] == pytest.approx(1 + 0.8 + 0.64)


def test_plans_follow_the_costs():
    s = settings()
    cheap = plan_tree(TreeConfig(), s, costs(draft=0.2, verify_node=0.1), 0.0)
    dear = plan_tree(TreeConfig(), s, costs(draft=3.0, verify_node=2.0), 0.0)
    assert cheap.tree.depth > dear.tree.depth >= 1 and cheap.expected_speedup > 2
    assert cheap.tree.ranking_temperature == 0.5 and cheap.mode == "greedy"
    hopeless = plan_tree(TreeConfig(), settings(greedy=0.05), costs(draft=3.0), 0.0)
    assert hopeless.tree is None and hopeless.mode == "autoregressive"
    # T > 0: sampled trees where they accept more, top-k trees where those do.
    assert plan_tree(TreeConfig(), s, costs(), 1.0).mode == "sampled"
    flipped = settings(sampled=0.2, target_only=0.9)
    assert plan_tree(TreeConfig(), flipped, costs(), 1.0).mode == "target_only"
    # Fixed fields are kept; a fully sized tree is used as given.
    fixed = plan_tree(TreeConfig(depth=2, sampled=False), s, costs(), 1.0)
    assert fixed.tree.depth == 2 and fixed.mode == "target_only"
    given = plan_tree(TreeConfig(3, 2, 5), settings(greedy=0.05), costs(draft=3.0), 0.0)
    assert (given.tree.depth, given.tree.topk, given.tree.total_tokens) == (3, 2, 5)


def test_tokens_variance_of_chains_and_trees():
    # Chain a = 0.8, 2 nodes: P(A >= 1) = 0.8, P(A >= 2) = 0.64, E[A²] = 0.8 + 3 · 0.64.
    chain = [[0.8, 0.8]] * MAX_DEPTH
    assert tokens_variance(chain, 2, 1, 2) == pytest.approx(
        [0, 0.8 - 0.64, 0.8 + 3 * 0.64 - 1.44 ** 2])
    # The tree of test_expected_tokens: kept 0.6 (depth 1), 0.36 (depth 2), 0.2 (depth 1).
    tree = [[0.6, 0.8]] * MAX_DEPTH
    assert tokens_variance(tree, 2, 2, 3) == pytest.approx(
        [0, 0.6 - 0.36, 0.6 + 3 * 0.36 - 0.96 ** 2, 0.8 + 3 * 0.36 - 1.16 ** 2])


def test_batch_tail():
    assert batch_tail(2.0, 0.5, 1, 48) == 2.0 and batch_tail(2.0, 0.5, 4, None) == 2.0
    e4 = NormalDist().inv_cdf(3.625 / 4.25)  # Blom: the expected maximum of 4 normals
    assert batch_tail(2.0, 0.5, 4, 48) == pytest.approx(48 / (24 + e4 * (48 * 0.5 / 8) ** 0.5))
    taus = [batch_tail(2.0, 0.5, b, 48) for b in (1, 2, 4, 16)]
    assert taus == sorted(taus, reverse=True) and taus[-1] < 1.9
    assert batch_tail(2.0, 0.0, 16, 48) == 2.0               # no variance, no tail
    assert batch_tail(2.0, 0.5, 16, 10 ** 8) == pytest.approx(2.0, rel=1e-3)  # long rows
    # The planner scales τ by it: a batch expects less speedup than one row.
    one = plan_tree(TreeConfig(), settings(), costs(), 0.0, 1, 48)
    many = plan_tree(TreeConfig(), settings(), costs(), 0.0, 16, 48)
    assert one.tail == 1.0 and 0 < many.tail < 1
    assert many.expected_speedup < one.expected_speedup


def test_plans_price_each_mode():
    """Candidates are priced by their own verification mode's costs (measured lazily, once
    per mode) against the autoregressive step at T."""
    asked = []

    def by_mode(dear_sampled):
        def fn(mode):
            asked.append(mode)
            return costs(draft=8.0 if dear_sampled and mode == "sampled" else 1.0, mode=mode)
        return fn

    s = settings(sampled=0.8, target_only=0.7)
    assert plan_tree(TreeConfig(), s, by_mode(False), 1.0).mode == "sampled"
    assert sorted(asked) == ["sampled", "target_only"]
    plan = plan_tree(TreeConfig(), s, by_mode(True), 1.0)
    assert plan.mode == "target_only" and plan.costs.mode == "target_only"
    asked.clear()
    assert plan_tree(TreeConfig(sampled=False), s, by_mode(True), 1.0).mode == "target_only"
    assert plan_tree(TreeConfig(), s, by_mode(True), 0.0).mode == "greedy"
    assert asked == ["target_only", "greedy"]
    # The speedup is over the autoregressive step, not the verify fit's intercept.
    base = plan_tree(TreeConfig(3, 1, 3), s, costs(), 0.0)
    dear_ar = plan_tree(TreeConfig(3, 1, 3), s, costs(autoregressive=12.0), 0.0)
    assert dear_ar.expected_speedup == pytest.approx(1.2 * base.expected_speedup)


def test_drafting_pays():
    plan = plan_tree(TreeConfig(), settings(), costs(), 0.0)
    step = costs().step(plan.tree.depth, plan.tree.topk, plan.tree.total_tokens,
                        plan.tree.topk == 1)
    assert drafting_pays(plan, 1.01 * step / 10.0)
    assert not drafting_pays(plan, 0.99 * step / 10.0)
    # A batch's tail scales the measured τ; the baseline is the autoregressive step at T.
    assert not drafting_pays(replace(plan, tail=0.9), 1.01 * step / 10.0)
    assert drafting_pays(replace(plan, tail=0.9), 1.01 * step / 9.0)
    dear_ar = replace(plan, costs=replace(plan.costs, autoregressive=20.0))
    assert drafting_pays(dear_ar, 0.51 * step / 10.0)
    # A τ below break-even by less than PAYS_Z standard errors keeps drafting.
    assert drafting_pays(plan, 0.9 * step / 10.0, stderr=0.06 * step / 10.0)
    assert not drafting_pays(plan, 0.9 * step / 10.0, stderr=0.04 * step / 10.0)
    # A measured step time replaces the modelled one (the model's step would pay here).
    assert drafting_pays(plan, 2 * step / 10.0, step_seconds=1.99 * step)
    assert not drafting_pays(plan, 2 * step / 10.0, step_seconds=2.01 * step)


def test_check_drafting_falls_back_on_the_measured_step_time(target):
    """τ that pays by the modelled step costs, steps that take longer than τ autoregressive
    steps by the clock: the check at step 8 falls back; a little faster and it keeps drafting."""
    plan = plan_tree(TreeConfig(), settings(), costs(), 0.0)
    tau = 2 * costs().step(plan.tree.depth, plan.tree.topk, plan.tree.total_tokens,
                           plan.tree.topk == 1) / 10.0  # twice break-even by the model
    for measured, falls_back in ((1.01, True), (0.99, False)):
        state = _Decoding(target, SimpleNamespace(num_nodes=8), 0.0, None)
        state.plan, state.forwards = plan, CHECK_EVERY
        state.hist = torch.zeros(8, dtype=torch.int64)
        state.hist[round(tau) - 1] = CHECK_EVERY  # every step emitted τ (a whole number)
        state.step_seconds = CHECK_EVERY * measured * round(tau) * 10.0
        check_drafting(state)
        assert (state.fallback_step == CHECK_EVERY) == falls_back
        assert (state.proposer is None) == falls_back


def test_measured_tau_and_its_standard_error():
    # Row-forwards emitting 1, 1, 2, 2 tokens: mean 1.5, variance 0.25, 4 samples.
    assert _tau_and_stderr(torch.tensor([2, 2, 0])) == pytest.approx((1.5, 0.25))
    assert _tau_and_stderr(torch.tensor([5, 0])) == (1.0, 0.0)


@pytest.fixture(scope="module")
def target():
    return tiny_target(1234)


def test_step_costs_are_measured_once(target):
    drafter = random_drafter(target, 0)
    first = step_costs(target, drafter, 2)
    assert step_costs(target, drafter, 2) is first and first.batch_size == 2
    assert step_costs(target, drafter, 1) is not first
    values = first.to_dict()
    assert values["verify_base"] > 0 and values["chain_first"] > 0
    assert all(v >= 0 for k, v in values.items() if k != "mode")
    assert first.step(3, 1, 3, True) == pytest.approx(
        first.verify_base + 3 * first.verify_node + first.chain_first + 2 * first.chain_level)
    assert first.mode == "greedy" and first.autoregressive == first.verify_base


def test_step_costs_per_mode(target):
    """T > 0 steps are timed as they run: cached per mode; sampled trees are never chains,
    and their autoregressive baseline is a target_only step; bad modes are refused."""
    drafter = random_drafter(target, 0)
    greedy = step_costs(target, drafter, 1)
    top = step_costs(target, drafter, 1, "target_only", 0.7)
    sampled = step_costs(target, drafter, 1, "sampled", 0.7)
    assert len({id(greedy), id(top), id(sampled)}) == 3
    assert step_costs(target, drafter, 1, "sampled", 1.0) is sampled
    assert (top.mode, sampled.mode) == ("target_only", "sampled")
    assert top.autoregressive == top.verify_base and sampled.autoregressive > 0
    assert sampled.chain_first == sampled.tree_first
    assert sampled.chain_level == pytest.approx(sampled.tree_level + sampled.tree_node)
    with pytest.raises(ValueError, match="mode"):
        step_costs(target, drafter, 1, "topk", 1.0)
    with pytest.raises(ValueError, match="temperature"):
        step_costs(target, drafter, 1, "sampled", 0.0)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_default_tree_falls_back_when_drafts_do_not_pay(target, temperature, seed):
    """A random drafter under settings that promise near-certain acceptance: the plan
    drafts, the measured τ does not pay for it, the rest is autoregressive — and T = 0 output
    is greedy decoding's all along."""
    drafter = random_drafter(target, seed)
    promise = settings(greedy=0.99, sampled=0.99, target_only=0.99)
    out = generate(target, drafter, PROMPTS[0], 40, temperature, decode_settings=promise,
                   generator=torch.Generator().manual_seed(seed))
    plan = out.stats["plan"]
    assert plan["tree"] is not None and plan["expected_speedup"] > 1
    assert plan["fallback_step"] is not None and plan["fallback_step"] % 8 == 0
    # The plan reports the costs of the mode it verifies in (measured at this temperature).
    assert plan["costs"]["mode"] == plan["mode"]
    assert (plan["mode"] == "greedy") == (temperature == 0)
    if temperature == 0:
        assert out.tokens == [greedy_reference(target, PROMPTS[0], 40)]


def test_default_tree_is_exact_at_t0(target, seed):
    references = [greedy_reference(target, p, 16) for p in PROMPTS]
    drafter = random_drafter(target, seed, scale=2.0)
    for s in (None, settings(), settings(greedy=0.01)):
        out = generate(target, drafter, PROMPTS, 16, decode_settings=s)
        assert out.tokens == references and out.stats["plan"] is not None


# ---- per-step sizing (vsd_ext.decoding.policy) ---------------------------------------------

def policy(B=1, expected_tau=3.0):
    return StepPolicy(costs(verify_base=10.0, verify_node=0.5, draft=1.0), [[0.7, 0.9]] * 4,
                      expected_tau, TreeConfig(4, 2, 6), B)


def test_policy_keeps_the_columns_that_pay():
    pol = policy()
    # Plan: step(4, 2, 6) = 10 + 6 * 0.5 + 1 + 3 * (1 + 0.1 * 2) = 17.6 per 3 tokens (prior).
    assert pol.rate == pytest.approx(3 / 17.6)
    # A node pays when its p exceeds rate * verify_node = 0.0852.
    scores = torch.tensor([[0.9, 0.5, 0.2, 0.09, 0.08, 0.01]]).log()
    assert pol.columns(scores) == 4
    # Two rows share a column: it pays when their summed p exceeds 6 / 17.6 * 0.5 = 0.170.
    rows = torch.tensor([[0.9, 0.1, 0.05], [0.9, 0.1, 0.01]]).log()
    assert policy(B=2).columns(rows) == 2
    assert pol.columns(torch.tensor([[0.05, 0.01]]).log()) == 0  # not even the first node


def test_policy_drafts_a_level_while_its_expected_gain_pays():
    pol = policy()
    # Node cost 0.0852, level cost rate * 1.2 = 0.2045, marginals at depth 2: 0.7, 0.2.
    # Frontier (0.5, 0.3): gains 0.265 + 0.015 + 0.125 = 0.405 > 0.2045.
    assert pol.keep_expanding(torch.tensor([[0.5, 0.3]]).log(), 1)
    # Frontier (0.2, 0.1): gain 0.055 only.
    assert not pol.keep_expanding(torch.tensor([[0.2, 0.1]]).log(), 1)


def test_policy_rate_follows_the_steps():
    pol = policy()
    pol.record(3, 5)
    pol.update(4)  # step(3, 2, 5) = 10 + 2.5 + 1 + 2 * 1.2 = 15.9
    assert pol.rate == pytest.approx((12 + 4) / (70.4 + 15.9))
    assert pol.beats_autoregressive()  # 4 tokens in 15.9 against 1 per 10
    pol.record(3, 5)
    for _ in range(5):
        pol.update(1)
    assert not pol.beats_autoregressive()  # 9 tokens in 95.4
