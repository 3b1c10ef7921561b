"""Build vsd_ext._C: CPU kernels always, CUDA kernels when nvcc and a CUDA build of torch exist.

Environment:
  VSD_EXT_CUDA=auto|0|1    auto (default): build CUDA when possible; 0: never; 1: must (fails clearly)
  TORCH_CUDA_ARCH_LIST     default "9.0+PTX" (Hopper, plus PTX that newer GPUs JIT-compile)
  CUDA_HOME                default /usr/local/cuda when it exists (torch otherwise guesses /usr/local)
  MAX_JOBS                 parallel compile jobs (ninja)

The source lists and flags live in build_config.py, which CMakeLists.txt mirrors (a test checks).
"""
import os
import sys

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_config  # noqa: E402

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build_config.DEFAULT_CUDA_ARCH_LIST)
import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda() -> bool:
    mode = os.environ.get("VSD_EXT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"VSD_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    problem = build_config.cuda_unavailable_reason()
    if problem is None:
        return True
    if mode == "1":
        raise SystemExit(f"VSD_EXT_CUDA=1 but the CUDA kernels cannot be built: {problem}")
    print(f"vsd_ext: building CPU kernels only ({problem}); set VSD_EXT_CUDA=1 to require CUDA")
    return False


with_cuda = _want_cuda()
macros = build_config.define_macros(with_cuda)
if with_cuda:
    ext = CUDAExtension(
        "vsd_ext._C",
        sources=build_config.sources(with_cuda=True),
        include_dirs=build_config.include_dirs(),
        define_macros=macros,
        extra_compile_args={"cxx": build_config.CXX_FLAGS, "nvcc": build_config.NVCC_FLAGS},
        extra_link_args=build_config.LINK_FLAGS,
    )
else:
    ext = CppExtension(
        "vsd_ext._C",
        sources=build_config.sources(with_cuda=False),
        include_dirs=build_config.include_dirs(),
        define_macros=macros,
        extra_compile_args={"cxx": build_config.CXX_FLAGS},
        extra_link_args=build_config.LINK_FLAGS,
    )

class _BuildExtension(BuildExtension.with_options(use_ninja=True)):
    """Keeps object files in build/temp even for `pip install -e`, so rebuilds are incremental."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(build_config.ROOT, "build", "temp")


setup(ext_modules=[ext], cmdclass={"build_ext": _BuildExtension})
