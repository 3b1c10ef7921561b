"""Single source of truth for what vsd_ext._C is built from and how.

setup.py imports this; CMakeLists.txt mirrors it and tests/test_build.py checks the two agree.
"""
from __future__ import annotations

import glob
import os
import shutil

ROOT = os.path.dirname(os.path.abspath(__file__))

# Host compiler flags for every C++ translation unit (CPU kernels and CUDA adapters). -fopenmp is
# what makes at::parallel_for parallel (ATen's OpenMP backend is a header template); the link
# resolves libgomp.so.1 to the copy torch already loaded, so there is one OpenMP runtime.
CXX_FLAGS = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function"]
LINK_FLAGS = ["-fopenmp"]
# nvcc flags for the torch-free CUDA kernels. No fast-math: verification must agree bit-for-bit
# with the CPU kernel given the same uniforms.
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler=-Wno-unused-function"]


# Source globs, relative to the repository root. CPU: kernels + IMPL(CPU) + schemas + module.
# CUDA: torch-free kernels (*.cu) plus their thin adapters (*.cpp: checks, stream, IMPL(CUDA)).
CPU_GLOBS = ["csrc/*.cpp"]
CUDA_GLOBS = ["csrc/cuda/*.cu", "csrc/cuda/*.cpp"]
# Default CUDA architectures: Hopper SASS plus PTX that newer GPUs JIT-compile.
DEFAULT_CUDA_ARCH_LIST = "9.0+PTX"


def _expand(patterns: list[str]) -> list[str]:
    found = (glob.glob(os.path.join(ROOT, p)) for p in patterns)
    return sorted(os.path.relpath(f, ROOT) for files in found for f in files)


def cpu_sources() -> list[str]:
    return _expand(CPU_GLOBS)


def cuda_sources() -> list[str]:
    return _expand(CUDA_GLOBS)


def sources(with_cuda: bool) -> list[str]:
    return cpu_sources() + (cuda_sources() if with_cuda else [])


def include_dirs() -> list[str]:
    return [os.path.join(ROOT, "csrc")]


def define_macros(with_cuda: bool) -> list[tuple[str, str]]:
    return [("VSD_EXT_WITH_CUDA", "1" if with_cuda else "0")]


def cuda_unavailable_reason() -> str | None:
    """None when CUDA kernels can be compiled here, else why not (no GPU is needed to build)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        return "nvcc not found (set CUDA_HOME to the CUDA toolkit)"
    return None
