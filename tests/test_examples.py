"""The example programs in python/ (used by the README) run and print what they promise."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vsd_ext

ROOT = Path(__file__).resolve().parents[1]


def run_example(name, *args, timeout=120, **env_vars):
    env = dict(os.environ, **env_vars, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    done = subprocess.run([sys.executable, str(ROOT / "python" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("drafter")
    vsd_ext.Drafter.for_target(vsd_ext.load_target("default")).save_pretrained(path)
    return path


def test_quickstart(drafter_dir):
    out = run_example("quickstart.py", drafter_dir, "--max-new-tokens", "12")
    tau = float(out.split("tau = ")[1].split()[0])
    assert tau >= 1.0 and "12 tokens in" in out
    assert out.startswith(vsd_ext.corpus.prompts("heldout", limit=1)[0])


def test_evaluate_drafter(drafter_dir, tmp_path):
    out = run_example("evaluate_drafter.py", drafter_dir, "--out", tmp_path, "--num-prompts",
                      "2", "--max-new-tokens", "8", "--lossless-samples", "64")
    report = json.loads((tmp_path / "report.json").read_text())
    name = drafter_dir.name
    assert [(r["method"], r["temperature"]) for r in report["results"]] == [
        ("autoregressive", 0.0), (name, 0.0), ("autoregressive", 1.0), (name, 1.0)]
    assert all(r["lossless"] for r in report["results"])
    assert name in out and "wrote" in out and (tmp_path / "report.png").is_file()


def test_train_drafter(tmp_path):
    out = run_example("train_drafter.py", "--out", tmp_path, "--minutes", "0.02", "--rows", "8",
                      "--no-progress", timeout=300, OMP_NUM_THREADS="1")
    for name in ("eagle3", "vsd"):
        assert (tmp_path / name / "model.safetensors").is_file()
        line = next(row for row in out.splitlines() if row.startswith(name))
        assert float(line.split("T=0 ")[1].split()[0]) >= 1.0
    summary = (tmp_path / "vsd" / "summary.json").read_text()
    assert '"method": "vsd"' in summary
