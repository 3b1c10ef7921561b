"""What the benchmarks share: the shape registry, CUDA cases, device sync, timing, the H200 floor.

Every benchmark times vsd_ext against the PyTorch way of doing the same thing, on the shapes
registered here (one place to read or change what is measured). `cases` turns a registry entry
into pytest parameters, CUDA cases skipped without a GPU. The bench files import this module
(`from conftest import ...`; pytest puts bench/ on sys.path, and so does running a bench file
as a script).
"""
import time

import pytest
import torch

H200_BYTES_PER_S = 4.3e12   # measured copy bandwidth (docs/design/ARCHITECTURE.md)
H200_FLOPS_PER_S = 790e12   # measured dense bf16 GEMM rate

# ---- the shape registry -----------------------------------------------------------------
# tree_attention: N tree nodes, Hq / Hkv heads of dim D; (B rows, L cached positions) per device.
TREE_ATTENTION = {
    "N": 64, "Hq": 32, "Hkv": 8, "D": 128,
    "cpu": (torch.float32, [(1, 512), (1, 2048), (8, 512), (8, 2048)]),
    "cuda": (torch.bfloat16, [(b, n) for b in (1, 8) for n in (512, 2048, 8192)]),
}
# Decode-sized tree_attention on the default target's heads: (N tree nodes, L cached positions)
# at batch 1, the shapes of a verify forward (N = tree + root) and of an autoregressive step.
TREE_ATTENTION_DECODE = {
    "Hq": 4, "Hkv": 2, "D": 64,
    "cpu": (torch.float32, [(n, L) for L in (300, 1000) for n in (1, 4, 8, 16)]),
}
# verify_tree: EAGLE-style trees, level sizes and how many nodes of the previous level get
# children (1 + 8 + 16 + 16 + 12 + 8 + 3 = 64 nodes); (mode, B rows, V vocabulary) per device.
_VERIFY_SHAPES = [(b, v) for v in (32_000, 128_256) for b in (1, 8, 64)]
VERIFY_TREE = {
    "levels": [(8, 1), (16, 4), (16, 4), (12, 4), (8, 4), (3, 3)],
    "cpu": (torch.float32, [("target_only", b, v) for b, v in _VERIFY_SHAPES]
            + [("sampled", 64, 32_000)]),
    "cuda": (torch.bfloat16, [(m, b, v) for m in ("target_only", "sampled")
                              for b, v in _VERIFY_SHAPES]),
}
# weighted (linear) cross-entropy: (M rows, H hidden, V vocabulary) per device; the CPU set
# finishes in a few minutes. The non-fused op takes given logits: (M, V).
WEIGHTED_CE = {
    "cpu": (torch.float32, [(2048, 1024, 32000), (8192, 1024, 32000)]),
    "cuda": (torch.bfloat16, [(m, h, v) for m in (2048, 8192) for h in (1024, 4096)
                              for v in (32000, 128256)]),
    "logits_cpu": (torch.float32, [(2048, 32000)]),
    "logits_cuda": (torch.bfloat16, [(8192, 32000), (8192, 128256)]),
}
# weighted_linear_divergence: (M rows, H hidden, V vocabulary) per device (teacher logits [M, V]).
WEIGHTED_DIVERGENCE = {
    "cpu": (torch.float32, [(512, 1024, 32000), (2048, 1024, 32000)]),
    "cuda": (torch.bfloat16, [(2048, 4096, 32000), (8192, 4096, 128256)]),
}
# end-to-end decoding: new tokens per row, prompt tokens (the last ones of each held-out
# mid-file window), batch sizes and temperatures of the default configuration's cases.
DECODE = {"max_new_tokens": 48, "prompt_tokens": 256, "batch_sizes": (1, 4, 16),
          "temperatures": (0.0, 0.7, 1.0)}


def cases(device: str, dtype: torch.dtype, shapes, name) -> list:
    """pytest.param(device, dtype, *shape) per shape, id ``name(shape)`` after the device and
    dtype; CUDA cases are skipped when no GPU is visible."""
    marks = ([pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")]
             if device == "cuda" else [])
    return [pytest.param(device, dtype, *shape, marks=marks,
                         id=f"{device}-{str(dtype).removeprefix('torch.')}-{name(shape)}")
            for shape in shapes]


def sync(device) -> None:
    """Wait for the device, so that a timed call includes its kernels."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(benchmark, call, device) -> None:
    """Time `call` with pytest-benchmark (wall) and record the least process CPU time of one call
    in extra_info["cpu_seconds_min"]: on a machine shared with other jobs, wall times of providers
    measured minutes apart differ by the load of the moment, while CPU seconds compare the work."""
    cpu_seconds = []

    def run():
        start = time.process_time()
        call()
        cpu_seconds.append(time.process_time() - start)

    rounds = 2 if device == "cpu" else 10
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["cpu_seconds_min"] = min(cpu_seconds)
