"""Loads vsd_ext's compiled libraries and reports how they were built.

Two libraries (build_config.py says what each holds):

- ``_C``, the CPU library: every op schema and the CPU kernels. Always loaded; it links no CUDA
  library, so it loads with a CPU or a CUDA build of the torch it was compiled against.
- ``_C_cuda``, the CUDA library: the CUDA kernels. Loaded only when the running torch has CUDA.

``_build_record.json``, written next to them by the build, names the torch they were compiled
against, the library files, and why there is no CUDA library when there is none. A torch release
other than the one compiled against fails the import with a one-line rebuild instruction.
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import json
import platform
import warnings
from pathlib import Path

import torch

from ._version import __version__

BUILD_RECORD = "_build_record.json"  # the name build_config.py gives the build
_PACKAGE = Path(__file__).resolve().parent
_REBUILD = ("rebuild it against the torch installed now: `pip install -e .` in the repository "
            "(or `pip install .`, `make build`); see README.md, 'Install'")


def read_build_record() -> dict:
    """What the build wrote next to the libraries (keys: torch, cpu_library, cuda_library,
    cuda_skipped)."""
    path = _PACKAGE / BUILD_RECORD
    if not path.is_file():
        raise ImportError(f"vsd_ext: the compiled extension was never built here (no {path}); "
                          f"{_REBUILD}")
    return json.loads(path.read_text())


def release(version: str) -> str:
    """A torch version without its local build tag: '2.14.1+cu130' -> '2.14.1'."""
    return version.split("+")[0]


def check_torch_release(record: dict) -> None:
    """The libraries work only with the torch release they were compiled against (any build of
    it: CPU or CUDA)."""
    if release(record["torch"]) != release(torch.__version__):
        raise ImportError(f"vsd_ext: compiled against torch {record['torch']}, but torch "
                          f"{torch.__version__} is installed: {_REBUILD}")


def load_extension():
    """Load the CPU library (and the CUDA library when torch has CUDA); return vsd_ext._C.

    Raises ImportError with a rebuild instruction when the build is missing or stale."""
    record = read_build_record()
    check_torch_release(record)
    try:
        module = importlib.import_module("vsd_ext._C")
    except ImportError as err:
        raise ImportError(f"vsd_ext: the CPU library vsd_ext._C could not be loaded ({err}) "
                          f"with torch {torch.__version__}: {_REBUILD}") from err
    cuda_library()
    return module


@functools.cache
def cuda_library() -> tuple[ctypes.CDLL | None, str]:
    """(the CUDA library, or None when it is not loaded; why), loading it on the first call."""
    record = read_build_record()
    if record["cuda_library"] is None:
        return None, f"not built: {record['cuda_skipped']}"
    if torch.version.cuda is None:
        return None, f"not loaded: torch {torch.__version__} has no CUDA"
    path = str(_PACKAGE / record["cuda_library"])
    try:
        torch.ops.load_library(path)  # runs its TORCH_LIBRARY_IMPL(vsd_ext, CUDA) registrations
    except OSError as err:
        warnings.warn(f"vsd_ext: the CUDA kernels are unavailable, the CUDA library did not load "
                      f"({err}); the CPU ops work. To fix, {_REBUILD}", RuntimeWarning,
                      stacklevel=2)
        return None, f"failed to load: {err}"
    return ctypes.CDLL(path), f"loaded: torch {torch.__version__} has CUDA {torch.version.cuda}"


def _cuda_compiler(library: ctypes.CDLL) -> tuple[str, list[str]]:
    """('nvcc X.Y', compiled virtual architectures such as ['9.0']) from the CUDA library."""
    version = library.vsd_ext_cuda_nvcc_version()
    archs = (ctypes.c_int * 16)()
    count = library.vsd_ext_cuda_archs(archs, len(archs))
    names = [f"{a // 100}.{a % 100 // 10}" for a in archs[:min(count, len(archs))]]
    return f"nvcc {version // 1000}.{version % 1000 // 10}", names


def build_info() -> dict:
    """How the loaded libraries were built, and what is loaded now and why.

    Keys: ``version`` (package), ``torch_built_against`` and ``torch_runtime`` (versions),
    ``cpu_library`` and ``cuda_library`` (file names; ``cuda_library`` is None when none was
    built), ``cuda_status`` (``"loaded: ..."``, ``"not loaded: ..."``, ``"not built: ..."`` or
    ``"failed to load: ..."``, with the reason), ``with_cuda`` (CUDA kernels registered now),
    ``cuda_archs`` (virtual architectures compiled, e.g. ``["9.0"]``; ``[]`` without the CUDA
    library loaded), ``cxx_compiler``, ``cuda_compiler`` (None likewise), ``openmp``, ``python``
    and ``cuda_available`` (a GPU is visible now).
    """
    compiled = load_extension().compiled_build_info()
    record = read_build_record()
    library, status = cuda_library()
    nvcc, archs = _cuda_compiler(library) if library is not None else (None, [])
    return {
        "version": __version__,
        "torch_built_against": record["torch"],
        "torch_runtime": torch.__version__,
        "cpu_library": record["cpu_library"],
        "cuda_library": record["cuda_library"],
        "cuda_status": status,
        "with_cuda": library is not None,
        "cuda_archs": archs,
        "cxx_compiler": compiled["cxx_compiler"],
        "cuda_compiler": nvcc,
        "openmp": compiled["openmp"],
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
    }
