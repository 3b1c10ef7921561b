"""`vsd demo` end to end at a tiny size: every stage runs, the report has the documented schema,
the plot is written, and a re-run reuses the finished stages."""
import json

from vsd_ext.app.cli import main

TINY = ["--minutes", "0.03", "--rows", "8", "--num-prompts", "1", "--max-new-tokens", "6",
        "--no-progress"]


def test_demo_writes_report_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "tau" in printed and "speedup" in printed and str(out / "report.json") in printed
    report = json.loads((out / "report.json").read_text())
    rows = {(r["method"], r["temperature"]): r for r in report["results"]}
    assert set(rows) == {(m, t) for m in ("autoregressive", "eagle3", "vsd") for t in (0.0, 1.0)}
    for r in rows.values():
        assert isinstance(r["tau"], float) and r["tau"] >= 1.0
        assert r["tokens_per_second"] > 0 and r["speedup"] > 0
        assert r["lossless"] is True
    assert rows[("autoregressive", 0.0)]["tau"] == 1.0
    assert rows[("autoregressive", 0.0)]["speedup"] == 1.0
    assert (out / "report.png").stat().st_size > 10_000
    for method in ("eagle3", "vsd"):
        summary = json.loads((out / f"drafter_{method}" / "summary.json").read_text())
        assert summary["config"]["method"] == method and summary["steps"] >= 1

    # A re-run reuses the dataset and both drafters (they are not trained again).
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("drafter_*/model.safetensors")}
    assert main(["demo", "--out", str(out), *TINY]) == 0
    assert "reusing" in capsys.readouterr().out
    assert stamp == {p: p.stat().st_mtime_ns for p in out.glob("drafter_*/model.safetensors")}
