"""Loads the compiled extension and reports how it was built."""
from __future__ import annotations

import importlib
import platform

import torch

from ._version import __version__

_REBUILD_HINT = (
    "Rebuild it against the torch installed now: `make build` in the repository "
    "(or `pip install -e . --no-build-isolation`); see README.md, 'Install'."
)


def load_extension():
    """Import vsd_ext._C, failing loudly with a rebuild hint when it is missing or stale."""
    try:
        return importlib.import_module("vsd_ext._C")
    except ImportError as err:
        raise ImportError(
            f"vsd_ext: the compiled extension vsd_ext._C could not be loaded ({err}). "
            f"This happens when it was never built, or was built against another torch "
            f"(installed: {torch.__version__}). {_REBUILD_HINT}"
        ) from err


def build_info() -> dict:
    """How the loaded binary was built.

    Keys: ``version`` (package), ``torch_built_against`` and ``torch_runtime`` (versions),
    ``with_cuda`` (CUDA kernels linked in), ``cuda_archs`` (virtual architectures compiled,
    e.g. ``["9.0"]``), ``cxx_compiler``, ``cuda_compiler`` (None without CUDA),
    ``python`` and ``cuda_available`` (a GPU is visible now).
    """
    compiled = load_extension().compiled_build_info()
    return {
        "version": __version__,
        "torch_built_against": compiled["torch_version"],
        "torch_runtime": torch.__version__,
        "with_cuda": compiled["with_cuda"],
        "cuda_archs": compiled["cuda_archs"],
        "cxx_compiler": compiled["cxx_compiler"],
        "cuda_compiler": compiled["cuda_compiler"],
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
    }
