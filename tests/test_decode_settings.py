"""Decode settings (vsd_ext.models.decode_settings) and their fit (vsd_ext.decoding.calibrate):
the file round-trips and rejects bad content naming the field; load_drafter reads it and
generate applies it by default, overridable; the calibrated ranking changes which nodes a
tree keeps but never what is generated (T = 0 identical to greedy decoding for any t_r,
T > 0 exact in distribution); the acceptance statistics against known answers;
calibrate_drafter and `vsd calibrate` end to end."""
import json

import pytest
import torch
from test_decoding import PROMPTS, exact_first_tokens, greedy_reference, random_drafter

from vsd_ext.app.cli import main
from vsd_ext.decoding import TreeConfig, build_tree, calibrate_drafter, generate
from vsd_ext.decoding.calibrate import _Recorder, sampled_acceptance
from vsd_ext.models import DecodeSettings, DecodeSettingsError, load_drafter
from vsd_ext.models.decode_settings import Acceptance

from helpers import chi2_pvalue, save_checkpoint, tiny_target, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = Acceptance("greedy", 0.0, ((0.6, 0.8), (0.7, 0.85)), (100, 60))
SAMPLED = Acceptance("sampled", 1.0, ((0.5, 0.7), (0.55, 0.72)), (90, 50))
SETTINGS = DecodeSettings((0.4, 0.6), (GREEDY, SAMPLED), {"prompts": "test"})


@pytest.fixture(scope="module")
def target():
    return tiny_target(1234)


@pytest.fixture(scope="module")
def references(target):
    return [greedy_reference(target, p, 20) for p in PROMPTS]


def test_round_trip(tmp_path):
    path = SETTINGS.save(tmp_path)
    assert path == tmp_path / "decode_settings.json"
    loaded = DecodeSettings.load(tmp_path)
    assert loaded == SETTINGS and loaded.fit == {"prompts": "test"}
    assert DecodeSettings.load(SETTINGS.save(tmp_path / "x.json")) == SETTINGS
    assert DecodeSettings.from_dict(json.loads(SETTINGS.to_json())) == SETTINGS
    assert [loaded.ranking_temperature_at(d) for d in (1, 2, 3, 9)] == [0.4, 0.6, 0.6, 0.6]
    assert loaded.find("sampled") == [SAMPLED] and loaded.find("target_only") == []
    assert DecodeSettings(0.5).ranking_temperature_at(4) == 0.5


@pytest.mark.parametrize("change,field", [
    ({"format": "other"}, "format"), ({"version": 2}, "version"),
    ({"ranking_temperature": 0}, "ranking_temperature"),
    ({"ranking_temperature": []}, "ranking_temperature"),
    ({"ranking_temperature": "hot"}, "ranking_temperature"),
    ({"acceptance": {}}, "acceptance"), ({"fit": []}, "fit"),
    ({"acceptance": [{"mode": "beam", "temperature": 1.0}]}, "acceptance.mode"),
    ({"acceptance": [{"mode": "greedy", "temperature": 1.0}]}, "acceptance.temperature"),
    ({"acceptance": [{"mode": "sampled", "temperature": 0.0}]}, "acceptance.temperature"),
    ({"acceptance": [{**GREEDY.to_dict(), "cumulative": [[0.5, 1.5]]}]},
     "acceptance.cumulative"),
    ({"acceptance": [{**GREEDY.to_dict(), "cumulative": [[0.7, 0.5]]}]},
     "acceptance.cumulative"),
    ({"acceptance": [{**GREEDY.to_dict(), "reached": [1]}]}, "acceptance.reached"),
])
def test_bad_settings_name_the_field(change, field, tmp_path):
    raw = {**SETTINGS.to_dict(), **change}
    with pytest.raises(DecodeSettingsError, match=f"'{field}'"):
        DecodeSettings.from_dict(raw)
    (tmp_path / "decode_settings.json").write_text("{not json")
    with pytest.raises(DecodeSettingsError, match="not JSON"):
        DecodeSettings.load(tmp_path)
    with pytest.raises(DecodeSettingsError, match="no such file"):
        DecodeSettings.load(tmp_path / "missing.json")


def test_loaded_and_applied_by_default_and_overridable(target, tmp_path, seed):
    random_drafter(target, seed).save_pretrained(tmp_path)
    assert load_drafter(tmp_path, target).decode_settings is None
    SETTINGS.save(tmp_path)
    drafter = load_drafter(tmp_path, target)
    assert drafter.decode_settings == SETTINGS
    tree = TreeConfig(depth=3, topk=3, total_tokens=6)

    def ranking(**kw):
        out = generate(target, drafter, PROMPTS[0], 6, **kw)
        return out.stats["plan"]["tree"]["ranking_temperature"]

    assert ranking(tree=tree) == (0.4, 0.6)
    assert ranking(tree=TreeConfig(3, 3, 6, ranking_temperature=0.9)) == 0.9
    assert ranking(tree=tree, decode_settings=None) is None
    assert ranking(tree=tree, decode_settings="off") is None
    assert ranking(tree=tree, decode_settings=DecodeSettings(0.7)) == 0.7
    assert ranking(tree=tree, decode_settings={"ranking_temperature": 0.8}) == 0.8
    assert ranking(tree=tree, decode_settings=str(tmp_path)) == (0.4, 0.6)
    with pytest.raises(ValueError, match="decode_settings"):
        generate(target, drafter, PROMPTS[0], 2, tree=tree, decode_settings=3)
    with pytest.raises(ValueError, match="ranking_temperature"):
        TreeConfig(ranking_temperature=-1.0)


def test_ranking_temperature_changes_the_kept_nodes():
    """Root children a (p 0.6) and b (0.4); below a a flat distribution, below b a token c of
    probability 0.5. With 3 nodes, t_r = 1 keeps a, b and c (0.2 > 0.6 / 6); t_r = 0.2
    sharpens a to 0.88 and b to 0.12: two flat children of a (0.88 / 6 each) outrank b."""
    V = 6
    root = torch.tensor([[0.6, 0.4, 1e-9, 1e-9, 1e-9, 1e-9]]).log()
    below_b = torch.tensor([0.0, 0.0, 0.0, float(torch.tensor(5.0).log()), 0.0, 0.0])

    def expand(tokens, parent_slot, valid):
        return torch.stack([torch.zeros(V) if t == 0 else below_b
                            for t in tokens[0].tolist()])[None]

    def kept(t_r):
        tree = build_tree(root, expand, TreeConfig(2, 2, 3, ranking_temperature=t_r),
                          torch.tensor([5]))
        return tree.tokens[0, 1:].tolist(), tree.parents[0, 1:].tolist()

    assert kept(1.0) == ([0, 1, 3], [0, 0, 2])   # a, b, then c below b (node 2)
    tokens, parents = kept(0.2)
    assert tokens[0] == 0 and parents == [0, 1, 1]  # a and two of its children


@pytest.mark.parametrize("t_r", [0.1, 0.5, 3.0, (0.2, 1.0, 4.0)])
@pytest.mark.parametrize("rows", [slice(0, 1), slice(0, 4)])
def test_greedy_output_is_identical_for_any_ranking(target, references, t_r, rows, seed):
    drafter = random_drafter(target, seed, scale=2.0)
    config = TreeConfig(depth=4, topk=3, total_tokens=7, ranking_temperature=t_r)
    out = generate(target, drafter, PROMPTS[rows], 20, tree=config)
    assert out.tokens == references[rows]


@pytest.mark.parametrize("config", [TreeConfig(3, 3, 6, sampled=False, ranking_temperature=0.3),
                                    TreeConfig(3, 3, 6, ranking_temperature=(0.3, 3.0)),
                                    TreeConfig()])
def test_sampling_with_calibrated_ranking_is_the_targets(config, gen):
    V, n, R, temperature = 8, 3, 5000, 0.9
    target = tiny_target(2345, vocab=V, layers=2, hidden=32, scale=0.5)
    drafter = random_drafter(target, 12345, scale=3.0)
    prompts = [[2, 5, 1], [7, 3, 3, 0, 6, 4]]
    batch = [prompts[i % 2] for i in range(2 * R)]
    out = generate(target, drafter, batch, n, temperature=temperature, tree=config,
                   generator=gen, ignore_eos=True, decode_settings=SETTINGS)
    if out.stats["plan"]["tree"] is not None:  # the cost model may choose plain decoding
        hist = out.stats["acceptance_histogram"]
        assert sum(hist[1:]) > 0.1 * sum(hist)
    tokens = torch.tensor(out.tokens)
    codes = (tokens * torch.tensor([V * V, V, 1])).sum(1)
    for i, prompt in enumerate(prompts):
        observed = torch.bincount(codes[i::2], minlength=V ** n).double()
        expected = R * exact_first_tokens(target, prompt, n, temperature)
        assert chi2_pvalue(observed, expected) > 1e-5


# ---- the acceptance statistics ------------------------------------------------------------

class _Drafter:
    """What `_Recorder` reads of a drafter: an identity draft vocabulary of size V."""

    def __init__(self, V):
        self.draft_vocab_size, self.d2t = V, torch.zeros(V, dtype=torch.int64)

    def to_target_ids(self, ids):
        return ids


def test_greedy_statistics_count_ranks_of_reached_depths():
    V, D, K = 5, 3, 2
    rec = _Recorder(_Drafter(V), V, 0.0, D, K, (1.0,), 1, None)
    # Two rows; the drafter ranks token j by logit -j at every level (token 0 first).
    for _ in range(D):
        rec.on_level(-torch.arange(V, dtype=torch.float32).expand(2, 1, V))
    target = torch.full((2, D + 1, V), -5.0)
    target[0, 0, 0] = target[0, 1, 1] = target[0, 2, 3] = 5.0  # ranks 0, 1, 3
    target[1, 0, 2] = target[1, 1, 0] = 5.0                    # ranks 2, 0
    tree = type("T", (), {"tokens": torch.tensor([[9, 0, 1, 3], [9, 2, 0, -1]])})
    rec.observe(tree, target, torch.tensor([2, 0]))  # row 0 reached 3 depths, row 1 one
    assert rec.reached.tolist() == [2, 1, 1]
    assert rec.sums["greedy"].tolist() == [[1, 1], [0, 1], [0, 0]]
    logq = torch.log_softmax(-torch.arange(V, dtype=torch.float64), 0)
    assert rec.nll[0].tolist() == pytest.approx([-float(logq[0] + logq[2]), -float(logq[1]),
                                                 -float(logq[3])])
    assert rec.tables() == []  # no depth reached MIN_REACHED times
    table = rec.tables(min_reached=2)
    assert [a.mode for a in table] == ["greedy"]  # depths 2, 3: too few, copy depth 1
    assert table[0].cumulative == ((0.5, 0.5),) * 3 and table[0].reached == (2, 1, 1)


def test_sampled_and_top_k_statistics_against_exact_values(gen):
    V, K, T = 6, 3, 0.8
    p = torch.randn(4, V, generator=gen) * 2
    q_logits = torch.randn(4, V, generator=gen) * 2
    q = torch.softmax(q_logits / T, -1)
    # One child drawn from q is accepted with probability sum(min(p_T, q)).
    est = sampled_acceptance(p, q, T, K, 4000, gen)
    exact = torch.minimum(torch.softmax(p / T, -1), q).sum(-1)
    assert est[:, 0] == pytest.approx(exact, abs=0.04)
    assert (est[:, 1:] >= est[:, :-1]).all() and (est[:, -1] <= 1).all()
    # With all V children drawn, one of them is always accepted.
    assert sampled_acceptance(p, q, T, V, 50, gen)[:, -1].tolist() == [1.0] * 4
    rec = _Recorder(_Drafter(V), V, T, 1, K, (1.0,), 200, gen)
    rec.on_level(q_logits[:, None])
    tree = type("T", (), {"tokens": torch.zeros(4, 2, dtype=torch.int64)})
    rec.observe(tree, p[:, None].expand(4, 2, V), torch.zeros(4, dtype=torch.int64))
    top = q_logits.topk(K, -1).indices
    mass = torch.softmax(p / T, -1).gather(1, top).cumsum(1).sum(0)
    assert rec.sums["target_only"][0] == pytest.approx(mass.double(), abs=1e-5)


# ---- calibrate_drafter and `vsd calibrate` -------------------------------------------------

def test_calibrate_drafter_writes_settings_that_load(target, tmp_path, seed):
    random_drafter(target, seed, scale=2.0).save_pretrained(tmp_path)
    ids = [p * 2 for p in PROMPTS]
    written = calibrate_drafter(target, tmp_path, ids, max_new_tokens=10, grid=(0.5, 1.0),
                                depth=3, topk=2, samples=4,
                                reference_tree=TreeConfig(3, 2, 4))
    loaded = load_drafter(tmp_path, target).decode_settings
    assert loaded == DecodeSettings.from_dict(written)
    fit = written["fit"]
    assert fit["grid"] == [0.5, 1.0] and len(fit["tau"]) == 2
    chosen = fit["grid"].index(written["ranking_temperature"])
    assert fit["tau"][chosen] == max(fit["tau"])
    assert fit["num_prompts"] == 4 and "token-id" in fit["prompts"]
    modes = [(a.mode, a.temperature) for a in loaded.acceptance]
    assert modes == [("greedy", 0.0), ("target_only", 1.0), ("sampled", 1.0)]
    for table in loaded.acceptance:
        assert all(len(row) == 2 for row in table.cumulative) and table.reached[0] > 0
    # The record of the NLL proxy: one value per grid point, per depth.
    assert len(fit["nll"]) == 2 and len(fit["nll_by_depth"]["0.5"]) == 3


def test_cli_calibrate_then_generate(target, tmp_path, capsys, seed):
    tok = word_tokenizer({f"t{i}": i for i in range(97)}, unk="t0")
    save_checkpoint(target, tmp_path / "target", tok)
    random_drafter(target, seed).save_pretrained(tmp_path / "draft")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(f"t{i}" for i in p * 3)}) + "\n"
                               for p in PROMPTS))
    capsys.readouterr()
    assert main(["calibrate", "--target", str(tmp_path / "target"), "--draft",
                 str(tmp_path / "draft"), "--prompts", str(prompts), "--num-prompts", "2",
                 "--max-new-tokens", "6", "--grid", "0.5", "1", "--draft-dtype",
                 "float32"]) == 0
    out = capsys.readouterr().out
    assert "ranking_temperature" in out and "wrote" in out
    settings = DecodeSettings.load(tmp_path / "draft")
    assert settings.fit["num_prompts"] == 2 and settings.fit["grid"] == [0.5, 1.0]
    assert main(["generate", "--target", str(tmp_path / "target"), "--draft",
                 str(tmp_path / "draft"), "--prompt", "t1 t2 t3", "--max-new-tokens", "6",
                 "--depth", "3", "--topk", "2", "--total-tokens", "4"]) == 0
    assert "tree depth 3 topk 2 4 nodes top-k" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # a bad flag: argparse's one line, status 2
        main(["calibrate", "--draft", str(tmp_path / "draft"), "--grid", "0"])
    assert exit_.value.code == 2 and "argument --grid" in capsys.readouterr().err
