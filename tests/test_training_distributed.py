"""`vsd train` from the command line, and under torchrun: 2 processes on CPU (gloo), DDP and
DDP + FSDP-sharded target, give the weights of one process with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from vsd_ext.app.cli import main
from vsd_ext.training.data import DataSplits

from helpers import random_dataset, write_tiny_target

ROOT = Path(__file__).resolve().parent.parent


def test_torchrun_gloo_two_processes_equal_one(tmp_path):
    target = write_tiny_target(tmp_path / "target")
    data = random_dataset(target, rows=12, seq_len=16, seed=2)
    DataSplits(data.rows(torch.arange(10)), data.rows(torch.arange(10, 12)),
               [[1, 2, 3]], "test").save(tmp_path / "data.pt")
    (tmp_path / "config.json").write_text(json.dumps({"warmup_steps": 1, "lr": 5e-3,
                                                      "vsd": {"anchors": 2, "paths": 3}}))
    common = ["--target", str(tmp_path / "target"), "--data", str(tmp_path / "data.pt"),
              "--method", "vsd", "--seq-len", "16", "--batch-size", "4", "--max-steps", "3",
              "--config", str(tmp_path / "config.json"), "--set", "vsd.depth=2",
              "--set", "eagle3.steps=2", "--no-progress"]
    assert main(["train", "--out", str(tmp_path / "single"), "--micro-batch-size", "2",
                 *common]) == 0
    summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["config"]["vsd"]["paths"] == 3
    assert summary["config"]["vsd"]["depth"] == 2 and summary["config"]["lr"] == 5e-3
    single = load_file(str(tmp_path / "single" / "model.safetensors"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp-target"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "vsd_ext", "train",
               "--out", str(tmp_path / name), *extra, *common]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        multi = load_file(str(tmp_path / name / "model.safetensors"))
        for key, value in single.items():
            assert torch.allclose(multi[key], value, rtol=1e-5, atol=1e-6), (name, key)
