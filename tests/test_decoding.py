"""The decoding loop (vsd_ext.decoding.generate): lossless at T = 0 (identical to greedy
decoding) and at T > 0 (chi-square of the first tokens against the target's exact sampling
distribution), for both tree flavours and batches of mixed prompt lengths; the oracle's τ;
rows finishing independently (stop ids, stop strings, max tokens); statistics; errors."""
import dataclasses

import pytest
import torch

from vsd_ext.app.cli import main
from vsd_ext.decoding import DrafterProposer, OracleDrafter, TreeConfig, build_tree, generate
from vsd_ext.models import Drafter, load_drafter

from helpers import chi2_pvalue, save_checkpoint, tiny_target, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def random_drafter(target, seed, scale=5.0):
    drafter = Drafter.for_target(target, seed=seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.mul_(scale)
    return drafter


def bf16_drafter(target, seed, directory):
    """A random drafter saved and loaded back in bf16 (it reads the fp32 target's features;
    verification still uses the target's fp32 logits, so decoding stays exact)."""
    random_drafter(target, seed).save_pretrained(directory)
    return load_drafter(directory, target, dtype=torch.bfloat16)


def greedy_reference(target, prompt, n):
    """Greedy decoding by full causal forwards (no cache, no tree attention)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(target(torch.tensor(seq)[None])[0, -1].argmax()))
    return seq[len(prompt):]


class NoisyOracle:
    """A proposer whose dynamic trees (the real builder) hold the reference continuation
    among noise: at a node on the reference path the next reference token gets a logit
    bump, elsewhere the logits are random. Drafts are partly accepted, partly not."""

    def __init__(self, references, config, gen, bump=2.5):
        self.references, self.config, self.gen, self.bump = references, config, gen, bump
        self.num_nodes = config.num_nodes

    def start(self, prompt_ids, lengths, features, first_tokens, capacity):
        width = max(len(r) for r in self.references) + self.config.depth + 1
        self.ref = torch.full((len(self.references), width), -1, dtype=torch.int64)
        for b, r in enumerate(self.references):
            self.ref[b, :len(r)] = torch.tensor(r)
        self.pos = lengths + 1

    def _logits(self, shape, on_path, level):
        V = 97
        logits = 2.0 * torch.randn(*shape, V, generator=self.gen)
        want = self.ref.gather(1, (self.pos + level)[:, None])
        want = want[:, 0] if len(shape) == 1 else want.expand(shape)
        bump = torch.zeros_like(logits).scatter_(-1, want.clamp(min=0)[..., None], self.bump)
        return logits + bump * (on_path & (want >= 0))[..., None]

    def propose(self, roots):
        B = roots.shape[0]
        state = {"level": 0, "on_path": None}

        def expand(tokens, parent_slot, valid):
            level = state["level"]
            prev = (torch.ones_like(tokens, dtype=torch.bool) if state["on_path"] is None
                    else state["on_path"].gather(1, parent_slot))
            want = self.ref.gather(1, (self.pos + level)[:, None])
            state["on_path"] = prev & (tokens == want) & valid
            state["level"] = level + 1
            return self._logits(tokens.shape, state["on_path"], level + 1)

        root = self._logits((B,), torch.ones(B, dtype=torch.bool), 0)
        return build_tree(root, expand, self.config, roots)

    def advance(self, emitted, num_accepted, features):
        self.pos = self.pos + num_accepted + 1

    def keep(self, rows):
        self.ref, self.pos = self.ref[rows], self.pos[rows]


PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [12], [33, 7, 90], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.fixture(scope="module")
def target():
    return tiny_target(1234)


@pytest.fixture(scope="module")
def references(target):
    return [greedy_reference(target, p, 24) for p in PROMPTS]


@pytest.mark.parametrize("kind", ["none", "drafter", "drafter_bf16", "drafter_chain",
                                  "drafter_sampled_flag", "noisy_oracle", "oracle"])
@pytest.mark.parametrize("rows", [slice(0, 1), slice(0, 4)])
def test_greedy_is_exact(target, references, kind, rows, gen, seed, tmp_path):
    prompts, refs = PROMPTS[rows], references[rows]
    config = TreeConfig(depth=4, topk=3, total_tokens=12, sampled=kind.endswith("flag"))
    if kind == "drafter_chain":  # topk 1: the proposer's chain path
        config = TreeConfig(depth=5, topk=1, total_tokens=5)
    drafter = {
        "none": lambda: None,
        "drafter": lambda: random_drafter(target, seed),
        "drafter_bf16": lambda: bf16_drafter(target, seed, tmp_path),
        "drafter_chain": lambda: random_drafter(target, seed),
        "drafter_sampled_flag": lambda: random_drafter(target, seed),
        "noisy_oracle": lambda: NoisyOracle([p + r for p, r in zip(prompts, refs)], config, gen),
        "oracle": lambda: OracleDrafter([p + r for p, r in zip(prompts, refs)], 4),
    }[kind]()
    out = generate(target, drafter, prompts, 24, tree=config, generator=gen)
    assert out.tokens == refs
    assert out.finish_reasons == ["length"] * len(prompts)
    stats = out.stats
    assert stats["mode"] == "greedy" and stats["new_tokens"] == 24 * len(prompts)
    hist = torch.tensor(stats["acceptance_histogram"])
    assert int(hist.sum()) == stats["row_forwards"]
    assert stats["tau"] == pytest.approx(float((hist * torch.arange(1, len(hist) + 1)).sum())
                                         / stats["row_forwards"])
    assert set(stats["time_s"]) == {"prefill", "draft", "verify", "other", "total"}
    if kind == "none":
        assert stats["tau"] == 1.0 and stats["target_forwards"] == 23
    if kind == "noisy_oracle":
        assert 1.0 < stats["tau"] < 5.0  # partly accepted trees
    if kind == "oracle":
        assert stats["tau"] > 4.0


def test_oracle_tau_is_depth_plus_one(target, references):
    """Every oracle draft is accepted: 1 + 5·5 tokens take the prefill plus 5 forwards."""
    out = generate(target, OracleDrafter([PROMPTS[0] + references[0]], 4), PROMPTS[0], 21)
    assert out.tokens == [references[0][:21]]
    assert out.stats["tau"] == 5.0 and out.stats["target_forwards"] == 4
    assert out.stats["acceptance_histogram"] == [0, 0, 0, 0, 4]


def test_rows_finish_independently(target, references, gen):
    stop = references[0][3]
    config = TreeConfig(depth=4, topk=3, total_tokens=12)
    oracle = NoisyOracle([p + r for p, r in zip(PROMPTS, references)], config, gen)
    out = generate(target, oracle, PROMPTS, 20, tree=config, stop=[stop])
    for b, ref in enumerate(references):
        ref = ref[:20]
        if stop in ref:
            assert out.tokens[b] == ref[:ref.index(stop) + 1] and out.finish_reasons[b] == "eos"
        else:
            assert out.tokens[b] == ref and out.finish_reasons[b] == "length"
    # EOS from the config stops a row unless ignore_eos.
    config = target.model_config
    target.model_config = dataclasses.replace(config, eos_token_id=[stop])
    try:
        assert generate(target, None, PROMPTS[0], 20).tokens[0] == references[0][:4]
        assert generate(target, None, PROMPTS[0], 20, ignore_eos=True).tokens[0] == \
            references[0][:20]
    finally:
        target.model_config = config


def test_stop_strings_and_streaming(target, references):
    tok = word_tokenizer({f"t{i}": i for i in range(97)}, unk="t0")
    target.tokenizer = tok
    try:
        stop = tok.decode(references[2][5:7])
        streamed: dict[int, list[int]] = {}
        out = generate(target, OracleDrafter([p + r for p, r in zip(PROMPTS, references)], 3),
                       PROMPTS, 24, stop=[stop],
                       callback=lambda row, new: streamed.setdefault(row, []).extend(new))
        for b, ref in enumerate(references):
            cut = next((n for n in range(1, 25) if stop in tok.decode(ref[:n])), 24)
            assert out.tokens[b] == ref[:cut]
            assert out.finish_reasons[b] == ("stop" if cut < 24 or stop in tok.decode(ref)
                                             else "length")
        assert out.finish_reasons[2] == "stop"
        assert streamed == dict(enumerate(out.tokens))
    finally:
        target.tokenizer = None


def test_bad_arguments(target):
    with pytest.raises(ValueError, match="temperature"):
        generate(target, None, [1, 2], 4, temperature=-1.0)
    with pytest.raises(ValueError, match="prompts"):
        generate(target, None, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(target, None, [1, 2], 0)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(target, None, [1, 2], 4, stop=["x"])


# ---- T > 0: the output distribution is the target's ----------------------------------------

def exact_first_tokens(target, prompt, n, temperature):
    """P(x_1 .. x_n | prompt) at this temperature for all V^n continuations (flattened)."""
    V = target.vocab_size
    cont = torch.cartesian_prod(*[torch.arange(V)] * n)
    seqs = torch.cat((torch.tensor(prompt).expand(len(cont), -1), cont), 1)
    with torch.no_grad():
        logits = target(seqs)[:, len(prompt) - 1:-1].double()
    logp = torch.log_softmax(logits / temperature, -1).gather(-1, cont[..., None])[..., 0]
    return logp.sum(-1).exp()


@pytest.mark.parametrize("sampled,temperature", [(False, 0.8), (True, 1.0), (True, 0.6)])
def test_sampling_distribution_is_the_targets(sampled, temperature, gen, seed):
    V, n, R = 8, 3, 6000
    # Fixed models (their trees are accepted 1-3 deep), fresh randomness of the sampling.
    target = tiny_target(2345, vocab=V, layers=2, hidden=32, scale=0.5)
    drafter = random_drafter(target, 12345, scale=3.0)
    prompts = [[2, 5, 1], [7, 3, 3, 0, 6, 4]]
    batch = [prompts[i % 2] for i in range(2 * R)]
    config = TreeConfig(depth=3, topk=3, total_tokens=8, sampled=sampled)
    out = generate(target, drafter, batch, n, temperature=temperature, tree=config,
                   generator=gen, ignore_eos=True)
    assert out.stats["mode"] == ("sampled" if sampled else "target_only")
    hist = out.stats["acceptance_histogram"]
    assert sum(hist[2:]) > 0.1 * sum(hist)  # deep acceptances are frequent: the test bites
    tokens = torch.tensor(out.tokens)
    codes = (tokens * torch.tensor([V * V, V, 1])).sum(1)
    for i, prompt in enumerate(prompts):
        observed = torch.bincount(codes[i::2], minlength=V ** n).double()
        expected = R * exact_first_tokens(target, prompt, n, temperature)
        assert chi2_pvalue(observed, expected) > 1e-5
        # Power: the same samples are clearly not from the target at another temperature.
        wrong = R * exact_first_tokens(target, prompt, n, temperature * 1.5)
        assert chi2_pvalue(observed, wrong) < 1e-6


# ---- the `vsd generate` command ----------------------------------------------------------

def test_cli_generate(target, references, tmp_path, capsys, seed):
    tok = word_tokenizer({f"t{i}": i for i in range(97)}, unk="t0")
    save_checkpoint(target, tmp_path, tok)
    prompt = " ".join(f"t{i}" for i in PROMPTS[2])
    greedy = tok.decode(references[2][:10])
    capsys.readouterr()  # drop the seed fixture's line

    assert main(["generate", "--target", str(tmp_path), "--prompt", prompt,
                 "--max-new-tokens", "10", "--draft", "oracle", "--depth", "3",
                 "--compare"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == prompt + greedy  # streamed: the prompt, then the continuation
    tau = float(err.split("tau ")[1].split()[0])
    assert tau > 3.0 and "speedup" in err and "mode greedy" in err

    drafter_dir = tmp_path / "drafter"
    random_drafter(target, seed).save_pretrained(drafter_dir)
    assert main(["generate", "--target", str(tmp_path), "--draft", str(drafter_dir),
                 "--prompt", prompt, "--prompt", "t1 t2", "--max-new-tokens", "6",
                 "--temperature", "0.9", "--sampled", "--topk", "2", "--depth", "2",
                 "--total-tokens", "3"]) == 0  # sized: the cost model may not draft here
    out, err = capsys.readouterr()
    assert out.count("--- ") == 2 and "mode sampled" in err


# ---- the proposer against explicit per-node drafter forwards -------------------------------

def reduced_vocab_drafter(target, seed):
    """A random drafter over the 40 most frequent of the target's 97 ids (d2t != 0)."""
    counts = torch.arange(97, 0, -1).roll(seed % 97)
    drafter = Drafter.for_target(target, draft_vocab_size=40, token_counts=counts, seed=seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.mul_(5.0)
    assert bool((drafter.d2t != 0).any())
    return drafter


def explicit_children(drafter, cache, first, feature, path, k):
    """Target ids of the top-k children of the node reached by ``path`` (target ids below
    the pending root pair (first, feature)), from `Drafter.tree_step` over the whole path."""
    ids = torch.tensor([[first] + path])
    parents = torch.arange(-1, len(path))[None]
    out = drafter.tree_step(ids[:, :1], feature, parents[:, :1], cache)
    for i, token in enumerate(path):  # each node reads its parent's hidden state
        out = drafter.tree_step(torch.tensor([[token]]), out.hidden[:, -1:],
                                parents[:, :i + 2], cache, past=out.tree_kv)
    top = out.logits[0, -1].float().topk(k).indices
    return drafter.to_target_ids(top).tolist()


@pytest.mark.parametrize("config", [TreeConfig(4, 1, 4), TreeConfig(3, 2, 10)])
def test_proposer_trees_match_explicit_forwards(target, config, seed):
    """A reduced-vocabulary drafter: every node of the proposer's tree (chain fast path and
    `build_tree` path) is among the top-k children that explicit forwards of its path give
    (embedding target ids): with every candidate kept (k at level 1, k per frontier node
    below), each expanded node's children are exactly its top k."""
    drafter = reduced_vocab_drafter(target, seed)
    prompt = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        cache = target.new_cache(1, 64)
        out = target.prefill(prompt, cache)
        first = int(out.logits[0, -1].argmax())
        proposer = DrafterProposer(drafter, config, 0.0)
        proposer.start(prompt, torch.tensor([prompt.shape[1]]), out.features,
                       torch.tensor([first]), 64)
        reference_cache = drafter.new_cache(1, 64)
        drafter.prefill(prompt[:, 1:], out.features[:, :-1], reference_cache, logits=False)
        tree = proposer.propose(torch.tensor([first]))
        feature = out.features[:, -1:]
        tokens, parents = tree.tokens[0].tolist(), tree.parents[0].tolist()
        paths = {0: []}
        for i in range(1, len(tokens)):
            paths[i] = paths[parents[i]] + [tokens[i]]
        assert len(paths) == config.total_tokens + 1  # no padding: every candidate kept
        expanded = 0
        for i in paths:
            children = [tokens[j] for j in range(1, len(tokens)) if parents[j] == i]
            if children:
                expanded += 1
                assert children == explicit_children(drafter, reference_cache, first,
                                                     feature, paths[i], config.topk)
        assert expanded == 1 + (config.depth - 1) * (config.topk if config.topk > 1 else 1)


class RecordingOracle(NoisyOracle):
    """A `NoisyOracle` that keeps what the loop feeds back after every step."""

    def start(self, prompt_ids, lengths, features, first_tokens, capacity):
        super().start(prompt_ids, lengths, features, first_tokens, capacity)
        self.fed = []

    def advance(self, emitted, num_accepted, features):
        self.fed.append((emitted.clone(), num_accepted.clone(), features.clone()))
        super().advance(emitted, num_accepted, features)


def test_proposer_gets_the_accepted_paths_features(target, references, gen):
    """After each step the proposer receives the target's features of the root and of the
    accepted tokens in path order (the drafter pairs them with the next tokens), equal to a
    full causal forward's at those positions — not the verified tree's nodes in tree order."""
    prompt, config = PROMPTS[0], TreeConfig(3, 3, 9)
    oracle = RecordingOracle([prompt + references[0]], config, gen, bump=6.0)
    generate(target, oracle, [prompt], 18, tree=config, ignore_eos=True)
    full = prompt + references[0]
    with torch.no_grad():
        features = target.run(torch.tensor([full])).features[0]
    root, deepest = len(prompt), 0
    for emitted, num, fed in oracle.fed:
        n = int(num[0])
        assert emitted[0, :n + 1].tolist() == full[root + 1:root + n + 2]
        torch.testing.assert_close(fed[0, :n + 1], features[root:root + n + 1], rtol=0,
                                   atol=1e-4)
        root, deepest = root + n + 1, max(deepest, n)
    assert deepest >= 2  # accepted paths below level 1: the tree order differs from theirs
