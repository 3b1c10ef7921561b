"""The build: build_info, CUDA compiled whenever it can be, CMakeLists.txt in sync with setup.py."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import build_config
import vsd_ext
from vsd_ext import _loader

ROOT = Path(build_config.ROOT)


def test_build_info_reports_the_build():
    info = vsd_ext.build_info()
    assert info["version"] == vsd_ext.__version__
    assert torch.__version__.startswith(info["torch_built_against"])
    assert isinstance(info["with_cuda"], bool)
    assert info["cxx_compiler"].split()[0] in ("gcc", "clang")
    if info["with_cuda"]:
        assert info["cuda_compiler"].startswith("nvcc ")
        assert "9.0" in info["cuda_archs"], "the default arch list must cover Hopper"
    else:
        assert info["cuda_compiler"] is None and info["cuda_archs"] == []


def test_cuda_kernels_are_built_whenever_they_can_be():
    """No GPU is needed to build: with a CUDA torch and nvcc, CUDA must be compiled and linked."""
    if os.environ.get("VSD_EXT_CUDA", "auto") == "0":
        pytest.skip("VSD_EXT_CUDA=0 asked for a CPU-only build")
    reason = build_config.cuda_unavailable_reason()
    assert vsd_ext.build_info()["with_cuda"] == (reason is None), reason


def test_every_op_has_cpu_and_cuda_kernels_registered():
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("vsd_ext::"))
    assert "vsd_ext::verify_tree" in ops and "vsd_ext::tree_attention" in ops
    keys = ["CPU"] + (["CUDA"] if vsd_ext.build_info()["with_cuda"] else [])
    for name in ops:
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (
                f"{name} has no {key} kernel")


def test_cpu_kernels_run_in_parallel():
    """at::parallel_for is parallel only when the extension is compiled with OpenMP."""
    assert "-fopenmp" in build_config.CXX_FLAGS and "-fopenmp" in build_config.LINK_FLAGS
    assert vsd_ext.load_extension().compiled_build_info()["openmp"]


def test_missing_extension_fails_with_a_rebuild_hint(monkeypatch):
    def fail(name):
        raise ImportError("undefined symbol: _ZN3c104impl")

    monkeypatch.setattr(_loader.importlib, "import_module", fail)
    with pytest.raises(ImportError, match=r"make build.*--no-build-isolation"):
        _loader.load_extension()


def _cmake_list(text: str, name: str) -> list[str]:
    match = re.search(rf"^set\({name}\s+([^)]*)\)", text, re.MULTILINE)
    assert match, f"CMakeLists.txt does not set {name}"
    return match.group(1).split("#")[0].split()


def test_cmakelists_declares_the_same_sources_and_flags():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert _cmake_list(text, "VSD_CPU_GLOBS") == build_config.CPU_GLOBS
    assert _cmake_list(text, "VSD_CUDA_GLOBS") == build_config.CUDA_GLOBS
    assert _cmake_list(text, "VSD_CXX_FLAGS") == build_config.CXX_FLAGS
    assert _cmake_list(text, "VSD_NVCC_FLAGS") == build_config.NVCC_FLAGS
    assert _cmake_list(text, "VSD_LINK_FLAGS") == build_config.LINK_FLAGS
    arch = build_config.DEFAULT_CUDA_ARCH_LIST.split("+")[0].replace(".", "")
    assert _cmake_list(text, "VSD_DEFAULT_CUDA_ARCHITECTURES") == [arch]


@pytest.mark.parametrize("cuda", ["0", "auto"])
def test_cmake_configures_the_same_translation_units(tmp_path, cuda):
    """Configure with CMake and compare compile_commands.json against build_config."""
    cmake = shutil.which("cmake", path=os.path.dirname(sys.executable)) or shutil.which("cmake")
    assert cmake, "cmake is a test dependency (pip install cmake)"
    ninja = shutil.which("ninja") or os.path.join(os.path.dirname(sys.executable), "ninja")
    env = dict(os.environ)
    if "CUDA_HOME" not in env and os.path.exists("/usr/local/cuda/bin/nvcc"):
        env["CUDA_HOME"] = "/usr/local/cuda"
    subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(tmp_path), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
         f"-DPython3_EXECUTABLE={sys.executable}", f"-DVSD_EXT_CUDA={cuda}"],
        check=True, capture_output=True, env=env)
    commands = json.loads((tmp_path / "compile_commands.json").read_text())
    files = sorted(os.path.relpath(c["file"], ROOT) for c in commands)
    with_cuda = cuda != "0" and build_config.cuda_unavailable_reason() is None
    assert files == sorted(build_config.sources(with_cuda))
    for c in commands:
        flags = build_config.NVCC_FLAGS if c["file"].endswith(".cu") else build_config.CXX_FLAGS
        for flag in flags + ["-std=c++20", f"-DVSD_EXT_WITH_CUDA={int(with_cuda)}"]:
            assert flag in c["command"].split(), f"{flag} missing for {c['file']}"


# csrc/README.md, "File roles": <op>[_<part>]_<role>.<ext>, plus the files all ops share.
_CSRC_SHARED = {"README.md", "registration.cpp", "module.cpp", "checks.h", "host_device.h",
                "cpu_simd.h", "cuda/common.cuh", "cuda/kernel_dtype.h", "cuda/mma.cuh",
                "cuda/build_info.cu"}
_CSRC_ROLES = re.compile(r"[a-z0-9_]+_(math|checks|driver)\.h|[a-z0-9_]+_cpu\.(h|cpp)"
                         r"|cuda/[a-z0-9_]+_(kernel\.cuh|kernel\.cu|device\.cuh|adapter\.cpp)")


def _csrc_files() -> list[str]:
    csrc = ROOT / "csrc"
    return sorted(str(p.relative_to(csrc)) for p in csrc.rglob("*") if p.is_file())


def test_csrc_file_names_state_their_role():
    odd = [f for f in _csrc_files() if f not in _CSRC_SHARED and not _CSRC_ROLES.fullmatch(f)]
    assert not odd, f"csrc files without a role suffix (see csrc/README.md): {odd}"


def test_cuda_kernels_include_no_torch_header():
    """The .cu files and everything they include are torch-free (see csrc/README.md, Layers)."""
    csrc = ROOT / "csrc"
    include = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.MULTILINE)
    for cu in sorted((csrc / "cuda").glob("*.cu")):
        todo, seen = [cu], set()
        while todo:
            path = todo.pop()
            if path in seen:
                continue
            seen.add(path)
            for kind, name in include.findall(path.read_text()):
                assert not name.startswith(("ATen/", "torch/", "c10/")), (
                    f"{cu.name} reaches <{name}> through {path.relative_to(csrc)}")
                if kind == '"':
                    todo.append(csrc / name if (csrc / name).exists() else path.parent / name)


@pytest.mark.parametrize("benchmark_only", [False, True])
def test_test_command_runs_no_benchmarks_and_bench_command_only_benchmarks(benchmark_only):
    args = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    args += ["--benchmark-only"] if benchmark_only else []
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    ids = [line for line in out.splitlines() if "::" in line]
    assert ids, out
    wanted = "bench/" if benchmark_only else "tests/"
    assert all(i.startswith(wanted) for i in ids), [i for i in ids if not i.startswith(wanted)][:5]
