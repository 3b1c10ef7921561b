"""vsd_ext's PEP 517 build backend: setuptools' own, compiling against the torch of the
environment that installs vsd_ext, never another one.

Why: pip builds in an isolated environment by default. Were torch a build requirement, pip would
install the newest torch from the index there (a CUDA build, several GB) and compile against it
instead of the torch the user runs (issue #18: `libc10_cuda.so: cannot open shared object file`
at import). So torch is no build requirement. The hooks that compile find the torch installed in
the invoking environment and import that very installation (its site-packages directory goes to
the end of sys.path, after the build environment's own packages). Where they look, in order:

1. the interpreter running the hook, seen without the isolation overlay (`python -I`): pip
   isolates by sys.path and runs the backend with its own interpreter, so this is the user's
   environment for `pip install .`, `pip install -e .` and `pip wheel .`, isolated or not;
2. an activated environment, $VIRTUAL_ENV then $CONDA_PREFIX: for frontends that run the backend
   in an environment of their own (`python -m build`).

No torch in any: the build stops with a one-line instruction. Metadata and the sdist need no torch
(setup.py compiles nothing for them).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (
    build_sdist,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

__all__ = ["build_editable", "build_sdist", "build_wheel", "get_requires_for_build_editable",
           "get_requires_for_build_sdist", "get_requires_for_build_wheel",
           "prepare_metadata_for_build_editable", "prepare_metadata_for_build_wheel"]

MIN_TORCH = (2, 6)  # as [project] dependencies say
# Runs in a candidate interpreter under -I (no PYTHONPATH, no user site: none of pip's overlay).
# Finds torch without importing it: {"path": the directory holding the torch package, "version"}.
_PROBE = """
import importlib.metadata, importlib.util, json, os
spec = importlib.util.find_spec("torch")
try:
    version = importlib.metadata.version("torch")
except importlib.metadata.PackageNotFoundError:
    version = "unknown"
path = spec and os.path.dirname(os.path.dirname(spec.origin))
print(json.dumps(spec and {"path": path, "version": version}))
"""


def candidate_pythons() -> list[str]:
    """The interpreters whose torch a build may use, in order (see the module docstring)."""
    found = [sys.executable]
    for variable in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        if os.environ.get(variable):
            found.append(os.path.join(os.environ[variable], "bin", "python"))
    return found


def probe(python: str) -> dict | None:
    """Where `python` (with its own sys.path only) has torch, or None."""
    if not os.path.exists(python):
        return None
    done = subprocess.run([python, "-I", "-c", _PROBE], capture_output=True, text=True,
                          timeout=120)
    return json.loads(done.stdout) if done.returncode == 0 else None


def find_torch(pythons: list[str] | None = None) -> dict:
    """{"path", "version", "python"} of the first candidate interpreter that has torch."""
    pythons = pythons or candidate_pythons()
    for python in pythons:
        found = probe(python)
        if found:
            check_supported(found)
            return {**found, "python": python}
    raise SystemExit(
        f"vsd_ext: no torch to compile against (looked in {', '.join(pythons)}): install torch "
        "first (`pip install torch`, any build >= 2.6) in the environment vsd_ext goes into, "
        "then install vsd_ext again (for `python -m build`: activate that environment)")


def check_supported(found: dict) -> None:
    release = re.match(r"(\d+)\.(\d+)", found["version"])
    if release and tuple(map(int, release.groups())) < MIN_TORCH:
        raise SystemExit(f"vsd_ext: needs torch >= {'.'.join(map(str, MIN_TORCH))}, found "
                         f"{found['version']} in {found['path']}: `pip install -U torch` first")


def use_installed_torch() -> None:
    """Make the invoking environment's torch the one the build imports, and check it is."""
    found = find_torch()
    path = os.path.realpath(found["path"])
    if path not in (os.path.realpath(p) for p in sys.path):
        sys.path.append(path)
    import torch

    if not os.path.realpath(torch.__file__).startswith(path + os.sep):
        raise SystemExit(
            f"vsd_ext: the build environment has a torch of its own ({torch.__file__}); "
            f"vsd_ext must compile against the installed one ({found['version']} in {path})")
    print(f"vsd_ext: compiling against torch {torch.__version__} from {path}")


def get_requires_for_build_wheel(config_settings=None):
    find_torch()  # no torch: stop now, with the instruction, before anything is built
    return _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    find_torch()
    return _setuptools.get_requires_for_build_editable(config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    use_installed_torch()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    use_installed_torch()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
