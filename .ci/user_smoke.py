"""What a user does after `pip install -e .`: import vsd_ext, call an op on the CPU, and check the
CUDA library is loaded exactly when torch has CUDA (and vsd_ext says so).

`.ci/run` runs this in a fresh environment with the CPU build of torch; tests/test_build.py runs
it with the running torch's CUDA hidden. Prints vsd_ext.build_info() as JSON when all is well.
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import vsd_ext


def check_weighted_cross_entropy() -> None:
    """One op against torch's own cross-entropy: odd sizes, an ignored row, float64."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=gen, dtype=torch.float64)
    targets = torch.tensor([0, 3, -100, 10, 7])
    weights = torch.rand(5, generator=gen)
    loss, lse = vsd_ext.weighted_cross_entropy(logits, targets, weights)
    ce = F.cross_entropy(logits, targets, reduction="none", ignore_index=-100)
    expected = ce * weights.double()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1))


def check_cuda_library_loaded_only_with_cuda(info: dict) -> None:
    """The CUDA library is in the process exactly when vsd_ext reports its kernels registered,
    and never when torch has no CUDA."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    name = info["cuda_library"]
    mapped = name is not None and any(line.rstrip().endswith("/" + name) for line in maps)
    assert mapped == info["with_cuda"], f"{name} mapped: {mapped}, {info['cuda_status']}"
    if torch.version.cuda is None:
        assert not mapped, f"torch {torch.__version__} has no CUDA, but {name} is loaded"


def main() -> None:
    info = vsd_ext.build_info()
    built, running = info["torch_built_against"], info["torch_runtime"]
    assert built.split("+")[0] == running.split("+")[0], f"built against {built}, runs {running}"
    check_weighted_cross_entropy()
    check_cuda_library_loaded_only_with_cuda(info)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
