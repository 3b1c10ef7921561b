"""The build: two libraries (the CPU one links no CUDA library; the CUDA one is built whenever it
can be and loaded only when torch has CUDA), build_info, stale builds failing with a rebuild
instruction, CMakeLists.txt in sync with setup.py, csrc's file roles."""
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import build_config
import vsd_ext
from vsd_ext import _loader

ROOT = Path(build_config.ROOT)
PACKAGE = ROOT / "vsd_ext"
# Shared objects of CUDA and of torch's CUDA half (names as in DT_NEEDED).
CUDA_LIBRARY_NAME = re.compile(r"cuda|cublas|cudnn|cufft|curand|cusolver|cusparse|nccl|nvrtc"
                               r"|nvjitlink|nvshmem|nvtoolsext", re.IGNORECASE)


def _record() -> dict:
    return json.loads((PACKAGE / build_config.BUILD_RECORD).read_text())


def test_build_info_reports_the_build():
    info, record = vsd_ext.build_info(), _record()
    compiled = vsd_ext.load_extension().compiled_build_info()
    assert info["version"] == vsd_ext.__version__
    assert info["torch_built_against"] == record["torch"]
    assert _loader.release(record["torch"]) == compiled["torch_version"]
    assert _loader.release(torch.__version__) == compiled["torch_version"]
    assert info["cxx_compiler"].split()[0] in ("gcc", "clang")
    assert (PACKAGE / info["cpu_library"]).is_file()
    if info["with_cuda"]:
        assert info["cuda_status"].startswith("loaded: ")
        assert info["cuda_compiler"].startswith("nvcc ")
        assert "9.0" in info["cuda_archs"], "the default arch list must cover Hopper"
    else:
        assert info["cuda_status"].startswith(("not built: ", "not loaded: ", "failed to load: "))
        assert info["cuda_compiler"] is None and info["cuda_archs"] == []


def test_the_build_and_the_loader_name_the_record_alike():
    assert _loader.BUILD_RECORD == build_config.BUILD_RECORD


def test_cuda_library_is_built_whenever_it_can_be():
    """No GPU is needed to build: with a CUDA torch and nvcc, the CUDA library must be built."""
    if os.environ.get("VSD_EXT_CUDA", "auto") == "0":
        pytest.skip("VSD_EXT_CUDA=0 asked for a CPU-only build")
    reason = build_config.cuda_unavailable_reason()
    assert (_record()["cuda_library"] is not None) == (reason is None), reason


def test_cuda_library_is_loaded_exactly_when_torch_has_cuda():
    record, info = _record(), vsd_ext.build_info()
    expected = record["cuda_library"] is not None and torch.version.cuda is not None
    loaded = [Path(p).name for p in torch.ops.loaded_libraries]
    assert info["with_cuda"] == expected == (record["cuda_library"] in loaded), info["cuda_status"]
    assert record["cpu_library"] not in loaded, "the CPU library is imported as a module"


def test_every_op_has_cpu_and_cuda_kernels_registered():
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("vsd_ext::"))
    assert "vsd_ext::verify_tree" in ops and "vsd_ext::tree_attention" in ops
    keys = ["CPU"] + (["CUDA"] if vsd_ext.build_info()["with_cuda"] else [])
    for name in ops:
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (
                f"{name} has no {key} kernel")


def elf_needed(path: Path) -> list[str]:
    """The DT_NEEDED entries of a 64-bit little-endian ELF shared object: the libraries the
    dynamic loader loads with it."""
    data = path.read_bytes()
    assert data[:6] == b"\x7fELF\x02\x01", f"{path} is not a 64-bit little-endian ELF file"
    (shoff,), (shentsize, shnum) = struct.unpack_from("<Q", data, 0x28), struct.unpack_from(
        "<HH", data, 0x3A)
    # Section headers: (name, type, flags, addr, offset, size, link, info, addralign, entsize).
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    dynamic = next(s for s in sections if s[1] == 6)  # SHT_DYNAMIC; s[6]: its string table
    strings_at = sections[dynamic[6]][4]
    needed = []
    for offset in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, value = struct.unpack_from("<qQ", data, offset)
        if tag == 1:  # DT_NEEDED
            start = strings_at + value
            needed.append(data[start:data.index(b"\0", start)].decode())
    return needed


def test_cpu_library_links_no_cuda_library():
    """The CPU library of any build (CUDA-enabled included) loads without CUDA libraries."""
    needed = elf_needed(PACKAGE / _record()["cpu_library"])
    assert "libc10.so" in needed and "libtorch_cpu.so" in needed, needed
    assert not [n for n in needed if CUDA_LIBRARY_NAME.search(n)], needed
    if shutil.which("readelf"):  # the parser agrees with binutils
        out = subprocess.run(["readelf", "-d", str(PACKAGE / _record()["cpu_library"])],
                             capture_output=True, text=True, check=True).stdout
        assert needed == re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def test_cuda_library_links_cuda():
    """The other half of the split (and proof that the check above can see CUDA)."""
    name = _record()["cuda_library"]
    if name is None:
        pytest.skip(f"no CUDA library in this build: {_record()['cuda_skipped']}")
    needed = elf_needed(PACKAGE / name)
    assert "libc10_cuda.so" in needed and any(n.startswith("libcudart") for n in needed), needed


_WITHOUT_TORCH_CUDA = """
import runpy, sys, torch
torch.version.cuda = None  # what a CPU build of torch says
runpy.run_path(".ci/user_smoke.py", run_name="__main__")
cuda = "{cuda_library}"
print("mapped:", any(line.rstrip().endswith("/" + cuda) for line in open("/proc/self/maps")))
"""


def test_without_cuda_in_torch_the_cpu_ops_run_and_the_cuda_library_stays_unloaded():
    record = _record()
    code = _WITHOUT_TORCH_CUDA.format(cuda_library=record["cuda_library"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    info_line, mapped_line = out.stdout.strip().splitlines()[-2:]
    info = json.loads(info_line)
    assert not info["with_cuda"] and mapped_line == "mapped: False"
    expected = ("not loaded: " if record["cuda_library"] else "not built: ")
    assert info["cuda_status"].startswith(expected), info["cuda_status"]


def test_cpu_kernels_run_in_parallel():
    """at::parallel_for is parallel only when the extension is compiled with OpenMP."""
    assert "-fopenmp" in build_config.CXX_FLAGS and "-fopenmp" in build_config.LINK_FLAGS
    assert vsd_ext.load_extension().compiled_build_info()["openmp"]


def test_missing_extension_fails_with_a_rebuild_instruction(monkeypatch):
    def fail(name):
        raise ImportError("undefined symbol: _ZN3c104impl")

    monkeypatch.setattr(_loader.importlib, "import_module", fail)
    with pytest.raises(ImportError, match=r"undefined symbol.*`pip install -e \.`"):
        _loader.load_extension()


def test_build_for_another_torch_fails_with_a_rebuild_instruction(monkeypatch):
    stale = {**_record(), "torch": "2.6.0+cpu"}
    monkeypatch.setattr(_loader, "read_build_record", lambda: stale)
    message = f"compiled against torch 2.6.0\\+cpu, but torch {re.escape(torch.__version__)}"
    with pytest.raises(ImportError, match=message + r".*`pip install -e \.`"):
        _loader.load_extension()


def test_another_build_of_the_same_torch_release_is_accepted(monkeypatch):
    other = {**_record(), "torch": _loader.release(torch.__version__) + "+cpu"}
    monkeypatch.setattr(_loader, "read_build_record", lambda: other)
    assert _loader.load_extension() is vsd_ext.load_extension()


def test_unbuilt_tree_fails_with_a_rebuild_instruction(monkeypatch, tmp_path):
    monkeypatch.setattr(_loader, "_PACKAGE", tmp_path)
    with pytest.raises(ImportError, match=r"never built here.*`pip install -e \.`"):
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


def _configure_cmake(build_dir: Path, cuda: str) -> list[dict]:
    """compile_commands.json of a CMake configuration of the repository."""
    cmake = shutil.which("cmake", path=os.path.dirname(sys.executable)) or shutil.which("cmake")
    assert cmake, "cmake is a test dependency (pip install cmake)"
    ninja = shutil.which("ninja") or os.path.join(os.path.dirname(sys.executable), "ninja")
    env = dict(os.environ)
    if "CUDA_HOME" not in env and os.path.exists("/usr/local/cuda/bin/nvcc"):
        env["CUDA_HOME"] = "/usr/local/cuda"
    subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
         f"-DCMAKE_MAKE_PROGRAM={ninja}", f"-DPython3_EXECUTABLE={sys.executable}",
         f"-DVSD_EXT_CUDA={cuda}"],
        check=True, capture_output=True, env=env)
    return json.loads((build_dir / "compile_commands.json").read_text())


@pytest.mark.parametrize("cuda", ["0", "auto"])
def test_cmake_configures_the_same_libraries(tmp_path, cuda):
    """Configure with CMake: each library compiles build_config's sources with its flags."""
    targets = {}
    for c in _configure_cmake(tmp_path, cuda):
        target = next(p for p in Path(c["output"]).parts if p.endswith(".dir"))[:-4]
        targets.setdefault(target, []).append(os.path.relpath(c["file"], ROOT))
        flags = build_config.NVCC_FLAGS if c["file"].endswith(".cu") else build_config.CXX_FLAGS
        for flag in flags + ["-std=c++20", f"-DTORCH_EXTENSION_NAME={target}"]:
            assert flag in c["command"].split(), f"{flag} missing for {c['file']}"
    with_cuda = cuda != "0" and build_config.cuda_unavailable_reason() is None
    expected = {"_C": build_config.cpu_sources()}
    expected.update({"_C_cuda": build_config.cuda_sources()} if with_cuda else {})
    assert {t: sorted(files) for t, files in targets.items()} == expected


def test_cmake_links_no_cuda_library_into_the_cpu_library():
    text = (ROOT / "CMakeLists.txt").read_text()
    links = re.findall(r"^target_link_libraries\(_C (.*)\)", text, re.MULTILINE)
    assert links and not CUDA_LIBRARY_NAME.search(links[0].split("#")[0]), links


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
