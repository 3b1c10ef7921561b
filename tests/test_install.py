"""Installing as users do (build_backend.py): the build compiles against the torch installed where
vsd_ext is installed, also when pip isolates the build; without a usable torch it stops with one
line; the sdist carries csrc/, the build configuration and the assets, and needs no torch.

The full round trip (a fresh environment, `pip install -e .`, import, an op) is `.ci/run`'s."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import build_backend
import build_config

ROOT = Path(build_config.ROOT)
TORCH_HOME = Path(torch.__file__).resolve().parent.parent  # the directory holding torch


def run_python(code: str, python: str = sys.executable, **env) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_finds_the_torch_of_the_interpreter_running_the_build():
    found = build_backend.find_torch([sys.executable])
    assert Path(found["path"]).resolve() == TORCH_HOME
    assert found["version"].split("+")[0] == torch.__version__.split("+")[0]


@pytest.fixture
def build_environment(tmp_path) -> Path:
    """What pip puts on PYTHONPATH for an isolated build: the build requirements (setuptools),
    and a sitecustomize that drops the environment's site-packages (torch's) from sys.path."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    for package in ("setuptools", "_distutils_hack"):
        home = Path(__import__(package).__file__).resolve().parent
        (overlay / package).symlink_to(home, target_is_directory=True)
    (overlay / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"sys.path[:] = [p for p in sys.path if os.path.realpath(p) != {str(TORCH_HOME)!r}]\n"
        f"sys.path.append({str(ROOT)!r})\n")
    return overlay


def test_finds_the_torch_hidden_by_an_isolated_build(build_environment):
    """The backend must find, and then import, the environment's torch all the same."""
    code = ("import importlib.util, json, build_backend\n"
            "assert importlib.util.find_spec('torch') is None, 'the overlay did not hide torch'\n"
            "build_backend.use_installed_torch()\n"
            "import torch; print(json.dumps(torch.__file__))")
    out = run_python(code, PYTHONPATH=str(build_environment), PYTHONNOUSERSITE="1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert Path(json.loads(out.stdout.splitlines()[-1])).resolve().parent.parent == TORCH_HOME


@pytest.fixture(scope="module")
def python_without_torch(tmp_path_factory) -> str:
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return str(venv / "bin" / "python")


def test_without_torch_the_build_stops_with_one_line(python_without_torch):
    with pytest.raises(SystemExit) as stop:
        build_backend.find_torch([python_without_torch])
    message = str(stop.value)
    assert "\n" not in message and "no torch to compile against" in message
    assert python_without_torch in message and "`pip install torch`" in message


def test_without_torch_the_build_hook_stops_before_building(python_without_torch,
                                                            build_environment):
    """The hook that pip calls first, run as pip runs it, in an environment without torch."""
    out = run_python("import build_backend; build_backend.get_requires_for_build_editable()",
                     python=python_without_torch, PYTHONPATH=str(build_environment),
                     VIRTUAL_ENV="", CONDA_PREFIX="")
    assert out.returncode == 1 and not out.stdout
    assert out.stderr.strip().startswith("vsd_ext: no torch to compile against"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_torch_older_than_supported_stops_the_build():
    with pytest.raises(SystemExit, match=r"needs torch >= 2\.6, found 2\.5\.1"):
        build_backend.check_supported({"version": "2.5.1+cpu", "path": "/site-packages"})
    build_backend.check_supported({"version": "2.13.0+cpu", "path": "/site-packages"})


def test_a_torch_of_the_build_environment_stops_the_build(monkeypatch, tmp_path):
    """Were another torch importable first, the build would compile against it: it must stop."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(build_backend, "find_torch",
                        lambda: {"path": str(tmp_path), "version": "2.13.0", "python": "x"})
    with pytest.raises(SystemExit, match="has a torch of its own"):
        build_backend.use_installed_torch()


def test_sdist_carries_the_sources_the_build_configuration_and_the_assets(tmp_path):
    """Built as a frontend builds it, in a process where torch cannot be imported."""
    code = ("import sys; sys.modules['torch'] = None\n"
            f"import build_backend; print(build_backend.build_sdist({str(tmp_path)!r}))")
    out = run_python(code)
    assert out.returncode == 0, out.stderr[-3000:]
    with tarfile.open(tmp_path / out.stdout.splitlines()[-1]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files", "csrc", "vsd_ext"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    wanted = {"setup.py", "build_backend.py", "build_config.py", "pyproject.toml",
              "CMakeLists.txt", "README.md", *tracked}
    assert not wanted - names, f"missing from the sdist: {sorted(wanted - names)}"
    assert any(n.startswith("vsd_ext/assets/default_target/") for n in names)
    built = [n for n in names if n.endswith((".so", ".o", build_config.BUILD_RECORD))]
    assert not built, f"build outputs in the sdist: {built}"
