"""Single source of truth for what vsd_ext's two compiled libraries are built from and how.

  vsd_ext._C       the CPU library: CPU kernels, every op schema, the Python module. Always built;
                   links no CUDA library, so it loads with a CPU or a CUDA build of its torch.
  vsd_ext._C_cuda  the CUDA library: torch-free kernels and their adapters
                   (TORCH_LIBRARY_IMPL(vsd_ext, CUDA)). Built when nvcc and a CUDA build of torch
                   exist; vsd_ext loads it only when the running torch has CUDA.

setup.py imports this; CMakeLists.txt mirrors it and tests/test_build.py checks the two agree.
"""
from __future__ import annotations

import glob
import os
import shutil

ROOT = os.path.dirname(os.path.abspath(__file__))

CPU_LIBRARY = "vsd_ext._C"
CUDA_LIBRARY = "vsd_ext._C_cuda"
# Written by the build next to the libraries; vsd_ext/_loader.py reads it (same name there).
BUILD_RECORD = "_build_record.json"

# Host compiler flags for every C++ translation unit (CPU kernels and CUDA adapters). -fopenmp is
# what makes at::parallel_for parallel (ATen's OpenMP backend is a header template); the link
# resolves libgomp.so.1 to the copy torch already loaded, so there is one OpenMP runtime.
CXX_FLAGS = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function"]
LINK_FLAGS = ["-fopenmp"]
# nvcc flags for the torch-free CUDA kernels. No fast-math: verification must agree bit-for-bit
# with the CPU kernel given the same uniforms.
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler=-Wno-unused-function"]


# Source globs, relative to the repository root. CPU library: kernels + IMPL(CPU) + schemas +
# module. CUDA library: torch-free kernels (*.cu) plus their thin adapters (*.cpp: checks,
# stream, IMPL(CUDA)) and the nvcc build report (cuda/build_info.cu).
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


def include_dirs() -> list[str]:
    return [os.path.join(ROOT, "csrc")]


def cuda_unavailable_reason() -> str | None:
    """None when the CUDA library can be compiled here, else why not (no GPU is needed to build)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        return "nvcc not found (set CUDA_HOME to the CUDA toolkit)"
    return None
