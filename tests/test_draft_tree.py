"""Draft tree builder (vsd_ext.decoding.draft_tree): topology, best-k selection against a
brute-force EAGLE-2 reference, sampled children (distinct, distributed as draws without
replacement), draft_probs, and the EAGLE-3 drafter driven through it (feature alignment, cache
writes)."""
import math

import pytest
import torch

from vsd_ext.decoding import DrafterProposer, TreeConfig, build_tree, child_slots
from vsd_ext.models import Drafter
from vsd_ext.tree import tree_depths

from helpers import chi2_pvalue, tiny_target

pytestmark = pytest.mark.usefixtures("one_thread")


class MarkovDrafter:
    """A synthetic drafter: the logits at a node depend on (level, token) only, through a
    random table ``[depth, Vd, Vd]``; the root's logits are given per row."""

    def __init__(self, B, V, depth, gen, scale=2.0):
        self.root = scale * torch.randn(B, V, generator=gen)
        self.table = scale * torch.randn(depth, V, V, generator=gen)
        self.level = 0

    def expand(self, tokens, parent_slot, valid):
        self.level += 1
        return self.table[self.level][tokens]

    def build(self, config, temperature=1.0, generator=None):
        self.level = 0
        B = self.root.shape[0]
        return build_tree(self.root, self.expand, config, torch.zeros(B, dtype=torch.int64),
                          temperature, generator)


def check_topology(tree, config, vocab):
    tokens, parents = tree.tokens, tree.parents
    B, N = tokens.shape
    assert N == config.total_tokens + 1 and parents.shape == (B, N)
    real = tokens >= 0
    assert (parents[:, 0] == -1).all() and real[:, 0].all()
    idx = torch.arange(N)
    assert ((parents < idx) | ~real).all() and ((parents >= 0) | ~real | (idx == 0)).all()
    assert (parents[~real] == -1).all() and (tokens[real] < vocab).all()
    depths = tree_depths(parents, real)  # raises on an invalid tree
    assert depths.max() <= config.depth
    for b in range(B):  # structural checks of the result only (the builder is vectorized)
        kids: dict[int, list[int]] = {}
        for i in range(1, N):
            if real[b, i]:
                kids.setdefault(int(parents[b, i]), []).append(int(tokens[b, i]))
        for children in kids.values():
            assert len(children) <= config.topk and len(set(children)) == len(children)
    return real


def reference_tree(root_logp, table_logp, config):
    """Brute-force EAGLE-2 selection for one row (deterministic flavour), node by node:
    float32 log-probabilities from the same tables, cumulative scores added in float32,
    ranked by (score desc, creation order asc). Returns the kept root-to-node token paths in
    rank order."""
    k = config.topk
    nodes = []  # (score, creation, path, level)
    vals, ids = torch.topk(root_logp, k)
    level_nodes = []
    for j in range(k):
        node = (vals[j], len(nodes), (int(ids[j]),))
        nodes.append(node)
        level_nodes.append(node)
    frontier = level_nodes
    for level in range(1, config.depth):
        level_nodes = []
        for score, _, path in frontier:
            vals, ids = torch.topk(table_logp[level][path[-1]], k)
            for j in range(k):
                node = (score + vals[j], len(nodes), path + (int(ids[j]),))
                nodes.append(node)
                level_nodes.append(node)
        ranked = sorted(level_nodes, key=lambda n: (-float(n[0]), n[1]))
        frontier = [n for n in ranked[:k] if n[0] > float("-inf")]
    ranked = sorted(nodes, key=lambda n: (-float(n[0]), n[1]))
    return [n[2] for n in ranked[: config.total_tokens] if n[0] > float("-inf")]


def paths_of(tree, b):
    tokens, parents = tree.tokens[b].tolist(), tree.parents[b].tolist()
    out = []
    for i in range(1, len(tokens)):
        if tokens[i] < 0:
            continue
        path, j = [], i
        while j > 0:
            path.append(tokens[j])
            j = parents[j]
        out.append(tuple(reversed(path)))
    return out


@pytest.mark.parametrize("config", [TreeConfig(3, 2, 5), TreeConfig(4, 3, 20), TreeConfig(2, 4, 20),
                                    TreeConfig(1, 3, 2), TreeConfig(5, 4, 24)])
def test_topk_tree_matches_brute_force(config, gen):
    B, V = 12, 11
    drafter = MarkovDrafter(B, V, config.depth, gen)
    tree = drafter.build(config)
    check_topology(tree, config, V)
    assert tree.draft_probs is None
    table_logp = torch.log_softmax(drafter.table.float(), -1)
    root_logp = torch.log_softmax(drafter.root.float(), -1)
    for b in range(B):
        assert paths_of(tree, b) == reference_tree(root_logp[b], table_logp, config)


def test_small_vocab_and_zero_probabilities_pad(gen):
    """Slots beyond the drafter's support are never kept: rows are padded with -1 nodes."""
    B, V = 6, 5
    config = TreeConfig(depth=3, topk=4, total_tokens=30)
    drafter = MarkovDrafter(B, V, config.depth, gen)
    drafter.root[:, 2:] = float("-inf")       # the root has 2 possible children
    drafter.table[:, :, 3:] = float("-inf")   # every deeper node has 3
    for sampled in (False, True):
        tree = drafter.build(TreeConfig(3, 4, 30, sampled), 1.0, gen)
        real = check_topology(tree, config, V)
        depth = tree_depths(tree.parents, real)
        assert (tree.tokens[depth == 1] < 2).all() and (tree.tokens[depth >= 2] < 3).all()
        # 2 + 2*3 + min(4, 6)*3 = 20 candidates can be kept.
        assert (real.sum(1) == 21).all()


def test_sampled_slots_follow_the_fp32_q(gen):
    """Tokens whose fp32 probability underflows to 0 are never drawn, and their slots are
    padding: the tree is drawn from exactly the q that verification receives."""
    B, V = 2000, 6
    logits = torch.tensor([0.0, 120.0, 0.5, 119.0, -3.0, 121.0]).expand(B, V)
    config = TreeConfig(depth=1, topk=4, total_tokens=4, sampled=True)
    tree = build_tree(logits, lambda *a: None, config, torch.zeros(B, dtype=torch.int64),
                      1.0, gen)
    q = tree.draft_probs[:, 0]
    assert ((q > 0).sum(1) == 3).all()
    kids = tree.tokens[:, 1:]
    assert (kids[:, 3] == -1).all() and (q.gather(1, kids[:, :3]) > 0).all()
    assert set(kids[:, 0].unique().tolist()) == {1, 3, 5}


def test_sampled_tree_topology_and_draft_probs(gen):
    B, V = 16, 13
    config = TreeConfig(depth=4, topk=3, total_tokens=14, sampled=True)
    drafter = MarkovDrafter(B, V, config.depth, gen)
    T = 0.7
    tree = drafter.build(config, T, gen)
    real = check_topology(tree, config, V)
    q = tree.draft_probs
    assert q.shape == (B, config.total_tokens + 1, V) and q.dtype == torch.float32
    expanded = q.sum(-1) > 0
    assert torch.allclose(q.sum(-1)[expanded], torch.ones(()), atol=1e-5)
    assert expanded[:, 0].all()
    assert torch.allclose(q[:, 0], torch.softmax(drafter.root / T, -1), atol=1e-6)
    depth = tree_depths(tree.parents, real)
    for b in range(B):
        for i in range(1, config.total_tokens + 1):
            if not real[b, i]:
                assert not expanded[b, i]
                continue
            parent = int(tree.parents[b, i])
            assert expanded[b, parent]  # every kept node's parent was expanded
            if expanded[b, i]:           # q at node i is the drafter's at (level, token)
                ref = torch.softmax(drafter.table[int(depth[b, i])][tree.tokens[b, i]] / T, -1)
                assert torch.allclose(q[b, i], ref, atol=1e-6)


def test_sampled_children_are_draws_without_replacement(gen):
    """The first two children of the root, (c1, c2), have P = q(c1) q(c2) / (1 - q(c1))."""
    B, V, T = 30000, 6, 1.3
    logits = torch.randn(V, generator=gen) * 1.5
    config = TreeConfig(depth=1, topk=3, total_tokens=3, sampled=True)
    tree = build_tree(logits.expand(B, V), lambda *a: None, config,
                      torch.zeros(B, dtype=torch.int64), T, gen)
    c1, c2, c3 = tree.tokens[:, 1], tree.tokens[:, 2], tree.tokens[:, 3]
    assert ((c1 != c2) & (c2 != c3) & (c1 != c3)).all()
    assert (tree.parents[:, 1:] == 0).all()
    q = torch.softmax(logits.double() / T, -1)
    pair = q[:, None] * q[None, :] / (1 - q[:, None])
    pair.fill_diagonal_(0)
    observed = torch.bincount(c1 * V + c2, minlength=V * V).double()
    assert chi2_pvalue(observed, B * pair.flatten()) > 1e-5
    # The test has power: the same draws are far from i.i.d. (with-replacement) pairs.
    iid = q[:, None] * q[None, :]
    assert chi2_pvalue(observed, B * iid.flatten()) < 1e-8


def test_child_slots_scores_do_not_depend_on_draws(gen):
    """Sampled slots are scored by the sorted probabilities, whatever token was drawn."""
    logits = torch.randn(4, 9, generator=gen)
    log_s, tokens, probs = child_slots(logits, 3, True, 0.8, gen)
    q = torch.softmax(logits / 0.8, -1)
    assert torch.equal(probs, q) and torch.equal(log_s, torch.topk(q.log(), 3).values)
    log_s2, tokens2, _ = child_slots(logits, 3, False)
    assert torch.equal(tokens2, torch.topk(logits, 3).indices)
    assert torch.allclose(log_s2, torch.topk(torch.log_softmax(logits, -1), 3).values)


def test_tree_config_validation():
    with pytest.raises(ValueError, match="depth"):
        TreeConfig(depth=0)
    with pytest.raises(ValueError, match="total_tokens"):
        TreeConfig(total_tokens=0)
    assert TreeConfig(5, 4, 24).num_nodes == 25 and TreeConfig(5, 4, 24).num_candidates == 68


# ---- the EAGLE-3 drafter through the builder ---------------------------------------------

def small_target(seed):
    return tiny_target(seed, vocab=41, layers=3, hidden=32, scale=0.15, max_positions=256)


@pytest.mark.parametrize("sampled,temperature", [(False, 0.0), (True, 1.0), (True, 0.6)])
def test_drafter_proposer_alignment_and_cache(sampled, temperature, gen, seed):
    """Level-1 children come from the drafter's causal forward over the pairs
    (x_{t+1}, f_t); sampled trees draw them from q at the decoding temperature (not T = 1);
    after a draft the drafter's cache equals a prefill of every pair."""
    target = small_target(seed % 1000)
    V = target.vocab_size
    counts = torch.randint(0, 100, (V,), generator=gen)
    drafter = Drafter.for_target(target, draft_vocab_size=29, token_counts=counts, seed=seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.mul_(6)
    prompts = [[3, 9, 4, 17, 1], [8, 2], [5]]
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.full((B, 5), -1, dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    first = torch.tensor([7, 11, 30])
    config = TreeConfig(depth=3, topk=3, total_tokens=9, sampled=sampled)
    proposer = DrafterProposer(drafter, config, temperature=temperature, generator=gen)
    with torch.no_grad():
        cache = target.new_cache(B, 32)
        feats = target.prefill(ids, cache, lengths).features
        proposer.start(ids, lengths, feats, first, 32)
        tree = proposer.propose(first)
    check_topology(tree, config, V)
    assert torch.equal(tree.tokens[:, 0], first)
    drafts = tree.tokens[:, 1:]
    assert bool(drafter.t2d[drafts[drafts >= 0]].all())  # the root may be any token
    for b, p in enumerate(prompts):
        seq = torch.tensor(p[1:] + [int(first[b])])[None]
        with torch.no_grad():
            full = target.run(torch.tensor(p)[None]).features
            out = drafter(seq, full)
        root_logits = out.logits[0, -1]
        level1 = tree.tokens[b][tree.parents[b] == 0]
        if sampled:
            q = torch.softmax(root_logits.float() / temperature, -1)
            assert torch.allclose(tree.draft_probs[b, 0, drafter.to_target_ids(
                torch.arange(29))], q, atol=1e-5)
            assert tree.draft_probs[b, 0, ~drafter.t2d].abs().max() == 0
        else:
            top = drafter.to_target_ids(torch.topk(root_logits, 3).indices)
            assert 1 <= len(level1) and torch.equal(level1, top[:len(level1)])
        # The pairs are cached exactly as a prefill of the whole pair sequence caches them.
        ref_cache = drafter.new_cache(1, 16)
        with torch.no_grad():
            drafter.prefill(seq, full, ref_cache)
        n = len(p)
        assert int(proposer.cache.lengths[b]) == n
        assert torch.allclose(proposer.cache.k[0, b, :n], ref_cache.k[0, 0, :n], atol=1e-5)
        assert torch.allclose(proposer.cache.v[0, b, :n], ref_cache.v[0, 0, :n], atol=1e-5)
    assert math.isclose(float(proposer.cache.lengths.sum()), float(lengths.sum()))


@pytest.mark.parametrize("depth,total", [(4, 4), (5, 3), (3, 6)])
def test_chain_fast_path_is_the_tree_builders_chain(depth, total, gen, seed):
    """topk = 1 at T = 0: `_grow_chain` gives `build_tree`'s tree (through `_grow_tree`)
    from the same pending chains (ragged: rows of 3, 1 and 2 pairs)."""
    target = small_target(seed % 1000)
    drafter = Drafter.for_target(target, seed=seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.mul_(6)
    config = TreeConfig(depth=depth, topk=1, total_tokens=total)
    proposer = DrafterProposer(drafter, config)
    ids = torch.tensor([[3, 9, 4, 17, 1], [8, 2, -1, -1, -1], [5, 6, 7, -1, -1]])
    lengths = torch.tensor([5, 2, 3])
    with torch.no_grad():
        feats = target.prefill(ids, target.new_cache(3, 32), lengths).features
        proposer.start(ids, lengths - 1, feats, ids[:, 0], 32)
        chain_len = torch.tensor([3, 1, 2])
        proposer.pending = (ids[:, :3], feats[:, 1:4], chain_len)
        roots = ids[torch.arange(3), chain_len - 1]
        state = proposer._run_pending()
        fast = proposer._grow_chain(state, roots)
        full = proposer._grow_tree(state, roots)
    check_topology(fast, config, target.vocab_size)
    assert torch.equal(fast.tokens, full.tokens) and torch.equal(fast.parents, full.parents)
    assert fast.draft_probs is None and full.draft_probs is None
