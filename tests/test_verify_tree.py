"""vsd_ext.verify_tree: exact agreement with the reference, invariants, losslessness, errors."""
import math

import pytest
import torch

import vsd_ext
from vsd_ext.reference.verify_tree import verify_tree as reference

from helpers import chi2_pvalue

MODES = ["greedy", "target_only", "sampled"]
P_THRESHOLD = 1e-4  # chi-square tests: a correct kernel fails with probability ~1e-4 per test


# ---- tree and input builders ---------------------------------------------------------------

def make_parents(kind, B, N, gen, pad_frac=0.0):
    """parents [B, N] and a real-node mask of a tree family; padding nodes' parents are -1 and
    real descendants of a padding node are re-attached to their nearest real ancestor."""
    parents = torch.full((B, N), -1, dtype=torch.long)
    for i in range(1, N):
        if kind == "chain":
            parents[:, i] = i - 1
        elif kind == "wide":
            parents[:, i] = 0
        elif kind == "eagle":  # layered: each node of a level has up to 4 children
            parents[:, i] = max(0, (i - 1) // 4)
        else:
            parents[:, i] = torch.randint(0, i, (B,), generator=gen)
    real = torch.rand(B, N, generator=gen) >= pad_frac
    real[:, 0] = True
    original = parents.clone()
    for b in range(B):
        for i in range(1, N):
            p = int(original[b, i])
            while not real[b, p]:
                p = int(original[b, p])
            parents[b, i] = p if real[b, i] else -1
    return parents, real


def sibling_ranks(parents, real):
    rank = torch.zeros_like(parents)
    for b in range(parents.shape[0]):
        seen = {}
        for i in range(1, parents.shape[1]):
            if real[b, i]:
                p = int(parents[b, i])
                rank[b, i] = seen.get(p, 0)
                seen[p] = rank[b, i].item() + 1
    return rank


def draw_children(scores, parents, real, gen, dup_frac=0.0):
    """Children's tokens by Gumbel-top-k of `scores[b, parent]` (log-probabilities): sampling
    without replacement, siblings in draw order. dup_frac copies an earlier sibling's token."""
    B, N, V = scores.shape
    rank = sibling_ranks(parents, real)
    k = min(V, int(rank.max()) + 1)
    g = -torch.log(-torch.log(torch.rand(B, N, V, generator=gen, dtype=torch.float64)))
    order = torch.topk(scores.double() + g, k, dim=-1).indices  # [B, N, k]
    tokens = torch.full((B, N), -1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, V, (B,), generator=gen)
    for b in range(B):
        last = {}
        for i in range(1, N):
            if not real[b, i]:
                continue
            p = int(parents[b, i])
            r = min(int(rank[b, i]), k - 1)
            tokens[b, i] = order[b, p, r]
            if p in last and torch.rand((), generator=gen) < dup_frac:
                tokens[b, i] = last[p]
            last[p] = int(tokens[b, i])
    return tokens


def make_case(mode, B, N, V, kind, dtype, gen, pad_frac=0.2, mask_frac=0.0, dup_frac=0.0,
              q_dtype=torch.float32, u_dtype=torch.float64):
    scale = float(torch.empty(()).uniform_(0.5, 4.0, generator=gen))
    logits = torch.randn(B, N, V, generator=gen) * scale
    if mask_frac:
        mask = torch.rand(B, N, V, generator=gen) < mask_frac
        mask[..., 0] = False
        logits = logits.masked_fill(mask, -math.inf)
    logits = logits.to(dtype)
    parents, real = make_parents(kind, B, N, gen, pad_frac)
    q = None
    if mode == "sampled":
        q = torch.softmax(torch.randn(B, N, V, generator=gen) * scale, dim=-1).to(q_dtype)
        scores = torch.log(q.double().clamp_min(1e-300))
    else:
        scores = logits.double() / 0.8
    tokens = draw_children(scores, parents, real, gen, dup_frac)
    uniforms = torch.rand(B, N + 1, generator=gen, dtype=torch.float64).to(u_dtype)
    return logits, tokens, parents, uniforms, q


def to(device, *ts):
    return [None if t is None else t.to(device) for t in ts]


def run_op(device, logits, tokens, parents, uniforms, q, mode, temperature):
    args = to(device, logits, tokens, parents, uniforms, q)
    return [t.cpu() for t in vsd_ext.verify_tree(*args, mode=mode, temperature=temperature)]


def assert_same(got, want, what):
    for name, g, w in zip(("accepted_nodes", "emitted_tokens", "num_accepted"), got, want):
        assert torch.equal(g, w), f"{what}: {name} differs\n got {g}\nwant {w}"


def check_invariants(logits, tokens, parents, out):
    nodes, emitted, num = out
    B, N, V = logits.shape
    for b in range(B):
        k = int(num[b])
        assert 0 <= k <= N - 1
        path = nodes[b, : k + 1].tolist()
        assert path[0] == 0 and (nodes[b, k + 1:] == -1).all()
        for a, c in zip(path, path[1:]):
            assert int(parents[b, c]) == a and int(tokens[b, c]) != -1
        assert emitted[b, :k].tolist() == [int(tokens[b, c]) for c in path[1:]]
        final = int(emitted[b, k])
        assert 0 <= final < V and (emitted[b, k + 1:] == -1).all()
        assert logits[b, path[-1], final] > -math.inf  # zero-probability tokens never drawn


# ---- exact agreement with the reference ----------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["chain", "wide", "random", "eagle"])
def test_matches_reference(device, gen, mode, dtype, kind):
    for trial in range(3):
        B = int(torch.randint(1, 34, (), generator=gen))
        N = int(torch.randint(1, 41, (), generator=gen))
        V = int(torch.randint(2, 300, (), generator=gen))
        T = [0.6, 1.0, 1.7][trial]
        case = make_case(mode, B, N, V, kind, dtype, gen, mask_frac=0.1 * (trial == 1),
                         dup_frac=0.2 * (trial == 2),
                         q_dtype=[torch.float32, torch.bfloat16][trial % 2],
                         u_dtype=[torch.float64, torch.float32][trial % 2])
        got = run_op(device, *case, mode, T)
        want = reference(*case, mode=mode, temperature=T)
        assert_same(got, want, f"{mode} {dtype} {kind} B={B} N={N} V={V} T={T}")
        check_invariants(case[0], case[1], case[2], got)


@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_large_vocab(device, gen, mode):
    for dtype in (torch.float32, torch.bfloat16):
        case = make_case(mode, 3, 24, 50_021, "eagle", dtype, gen, pad_frac=0.1, mask_frac=0.05)
        got = run_op(device, *case, mode, 0.9)
        assert_same(got, reference(*case, mode=mode, temperature=0.9), f"{mode} {dtype} V=50021")
        check_invariants(case[0], case[1], case[2], got)


@pytest.mark.parametrize("mode", MODES)
def test_strided_inputs(device, gen, mode):
    """Views with batch / node strides and a non-unit last stride give the same result."""
    logits, tokens, parents, uniforms, q = make_case(mode, 5, 12, 37, "random", torch.float32, gen)
    want = reference(logits, tokens, parents, uniforms, q, mode=mode, temperature=1.3)
    big = torch.randn(5, 20, 37, dtype=torch.float32)
    big[:, 3:15] = logits
    t_logits = logits.transpose(1, 2).contiguous().transpose(1, 2)  # last stride N
    for view in (big[:, 3:15], t_logits):
        q_view = None if q is None else q.transpose(1, 2).contiguous().transpose(1, 2)
        u_view = uniforms.t().contiguous().t()
        got = run_op(device, view, tokens, parents, u_view, q_view, mode, 1.3)
        assert_same(got, want, f"{mode} strided")


# ---- fully determined cases ----------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_one_hot_target(device, gen, mode):
    """One-hot targets: every mode accepts exactly the children holding the hot token and
    emits the hot token of the last node (the walk of argmaxes)."""
    B, N, V = 16, 21, 11
    hot = torch.randint(0, V, (B, N), generator=gen)
    logits = torch.full((B, N, V), -1e4).scatter_(2, hot[..., None], 0.0)
    parents, real = make_parents("eagle", B, N, gen, pad_frac=0.1)
    tokens = torch.randint(0, V, (B, N), generator=gen).masked_fill(~real, -1)
    tokens = torch.where(torch.rand(B, N, generator=gen) < 0.5,
                         hot.gather(1, parents.clamp_min(0)), tokens).masked_fill(~real, -1)
    q = torch.softmax(torch.randn(B, N, V, generator=gen), -1)
    u = torch.rand(B, N + 1, generator=gen, dtype=torch.float64)
    nodes, emitted, num = run_op(device, logits, tokens, parents, u, q, mode, 0.7)
    for b in range(B):
        cur, path = 0, [0]
        while True:
            kids = [c for c in range(1, N) if real[b, c] and parents[b, c] == cur
                    and tokens[b, c] == hot[b, cur]]
            if not kids:
                break
            cur = kids[0]
            path.append(cur)
        assert nodes[b, : len(path)].tolist() == path and int(num[b]) == len(path) - 1
        assert int(emitted[b, len(path) - 1]) == int(hot[b, path[-1]])


def test_greedy_is_greedy_decoding(device, gen):
    """Greedy output = greedy decoding: each emitted token is the argmax (lowest index on ties)
    of its node, accepted nodes hold it, and the last node has no child holding its argmax."""
    B, N, V = 24, 30, 7
    logits = torch.randint(-3, 3, (B, N, V), generator=gen).to(torch.bfloat16)  # many ties
    parents, real = make_parents("random", B, N, gen, pad_frac=0.1)
    tokens = draw_children(logits.double() * 3, parents, real, gen)
    u = torch.rand(B, N + 1, generator=gen, dtype=torch.float64)
    nodes, emitted, num = run_op(device, logits, tokens, parents, u, None, "greedy", 1.0)
    first_max = (logits == logits.amax(-1, keepdim=True)).float().argmax(-1)  # lowest index
    for b in range(B):
        k = int(num[b])
        path = nodes[b, : k + 1].tolist()
        assert emitted[b, : k + 1].tolist() == [int(first_max[b, c]) for c in path]
        last = path[-1]
        assert not any(real[b, c] and parents[b, c] == last and tokens[b, c] == first_max[b, last]
                       for c in range(1, N))


def test_root_only_and_empty_batch(device, gen):
    logits = torch.randn(4, 1, 9, generator=gen)
    tokens = torch.randint(0, 9, (4, 1), generator=gen)
    parents = torch.full((4, 1), -1)
    u = torch.rand(4, 2, generator=gen, dtype=torch.float64)
    for mode in MODES:
        q = torch.softmax(torch.randn(4, 1, 9, generator=gen), -1)
        got = run_op(device, logits, tokens, parents, u, q, mode, 1.0)
        assert_same(got, reference(logits, tokens, parents, u, q, mode=mode), mode)
        assert (got[2] == 0).all() and (got[0] == 0).all()
    no_rows = torch.zeros(0, 3, dtype=torch.long)
    empty = vsd_ext.verify_tree(*to(device, torch.randn(0, 3, 5), no_rows, no_rows,
                                    torch.rand(0, 4)))
    assert [tuple(t.shape) for t in empty] == [(0, 3), (0, 3), (0,)]


# ---- statistical losslessness ----------------------------------------------------------------

def gumbel_topk(logp, k, gen):
    g = -torch.log(-torch.log(torch.rand(logp.shape, generator=gen, dtype=torch.float64)))
    return torch.topk(logp + g, k, dim=-1).indices


def two_level_trial(mode, gen, B=20_000, V=8, k1=3, k2=2, T=0.7, sampled_children=True):
    """B independent trials of one depth-2 tree: root with k1 children, each with k2 children.
    Target: next-token logits L1 at the root and L2[a] after token a. Draft: q1 and Q2[a] (!= p).
    Children are drawn without replacement from q (Gumbel-top-k) or are q's top-k."""
    L1, L2 = torch.randn(V, generator=gen) * 1.5, torch.randn(V, V, generator=gen) * 1.5
    # A draft correlated with the target (so the test sees many second tokens), yet q != p.
    q1 = torch.softmax(L1 / T + torch.randn(V, generator=gen), -1)
    Q2 = torch.softmax(L2 / T + torch.randn(V, V, generator=gen), -1)
    N = 1 + k1 + k1 * k2
    parents = torch.tensor([-1] + [0] * k1 + [1 + j // k2 for j in range(k1 * k2)]).expand(B, N)
    if sampled_children:
        t1 = gumbel_topk(q1.double().log().expand(B, V), k1, gen)  # [B, k1]
        t2 = gumbel_topk(Q2.double().log()[t1], k2, gen)           # [B, k1, k2]
    else:
        t1 = torch.topk(q1, k1).indices.expand(B, k1)
        t2 = torch.topk(Q2[t1], k2, dim=-1).indices
    tokens = torch.cat([torch.zeros(B, 1, dtype=torch.long), t1, t2.reshape(B, -1)], 1)
    level1 = torch.cat([t1, t1.repeat_interleave(k2, 1)], 1)  # token whose L2 / Q2 applies
    logits = torch.cat([L1.expand(B, 1, V), L2[level1]], 1)
    q = torch.cat([q1.expand(B, 1, V), Q2[level1]], 1)
    return L1, L2, (logits, tokens, parents, q), T


def lossless_pvalues(out, L1, L2, T, p1=None, P2=None):
    _, emitted, num = out
    B, V = emitted.shape[0], L1.numel()
    p1 = torch.softmax(L1.double() / T, -1) if p1 is None else p1
    P2 = torch.softmax(L2.double() / T, -1) if P2 is None else P2
    first = torch.bincount(emitted[:, 0], minlength=V)
    pv1 = chi2_pvalue(first, B * p1, [torch.arange(V)])
    two = num >= 1
    pairs = torch.bincount(emitted[two, 0] * V + emitted[two, 1], minlength=V * V)
    n_a = pairs.view(V, V).sum(1, keepdim=True).double()
    groups = [torch.arange(a * V, a * V + V) for a in range(V)]
    pv2 = chi2_pvalue(pairs, (n_a * P2).reshape(-1), groups)
    return pv1, pv2, int(two.sum())


@pytest.mark.parametrize("mode,sampled_children", [("target_only", False), ("target_only", True),
                                                   ("sampled", True)])
def test_lossless(device, gen, mode, sampled_children):
    L1, L2, (logits, tokens, parents, q), T = two_level_trial(
        mode, gen, sampled_children=sampled_children)
    u = torch.rand(tokens.shape[0], tokens.shape[1] + 1, generator=gen, dtype=torch.float64)
    out = run_op(device, logits, tokens, parents, u, q, mode, T)
    pv1, pv2, n_two = lossless_pvalues(out, L1, L2, T)
    assert n_two > 2_000, "too few second tokens for the test to have power"
    assert pv1 > P_THRESHOLD and pv2 > P_THRESHOLD, (pv1, pv2)
    # The same statistic rejects a perturbed target (T' = 1.5 T): the test can fail.
    bad1, bad2, _ = lossless_pvalues(out, L1, L2, 1.5 * T)
    assert bad1 < P_THRESHOLD and bad2 < P_THRESHOLD, (bad1, bad2)


def test_lossless_detects_wrong_draft_probs(device, gen):
    """Verifying sampled children against the wrong q (uniform instead of the q they were
    drawn from) is not lossless, and the test sees it."""
    L1, L2, (logits, tokens, parents, q), T = two_level_trial("sampled", gen)
    u = torch.rand(tokens.shape[0], tokens.shape[1] + 1, generator=gen, dtype=torch.float64)
    uniform_q = torch.full_like(q, 1 / q.shape[-1])
    wrong = run_op(device, logits, tokens, parents, u, uniform_q, "sampled", T)
    pv1, pv2, _ = lossless_pvalues(wrong, L1, L2, T)
    assert min(pv1, pv2) < P_THRESHOLD, (pv1, pv2)


# ---- wrapper, registration, errors -----------------------------------------------------------

def test_generator_reproducible(device, seed):
    gen = torch.Generator().manual_seed(seed)
    logits, tokens, parents, _, q = make_case("sampled", 6, 15, 40, "random", torch.float32, gen)
    args = to(device, logits, tokens, parents)
    qd = q.to(device)
    a = vsd_ext.verify_tree(*args, draft_probs=qd, mode="sampled",
                            generator=torch.Generator().manual_seed(seed))
    b = vsd_ext.verify_tree(*args, draft_probs=qd, mode="sampled",
                            generator=torch.Generator().manual_seed(seed))
    u = torch.rand(6, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    c = vsd_ext.verify_tree(*args, u.to(device), qd, "sampled")
    assert_same([t.cpu() for t in a], [t.cpu() for t in b], "same generator seed")
    assert_same([t.cpu() for t in a], [t.cpu() for t in c], "explicit uniforms")


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(device, gen, mode):
    case = make_case(mode, 3, 7, 13, "random", torch.float32, gen)
    logits, tokens, parents, u, q = to(device, *case)
    torch.library.opcheck(torch.ops.vsd_ext.verify_tree.default,
                          (logits, tokens, parents, u, q, MODES.index(mode), 0.9))


def test_nan_in_unused_row_is_ignored(device, gen):
    """Only rows the walk uses are checked: a child whose token has probability 0 is never
    accepted, so its NaN row is never read."""
    B, N, V = 2, 4, 6
    logits = torch.randn(B, N, V, generator=gen)
    logits[:, 0, 5] = -math.inf
    logits[:, 1:] = math.nan
    tokens = torch.tensor([[0, 5, 5, 5]] * B)
    parents = torch.tensor([[-1, 0, 0, 0]] * B)
    q = torch.softmax(torch.randn(B, N, V, generator=gen), -1)
    u = torch.rand(B, N + 1, generator=gen, dtype=torch.float64)
    for mode in MODES:
        nodes, emitted, num = run_op(device, logits, tokens, parents, u, q, mode, 1.0)
        assert (num == 0).all() and (emitted[:, 0] != 5).all()


def _base(gen):
    B, N, V = 2, 5, 7
    return dict(target_logits=torch.randn(B, N, V, generator=gen),
                draft_tokens=torch.randint(0, V, (B, N), generator=gen),
                parents=torch.tensor([[-1, 0, 1, 2, 3]] * B),
                uniforms=torch.rand(B, N + 1, generator=gen, dtype=torch.float64) * 0.5,
                draft_probs=torch.softmax(torch.randn(B, N, V, generator=gen), -1),
                mode="sampled", temperature=1.0)


def _set(key, index, value):
    def edit(a):
        t = a[key].clone()
        t[index] = value
        a[key] = t
    return edit


BAD_INPUTS = [
    ("logits rank", lambda a: a.update(target_logits=a["target_logits"][0]), "'target_logits'"),
    ("logits dtype", lambda a: a.update(target_logits=a["target_logits"].double()),
     "'target_logits'"),
    ("tokens shape", lambda a: a.update(draft_tokens=a["draft_tokens"][:, :4]), "'draft_tokens'"),
    ("tokens dtype", lambda a: a.update(draft_tokens=a["draft_tokens"].int()), "'draft_tokens'"),
    ("tokens device", lambda a: a.update(draft_tokens=a["draft_tokens"].to("meta")),
     "'draft_tokens'"),
    ("parents shape", lambda a: a.update(parents=a["parents"][:1]), "'parents'"),
    ("parents dtype", lambda a: a.update(parents=a["parents"].float()), "'parents'"),
    ("uniforms shape", lambda a: a.update(uniforms=a["uniforms"][:, :5]), "'uniforms'"),
    ("uniforms dtype", lambda a: a.update(uniforms=a["uniforms"].half()), "'uniforms'"),
    ("draft_probs shape", lambda a: a.update(draft_probs=a["draft_probs"][..., :6]),
     "'draft_probs'"),
    ("draft_probs dtype", lambda a: a.update(draft_probs=a["draft_probs"].double()),
     "'draft_probs'"),
    ("draft_probs missing", lambda a: a.update(draft_probs=None), "'draft_probs'"),
    ("mode", lambda a: a.update(mode="beam"), "'mode'"),
    ("temperature 0", lambda a: a.update(temperature=0.0), "'temperature'"),
    ("temperature nan", lambda a: a.update(temperature=math.nan), "'temperature'"),
    ("parent not before", _set("parents", (1, 3), 3), r"parents\[1, 3\]"),
    ("parent after", _set("parents", (1, 3), 4), r"parents\[1, 3\]"),
    ("root parent", _set("parents", (0, 0), 0), r"parents\[0, 0\]"),
    ("parent is padding", _set("draft_tokens", (1, 2), -1), r"parents\[1, 3\].*padding"),
    ("token too large", _set("draft_tokens", (0, 2), 7), r"draft_tokens\[0, 2\]"),
    ("token negative", _set("draft_tokens", (0, 2), -2), r"draft_tokens\[0, 2\]"),
    ("root is padding", _set("draft_tokens", (1, 0), -1), r"draft_tokens\[1, 0\]"),
    ("uniform 1", _set("uniforms", (0, 5), 1.0), r"uniforms\[0, 5\]"),
    ("uniform negative", _set("uniforms", (1, 2), -0.1), r"uniforms\[1, 2\]"),
    ("uniform nan", _set("uniforms", (1, 0), math.nan), r"uniforms\[1, 0\]"),
    ("logits nan", _set("target_logits", (1, 0, 3), math.nan), r"target_logits\[1, 0\]"),
    ("logits +inf", _set("target_logits", (0, 0, 1), math.inf), r"target_logits\[0, 0\]"),
    ("logits all -inf", _set("target_logits", (0, 0), -math.inf), r"target_logits\[0, 0\]"),
    ("draft_probs negative", _set("draft_probs", (0, 0, 2), -0.1), r"draft_probs\[0, 0\]"),
    ("draft_probs no mass", _set("draft_probs", (1, 0), 0.0), r"draft_probs\[1, 0\]"),
]


@pytest.mark.parametrize("name,edit,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(device, gen, name, edit, match):
    a = _base(gen)
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            a[k] = v.to(device)
    edit(a)
    with pytest.raises(ValueError, match=match):
        vsd_ext.verify_tree(**a)
    if name == "mode":
        return
    # The C++ op raises the same ValueError when called directly.
    a["mode"] = vsd_ext.ops.verify.MODES[a["mode"]]
    with pytest.raises(ValueError, match=match):
        torch.ops.vsd_ext.verify_tree(*a.values())


def test_greedy_ignores_temperature(device, gen):
    a = _base(gen)
    args = to(device, a["target_logits"], a["draft_tokens"], a["parents"], a["uniforms"])
    out0 = vsd_ext.verify_tree(*args, mode="greedy", temperature=0.0)
    out1 = vsd_ext.verify_tree(*args, mode="greedy", temperature=2.0)
    assert_same([t.cpu() for t in out0], [t.cpu() for t in out1], "greedy T")


def test_first_error_is_reported(device, gen):
    """With several bad entries the smallest (row, canonical order) one is named, on every
    device."""
    a = _base(gen)
    _set("uniforms", (0, 1), 2.0)(a)
    _set("parents", (0, 4), 4)(a)
    _set("draft_tokens", (1, 1), 99)(a)
    a = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    with pytest.raises(ValueError, match=r"parents\[0, 4\]"):
        vsd_ext.verify_tree(**a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("mode", MODES)
def test_cpu_cuda_agree(gen, mode):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        case = make_case(mode, 33, 64, 32_003, "eagle", dtype, gen, mask_frac=0.02)
        assert_same(run_op("cuda", *case, mode, 0.8), run_op("cpu", *case, mode, 0.8),
                    f"{mode} {dtype}")
