"""The evaluation harness (vsd_ext.eval.harness): results and report.json schema, the baseline's
speedup of exactly 1, the oracle above an untrained drafter, the lossless checks passing for
real decoders and FAILING for deliberately broken ones (T = 0 and T > 0), the plot, the
bootstrap intervals, `vsd eval` end to end."""
import json

import pytest
import torch

import vsd_ext
from vsd_ext.app.cli import main
from vsd_ext.decoding import TreeConfig, generate
from vsd_ext.eval import (
    LosslessConfig,
    evaluate,
    format_table,
    harness,
    heldout_prompts,
    read_prompts_jsonl,
    write_report,
)
from vsd_ext.eval.stats import bootstrap_ratio_ci

CHECK = LosslessConfig(samples=128, prompts=2)
NEW = 16
REPORT_KEYS = {"method": str, "temperature": float, "tau": float, "tokens_per_second": float,
               "speedup": float, "lossless": bool}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return vsd_ext.load_target("default")


@pytest.fixture(scope="module")
def prompts():
    return heldout_prompts(3)


@pytest.fixture(scope="module")
def untrained(target):
    return vsd_ext.Drafter.for_target(target, seed=0)


@pytest.fixture(scope="module")
def results(target, prompts, untrained):
    return evaluate(target, {"oracle": "oracle", "untrained": untrained}, prompts,
                    temperatures=(0.0, 1.0), max_new_tokens=NEW, lossless_check=CHECK,
                    progress=False, tree=TreeConfig(depth=4, topk=4, total_tokens=12))


def by_key(results):
    return {(r["method"], r["temperature"]): r for r in results}


def test_results_structure(results, untrained):
    assert [(r["method"], r["temperature"]) for r in results] == [
        (m, t) for t in (0.0, 1.0) for m in ("autoregressive", "oracle", "untrained")]
    for r in results:
        for key, kind in REPORT_KEYS.items():
            assert isinstance(r[key], kind), key
        lo, hi = r["tau_ci95"]
        assert lo <= r["tau"] + 1e-12 and r["tau"] <= hi + 1e-12
        lo, hi = r["speedup_ci95"]
        assert lo <= r["speedup"] + 1e-12 and r["speedup"] <= hi + 1e-12
        assert r["new_tokens"] == 3 * NEW and r["num_prompts"] == 3
        hist = torch.tensor(r["acceptance_histogram"])
        # τ pools every (row, verify forward): B = 1, so row forwards = target forwards.
        assert int(hist.sum()) == r["target_forwards"] > 0
        assert r["tau"] == pytest.approx(float((hist * torch.arange(1, len(hist) + 1)).sum())
                                         / r["target_forwards"])
        assert r["lossless"] is True, r["lossless_detail"]
        assert r["tokens_per_second"] > 0 and r["time_s"]["total"] > 0
        assert "accepted draft tokens + 1" in r["tau_convention"]
    table = by_key(results)
    for t in (0.0, 1.0):
        base = table[("autoregressive", t)]
        assert base["speedup"] == 1.0 and base["tau"] == 1.0 and base["kind"] == "autoregressive"
        assert base["acceptance_histogram"] == [base["target_forwards"]]
    assert table[("untrained", 0.0)]["tree"]["total_tokens"] == 12
    assert len(table[("untrained", 0.0)]["acceptance_histogram"]) == 13
    assert table[("oracle", 0.0)]["lossless_detail"] == {
        "check": "exact_match", "identical": 3, "compared": 3, "passed": True}
    check = table[("untrained", 1.0)]["lossless_detail"]
    assert check["check"] == "pit_chi_square" and check["samples"] == 128
    assert sum(check["histogram"]) == 128 * CHECK.tokens


def test_oracle_beats_untrained(results):
    table = by_key(results)
    oracle, untrained = table[("oracle", 0.0)], table[("untrained", 0.0)]
    # The oracle drafts the target's greedy continuation: every draft is accepted, and the
    # NEW - 1 = 15 tokens after the prefill's take 3 full steps of depth 4 + 1.
    assert oracle["tau"] == 5.0 and oracle["acceptance_histogram"] == [0, 0, 0, 0, 9]
    assert oracle["tau"] > untrained["tau"] >= 1.0
    assert oracle["speedup"] > untrained["speedup"]


def test_report_json_and_plot(results, tmp_path):
    paths = write_report(results, tmp_path / "out", extra={"note": "test"})
    report = json.loads(paths["json"].read_text())
    assert paths["json"] == tmp_path / "out" / "report.json"
    assert report["note"] == "test" and "+ 1" in report["tau_convention"]
    assert len(report["results"]) == len(results)
    for row, r in zip(report["results"], results):
        for key, kind in REPORT_KEYS.items():
            assert isinstance(row[key], kind) and row[key] == r[key], key
        assert row["method"] in ("autoregressive", "oracle", "untrained")
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = format_table(results)
    assert table.splitlines()[0].split()[:3] == ["method", "T", "tau"]
    assert all(m in table for m in ("autoregressive", "oracle", "untrained", "PIT chi2"))
    assert "accepted draft tokens + 1" in table


def test_greedy_check_fails_on_a_broken_decoder(target, prompts, monkeypatch):
    """A speculative decoder that changes one token of one prompt is caught at T = 0."""
    calls = {"n": 0}

    def broken(target, drafter, prompts, max_new_tokens, temperature=0.0, tree=None, **kw):
        out = generate(target, drafter, prompts, max_new_tokens, temperature, tree, **kw)
        if drafter is not None and len(out.tokens) == 1 and max_new_tokens == NEW:
            calls["n"] += 1
            if calls["n"] == 2:  # the second prompt's timed run
                out.tokens[0][-1] = (out.tokens[0][-1] + 1) % target.vocab_size
        return out

    monkeypatch.setattr(harness, "generate", broken)
    res = by_key(evaluate(target, {"oracle": "oracle"}, prompts, temperatures=(0.0,),
                          max_new_tokens=NEW, progress=False))
    assert res[("autoregressive", 0.0)]["lossless"] is True
    assert res[("oracle", 0.0)]["lossless"] is False
    assert res[("oracle", 0.0)]["lossless_detail"]["identical"] == 2
    assert "NO (2/3 identical)" in format_table(list(res.values()))


@pytest.mark.parametrize("factor", [0.5, 1.5])
def test_sampling_check_fails_on_a_broken_decoder(target, prompts, monkeypatch, seed, factor):
    """A speculative decoder sampling at the wrong temperature is caught at T > 0, while the
    correct autoregressive decoder passes the same test."""
    def broken(target, drafter, prompts, max_new_tokens, temperature=0.0, tree=None, **kw):
        if drafter is not None:
            temperature *= factor
        return generate(target, drafter, prompts, max_new_tokens, temperature, tree, **kw)

    monkeypatch.setattr(harness, "generate", broken)
    res = by_key(evaluate(target, {"oracle": "oracle"}, prompts[:2], temperatures=(1.0,),
                          max_new_tokens=4, seeds=(seed,), lossless_check=CHECK,
                          progress=False))
    assert res[("autoregressive", 1.0)]["lossless"] is True
    detail = res[("oracle", 1.0)]["lossless_detail"]
    assert res[("oracle", 1.0)]["lossless"] is False and detail["p_value"] < 1e-6
    # Too sharp piles the PIT values near 0, too flat near 1.
    low, high = sum(detail["histogram"][:5]), sum(detail["histogram"][-5:])
    assert (low > high) == (factor < 1)


def test_bootstrap_intervals(gen):
    num = torch.rand(40, generator=gen) * 10 + 5
    den = torch.rand(40, generator=gen) + 1
    lo, hi = bootstrap_ratio_ci(num, den)
    point = float(num.sum() / den.sum())
    assert lo < point < hi and hi - lo < 0.5 * point
    assert bootstrap_ratio_ci(num, den, num, den) == [1.0, 1.0]  # paired: identical → 1
    assert bootstrap_ratio_ci([3.0], [2.0]) == [1.5, 1.5]        # one unit: no spread
    assert bootstrap_ratio_ci(num, den) == [lo, hi]              # reproducible
    with pytest.raises(ValueError, match="equal length"):
        bootstrap_ratio_ci([1.0, 2.0], [1.0])


def test_bad_arguments(target, untrained, tmp_path):
    with pytest.raises(ValueError, match="always included"):
        evaluate(target, {"plain": None}, [[1, 2, 3]], progress=False)
    with pytest.raises(ValueError, match="names the baseline"):
        evaluate(target, {"autoregressive": untrained}, [[1, 2, 3]], progress=False)
    with pytest.raises(ValueError, match="only string accepted is 'oracle'"):
        evaluate(target, {"x": "orcale"}, [[1, 2, 3]], progress=False)
    with pytest.raises(ValueError, match="temperatures"):
        evaluate(target, {}, [[1, 2, 3]], temperatures=(-1.0,), progress=False)
    with pytest.raises(ValueError, match="samples"):
        LosslessConfig(samples=0)
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "import os"}\n\n{"text": "def f():"}\n{"other": 1}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:4: expected an object"):
        read_prompts_jsonl(path)
    path.write_text('{"prompt": "import os"}\n\n{"text": "def f():"}\n')
    assert read_prompts_jsonl(path) == ["import os", "def f():"]


def test_cli_eval(tmp_path, untrained, capsys):
    untrained.save_pretrained(tmp_path / "mine")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in heldout_prompts(2)) + "\n")
    out = tmp_path / "report"
    assert main(["eval", "--draft", "oracle", "--draft", f"mine={tmp_path / 'mine'}",
                 "--prompts", str(prompts), "--temperature", "0", "1", "--max-new-tokens", "8",
                 "--lossless-samples", "64", "--depth", "3", "--topk", "4",
                 "--total-tokens", "8", "--sampled", "--out", str(out), "--threads", "1",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    rows = [(r["method"], r["temperature"]) for r in report["results"]]
    assert rows == [(m, t) for t in (0.0, 1.0) for m in ("autoregressive", "oracle", "mine")]
    assert all(r["lossless"] is True and r["num_prompts"] == 2 for r in report["results"])
    assert report["results"][2]["tree"] == {"depth": 3, "topk": 4, "total_tokens": 8,
                                            "sampled": True, "ranking_temperature": None,
                                            "adaptive": None}
    # Sampled trees: verified against the drafter's q at T > 0, top-k trees at T = 0.
    assert [r["mode"] for r in report["results"]] == ["greedy"] * 3 + [
        "target_only", "target_only", "sampled"]
    assert report["drafts"] == {"oracle": "oracle", "mine": str(tmp_path / "mine")}
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "mine" in printed and f"wrote {out / 'report.json'}" in printed
    assert main(["eval", "--draft", "=x"]) == 2
