"""Build vsd_ext's two libraries (build_config.py: what each is built from, and why two).

The build writes vsd_ext/_build_record.json next to them: the torch they were compiled against,
their file names, and why there is no CUDA library when there is none (vsd_ext.build_info()).
`pip install .` and `pip install -e .` run this through build_backend.py, which compiles against
the torch of the environment that installs; metadata and the sdist need no torch.

Environment:
  VSD_EXT_CUDA=auto|0|1  auto (default): the CUDA library when possible; 0: never; 1: must
                         (fails clearly when it cannot)
  TORCH_CUDA_ARCH_LIST   default "9.0+PTX" (Hopper, plus PTX that newer GPUs JIT-compile)
  CUDA_HOME              default /usr/local/cuda when it exists (torch otherwise guesses)
  MAX_JOBS               parallel compile jobs (ninja)
"""
import glob
import json
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # setuptools' backend adds none
import build_config

# The setup.py commands that compile. The others that frontends run (egg_info, dist_info, sdist:
# metadata and the source distribution) get no extensions and need no torch.
COMPILING_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def import_torch():
    try:
        import torch
    except ImportError:
        raise SystemExit("vsd_ext: building the extension needs torch in this environment: "
                         "`pip install torch` first, then install vsd_ext again") from None
    return torch


def cuda_skipped_reason() -> str | None:
    """None when the CUDA library is to be built, else why it is not."""
    mode = os.environ.get("VSD_EXT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"VSD_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return "VSD_EXT_CUDA=0 asked for the CPU library only"
    problem = build_config.cuda_unavailable_reason()
    if problem is not None and mode == "1":
        raise SystemExit(f"VSD_EXT_CUDA=1 but the CUDA library cannot be built: {problem}")
    if problem is not None:
        print(f"vsd_ext: building the CPU library only ({problem}); VSD_EXT_CUDA=1 requires CUDA")
    return problem


def extensions(with_cuda: bool) -> list:
    """The CPU library always, the CUDA library when `with_cuda`: two separate shared objects."""
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpu = CppExtension(
        build_config.CPU_LIBRARY,
        sources=build_config.cpu_sources(),
        include_dirs=build_config.include_dirs(),
        extra_compile_args={"cxx": build_config.CXX_FLAGS},
        extra_link_args=build_config.LINK_FLAGS,
    )
    if not with_cuda:
        return [cpu]
    cuda = CUDAExtension(
        build_config.CUDA_LIBRARY,
        sources=build_config.cuda_sources(),
        include_dirs=build_config.include_dirs(),
        extra_compile_args={"cxx": build_config.CXX_FLAGS, "nvcc": build_config.NVCC_FLAGS},
        extra_link_args=build_config.LINK_FLAGS,
    )
    return [cpu, cuda]


def build_ext_command(cuda_skipped: str | None):
    """torch's BuildExtension (ninja), keeping objects in build/temp even for `pip install -e`
    (rebuilds are incremental), then writing the build record next to the libraries."""
    torch = import_torch()
    from torch.utils.cpp_extension import BuildExtension

    class BuildLibraries(BuildExtension.with_options(use_ninja=True)):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(build_config.ROOT, "build", "temp")

        def run(self):
            super().run()  # builds into build_lib, then copies to the sources when in place
            record = {"torch": torch.__version__, "cuda_skipped": cuda_skipped,
                      "cpu_library": self.file_name(build_config.CPU_LIBRARY),
                      "cuda_library": None if cuda_skipped else self.file_name(
                          build_config.CUDA_LIBRARY)}
            for built_and_source in self.record_paths().items():
                write_record(built_and_source, record)

        def file_name(self, library: str) -> str:
            return os.path.basename(self.get_ext_filename(library))

        def record_paths(self) -> dict[str, str]:
            """{path in build_lib: path in the sources} (the same path when not in place)."""
            built = os.path.join(self.build_lib, "vsd_ext", build_config.BUILD_RECORD)
            if not self.inplace:
                return {built: built}
            package = self.get_finalized_command("build_py").get_package_dir("vsd_ext")
            return {built: os.path.join(package, build_config.BUILD_RECORD)}

        def get_outputs(self):
            return super().get_outputs() + list(self.record_paths().values())

        def get_output_mapping(self):
            mapping = super().get_output_mapping()
            return {**mapping, **self.record_paths()} if self.inplace else mapping

    return BuildLibraries


def write_record(paths: tuple[str, str], record: dict) -> None:
    """The build record at both paths, and no CUDA library left over from an earlier build next
    to it when there is none now (the loader trusts the record; the stale file would mislead)."""
    for path in sorted(set(paths)):
        if record["cuda_library"] is None:
            stem = build_config.CUDA_LIBRARY.rpartition(".")[2]
            for stale in glob.glob(os.path.join(os.path.dirname(path), f"{stem}.*")):
                os.remove(stale)
        write_json(path, record)


def write_json(path: str, record: dict) -> None:
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def main() -> None:
    if not COMPILING_COMMANDS.intersection(sys.argv[1:]):
        setup()
        return
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build_config.DEFAULT_CUDA_ARCH_LIST)
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # before torch.utils.cpp_extension looks
    import_torch()
    cuda_skipped = cuda_skipped_reason()
    setup(ext_modules=extensions(with_cuda=cuda_skipped is None),
          cmdclass={"build_ext": build_ext_command(cuda_skipped)})


main()
