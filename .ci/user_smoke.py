"""What a user does after `pip install -e .`: import vsd_ext and call an op on the CPU.

`.ci/run` runs this in a fresh environment with the CPU build of torch; tests/test_build.py runs
it with the running torch's CUDA hidden. Prints vsd_ext.build_info() as JSON when all is well.
"""
import json

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


def main() -> None:
    info = vsd_ext.build_info()
    built, running = info["torch_built_against"], info["torch_runtime"]
    assert built.split("+")[0] == running.split("+")[0], f"built against {built}, runs {running}"
    check_weighted_cross_entropy()
    print(json.dumps(info))


if __name__ == "__main__":
    main()
