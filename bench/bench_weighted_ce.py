"""Benchmarks: vsd_ext.weighted_linear_cross_entropy against the PyTorch way (pytest-benchmark).

Providers (benchmark.extra_info["provider"]):
  vsd_ext          the fused op: loss_rows (and lse), never materializing the [M, V] logits
  torch            h @ W.T -> F.cross_entropy(reduction="none") * w  (the PyTorch way)
  torch_linear_ce  F.linear_cross_entropy(h, W, t, reduction="none",
                   options=LinearCrossEntropyOptions()) * w, PyTorch's chunked fused op (when the
                   installed torch has it; it has no per-row weights, so the rows are weighted
                   after it)
Modes: "fwd" runs under torch.no_grad (evaluation); "fwd+bwd" is a training step: loss_rows.sum()
and backward into hidden and weight (FLOPs 6MHV for every provider; the chunked torch op
recomputes, 8MHV).

Peak memory (extra_info["peak_bytes"]): the extra memory one call needs on top of its inputs,
including the gradients it leaves in .grad. CUDA: torch.cuda.max_memory_allocated() minus the
allocation before the call, after a warm-up call, in this process. CPU: each (provider, shape,
mode) runs in a fresh Python subprocess (`python bench/bench_weighted_ce.py --peak ...`): inputs,
one warm-up call, outputs and gradients freed, then the kernel's peak-RSS counter is reset (`5`
into /proc/self/clear_refs) and the measured call's VmHWM minus the VmRSS before it is the peak
extra resident memory (a page never touched does not count; freed memory is not double-counted).
extra_info["peak_method"] says which.

extra_info["cpu_seconds_min"]: the least process CPU time (all threads) of one call: on a machine
shared with other jobs, wall times of providers measured minutes apart differ by the load of the
moment, while CPU seconds compare the work done.

Shapes: `WEIGHTED_CE` in bench/conftest.py (the CPU set finishes in a few minutes and includes
M=8192, H=1024, V=32000 fp32; CUDA: bf16). `test_weighted_ce` times the non-fused op on given
logits against F.cross_entropy(reduction="none") * w.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys

import torch
import torch.nn.functional as F

import vsd_ext

from conftest import WEIGHTED_CE, cases, sync

HAS_LINEAR_CE = hasattr(F, "linear_cross_entropy")
PROVIDERS = ["vsd_ext", "torch"] + (["torch_linear_ce"] if HAS_LINEAR_CE else [])
MODES = ["fwd", "fwd+bwd"]


def make_inputs(M, H, V, dtype, device, requires_grad):
    gen = torch.Generator(device=device).manual_seed(1234)
    hidden = (torch.randn(M, H, generator=gen, device=device) * (2.0 / H ** 0.5)).to(dtype)
    weight = torch.randn(V, H, generator=gen, device=device).to(dtype)
    targets = torch.randint(0, V, (M,), generator=gen, device=device)
    targets[::16] = -100
    row_weights = torch.rand(M, generator=gen, device=device)
    hidden.requires_grad_(requires_grad)
    weight.requires_grad_(requires_grad)
    return hidden, weight, targets, row_weights


def loss_rows(provider, h, W, t, w):
    if provider == "vsd_ext":
        return vsd_ext.weighted_linear_cross_entropy(h, W, t, w)[0]
    if provider == "torch":
        return F.cross_entropy(h @ W.T, t, reduction="none") * w
    options = torch.nn.LinearCrossEntropyOptions()
    return F.linear_cross_entropy(h, W, t, reduction="none", options=options) * w


def make_call(provider, mode, inputs):
    h, W, t, w = inputs
    if mode == "fwd":
        def call():
            with torch.no_grad():
                loss_rows(provider, h, W, t, w)
            sync(h.device)
    else:
        def call():
            h.grad = W.grad = None
            loss_rows(provider, h, W, t, w).sum().backward()
            sync(h.device)
    return call


def _status_kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_of_call(call, clear):
    """Peak extra resident memory of one warm call of `call`, in this (fresh) process: one warm-up
    call, `clear()` (drop the outputs and gradients it left), then the measured call."""
    call()
    clear()
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM delta after reset (fresh subprocess, after a warm-up call)"
    except OSError:
        method = "VmHWM delta without reset (fresh subprocess; may include the warm-up's peak)"
    before = _status_kib("VmRSS")
    call()
    return {"peak_bytes": (_status_kib("VmHWM") - before) * 1024, "peak_method": method}


def peak_main(make_inputs, make_call):
    """The `--peak PROVIDER MODE M H V DTYPE` entry of a fused-loss bench script (a fresh
    subprocess): prints the JSON of peak_of_call for one warm call on CPU."""
    parser = argparse.ArgumentParser(description="peak extra memory of one provider call (CPU)")
    parser.add_argument("--peak", nargs=6, metavar=("PROVIDER", "MODE", "M", "H", "V", "DTYPE"),
                        required=True)
    provider, mode, M, H, V, dtype = parser.parse_args().peak
    inputs = make_inputs(int(M), int(H), int(V), getattr(torch, dtype), "cpu", mode == "fwd+bwd")

    def clear():
        inputs[0].grad = inputs[1].grad = None

    print(json.dumps(peak_of_call(make_call(provider, mode, inputs), clear)))


def assert_agree(got, want, dtype):
    """Two providers' [loss rows, grad hidden, grad weight] agree, relative to the largest entry."""
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    for a, b in zip(got, want):
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale)


def peak_bytes_of(script, args, device, call):
    """Peak extra memory of `call`: on CUDA in this process (after a warm-up call); on CPU in a
    fresh `python <script> --peak <args>` subprocess, which prints the JSON of peak_of_call."""
    if device == "cuda":
        call()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - before,
                "peak_method": "torch.cuda.max_memory_allocated delta after a warm-up call"}
    cmd = [sys.executable, os.path.abspath(script), "--peak", *map(str, args)]
    path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def validate(M, H, V, dtype, device):
    """The providers agree (loss rows and gradients) on the first rows of the shape, outside
    timing."""
    rows = min(M, 512)
    h, W, t, w = make_inputs(M, H, V, dtype, device, True)
    h = h.detach()[:rows].requires_grad_(True)
    results = {}
    for provider in PROVIDERS:
        h.grad = W.grad = None
        loss = loss_rows(provider, h, W, t[:rows], w[:rows])
        loss.sum().backward()
        results[provider] = [loss.detach().float(), h.grad.float(), W.grad.float()]
    for provider in PROVIDERS[1:]:
        assert_agree(results["vsd_ext"], results[provider], dtype)


if __name__ == "__main__":
    peak_main(make_inputs, make_call)
    sys.exit(0)

import pytest  # noqa: E402  (not needed by the --peak subprocess)

from conftest import timed  # noqa: E402

_validated = set()
LINEAR_CASES = [case for device in ("cpu", "cuda")
                for case in cases(device, *WEIGHTED_CE[device], lambda s: "M{}-H{}-V{}".format(*s))]
LOGITS_CASES = [case for device in ("cpu", "cuda")
                for case in cases(device, *WEIGHTED_CE[f"logits_{device}"],
                                  lambda s: "M{}-V{}".format(*s))]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device,dtype,M,H,V", LINEAR_CASES)
def test_weighted_linear_ce(benchmark, provider, mode, device, dtype, M, H, V):
    time_linear_case(benchmark, "weighted_linear_ce", sys.modules[__name__], _validated,
                     provider, mode, device, dtype, M, H, V)


def time_linear_case(benchmark, label, module, validated, provider, mode, device, dtype, M, H,
                     V):
    """One (provider, mode, shape) of a fused-loss benchmark `module` (its validate, make_inputs,
    make_call and --peak entry): validation once per shape, outside timing; peak memory; time.
    Shared with bench_weighted_divergence.py."""
    key = (device, M, H, V, dtype)
    if key not in validated:
        module.validate(M, H, V, dtype, device)
        validated.add(key)
    call = module.make_call(provider, mode, module.make_inputs(M, H, V, dtype, device,
                                                               mode == "fwd+bwd"))
    name = str(dtype).removeprefix("torch.")
    benchmark.group = f"{label} {mode} M={M} H={H} V={V} {name} {device}"
    benchmark.extra_info.update(provider=provider, mode=mode, M=M, H=H, V=V, device=device,
                                dtype=name, flops=(2 if mode == "fwd" else 6) * M * H * V)
    benchmark.extra_info.update(
        peak_bytes_of(module.__file__, [provider, mode, M, H, V, name], device, call))
    timed(benchmark, call, device)


def _ce_rows(provider, logits, t, w):
    if provider == "vsd_ext":
        return vsd_ext.weighted_cross_entropy(logits, t, w)[0]
    return F.cross_entropy(logits.float(), t, reduction="none") * w


@pytest.mark.parametrize("provider", ["vsd_ext", "torch"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device,dtype,M,V", LOGITS_CASES)
def test_weighted_ce(benchmark, provider, mode, device, dtype, M, V):
    """The non-fused op on given logits `[M, V]` (hard targets, every 16th row ignored)."""
    gen = torch.Generator(device=device).manual_seed(1234)
    logits = (torch.randn(M, V, generator=gen, device=device) * 2).to(dtype)
    logits.requires_grad_(mode == "fwd+bwd")
    t = torch.randint(0, V, (M,), generator=gen, device=device)
    t[::16] = -100
    w = torch.rand(M, generator=gen, device=device)
    want, got = (_ce_rows(p, logits.detach(), t, w) for p in ("torch", "vsd_ext"))
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)

    def call():
        if mode == "fwd":
            with torch.no_grad():
                _ce_rows(provider, logits, t, w)
        else:
            logits.grad = None
            _ce_rows(provider, logits, t, w).sum().backward()
        sync(device)

    benchmark.group = f"weighted_ce {mode} M={M} V={V} {str(dtype)[6:]} {device}"
    benchmark.extra_info.update(provider=provider, mode=mode, M=M, V=V, dtype=str(dtype)[6:],
                                device=device, bytes=logits.numel() * logits.element_size())
    timed(benchmark, call, device)
