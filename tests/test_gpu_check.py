"""bench/gpu_check.sh: without a GPU it stops in its preflight, within seconds, before building,
and names the missing GPU; its step timeouts fit a 10-minute device run."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_step_timeouts_fit_a_device_run():
    total = subprocess.run(["bash", str(SCRIPT), "--budget"], capture_output=True, text=True,
                           check=True, timeout=30)
    assert 0 < int(total.stdout) <= 540


def fake_nvidia_smi(directory: Path) -> str:
    """A PATH whose nvidia-smi answers (a machine with the driver tools but no usable GPU)."""
    smi = directory / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 580.0, 143771 MiB'\n")
    smi.chmod(0o755)
    return f"{directory}:{os.environ['PATH']}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the check would run")
@pytest.mark.parametrize("nvidia_smi", [False, True], ids=["no-nvidia-smi", "torch-sees-no-gpu"])
def test_without_a_gpu_it_fails_fast_before_building(tmp_path, nvidia_smi):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    if nvidia_smi:
        (tmp_path / "bin").mkdir()
        env["PATH"] = fake_nvidia_smi(tmp_path / "bin")
    else:  # a PATH without nvidia-smi, whatever this machine has
        env["PATH"] = ":".join(p for p in env["PATH"].split(":")
                               if not (Path(p) / "nvidia-smi").exists())
    start = time.monotonic()
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env,
                         timeout=120)
    seconds = time.monotonic() - start
    output = run.stdout + run.stderr
    assert run.returncode != 0, output
    assert "no NVIDIA GPU" in output or "no CUDA GPU" in output, output
    assert output.rstrip().splitlines()[-1].startswith("GPU CHECK: FAIL (preflight"), output
    assert "=== build" not in output and not list(out.glob("_C*")), "nothing may be built"
    # No nvidia-smi: a shell test. Else the time to import torch (slow on a loaded machine).
    limit = 60 if nvidia_smi else 10
    assert seconds < limit, f"the preflight took {seconds:.0f} s"
