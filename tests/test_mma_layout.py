"""The fragment mapping of the tensor-core kernels' ldmatrix loads, checked on the host.

No GPU is needed: tests/mma_layout_emulation.cpp includes csrc/cuda/mma.cuh (its lane-offset
functions are plain C++, the same ones the kernels call), emulates ldmatrix.x4 as the PTX ISA
defines it, and compares every lane's registers with the m16n8k16 operand layouts for each
operand the kernels load (A of Q / K / dO, B of K for S = Q K^T, B of V for O += P V by .trans),
plus 16-byte alignment and conflict-free banks of every row address.
"""
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ldmatrix_lane_offsets_give_the_mma_fragments(tmp_path):
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    assert compiler, "no C++ compiler found (the extension's build needs one too)"
    exe = tmp_path / "mma_layout_emulation"
    build = subprocess.run([compiler, "-std=c++20", "-O1", "-Wall", "-Werror",
                            f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "mma_layout_emulation.cpp"),
                            "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("ok "), run.stdout + run.stderr
    assert int(run.stdout.split()[1]) == 36864  # every (lane, register, half) of every load
