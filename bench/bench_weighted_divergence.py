"""Benchmarks: vsd_ext.weighted_linear_divergence against the PyTorch way (pytest-benchmark).

Providers (benchmark.extra_info["provider"]):
  vsd_ext  the fused op: loss_rows = tv_w (1 - beta) + kl_w KL(q || p), never materializing the
           [M, V] logits or probabilities
  torch    logits = h @ W.T, log_softmax of both sides, the same formulas on the [M, V] tensors,
           autograd for the gradient (the PyTorch way)
Modes: "fwd" runs under torch.no_grad (metrics); "fwd+bwd" is a training step: loss_rows.sum()
and backward into hidden and weight (6MHV FLOPs for both providers).

Peak memory and CPU seconds are measured as in bench_weighted_ce.py (its peak_bytes_of; on CPU each
(provider, shape, mode) in a fresh subprocess: `python bench/bench_weighted_divergence.py --peak
...`). Shapes: `WEIGHTED_DIVERGENCE` in bench/conftest.py.
"""
from __future__ import annotations

import sys

import torch
from bench_weighted_ce import assert_agree, peak_main, time_linear_case

import vsd_ext

from conftest import WEIGHTED_DIVERGENCE, cases, sync

PROVIDERS = ["vsd_ext", "torch"]
MODES = ["fwd", "fwd+bwd"]


def make_inputs(M, H, V, dtype, device, requires_grad):
    """Drafter hidden states and head, teacher logits near the drafter's, weights of both terms."""
    gen = torch.Generator(device=device).manual_seed(1234)
    hidden = (torch.randn(M, H, generator=gen, device=device) * (2.0 / H ** 0.5)).to(dtype)
    weight = torch.randn(V, H, generator=gen, device=device).to(dtype)
    teacher = torch.randn(M, V, generator=gen, device=device).mul_(3).to(dtype)
    tv_w = torch.rand(M, generator=gen, device=device)
    kl_w = torch.rand(M, generator=gen, device=device) * 0.1
    hidden.requires_grad_(requires_grad)
    weight.requires_grad_(requires_grad)
    return hidden, weight, teacher, tv_w, kl_w


def torch_way(h, W, s, tv_w, kl_w):
    """loss_rows the PyTorch way: every [M, V] tensor materialized, autograd for the gradient."""
    log_q = torch.log_softmax((h @ W.T).float(), dim=-1)
    log_p = torch.log_softmax(s.float(), dim=-1)
    q, p = log_q.exp(), log_p.exp()
    beta = torch.where(log_q < log_p, q, p).sum(-1)
    kl = (q * (log_q - log_p)).sum(-1)
    return tv_w * (1 - beta) + kl_w * kl


def loss_rows(provider, h, W, s, tv_w, kl_w):
    if provider == "vsd_ext":
        return vsd_ext.weighted_linear_divergence(h, W, s, tv_w, kl_w)[0]
    return torch_way(h, W, s, tv_w, kl_w)


def make_call(provider, mode, inputs):
    h = inputs[0]
    if mode == "fwd":
        def call():
            with torch.no_grad():
                loss_rows(provider, *inputs)
            sync(h.device)
    else:
        def call():
            h.grad = inputs[1].grad = None
            loss_rows(provider, *inputs).sum().backward()
            sync(h.device)
    return call


def validate(M, H, V, dtype, device):
    """The providers agree (loss rows and gradients) on the first rows of the shape, outside
    timing."""
    rows = min(M, 256)
    h, W, s, tv_w, kl_w = make_inputs(M, H, V, dtype, device, True)
    h = h.detach()[:rows].requires_grad_(True)
    results = {}
    for provider in PROVIDERS:
        h.grad = W.grad = None
        loss = loss_rows(provider, h, W, s[:rows], tv_w[:rows], kl_w[:rows])
        loss.sum().backward()
        results[provider] = [loss.detach().float(), h.grad.float(), W.grad.float()]
    assert_agree(results["vsd_ext"], results["torch"], dtype)


if __name__ == "__main__":
    peak_main(make_inputs, make_call)
    sys.exit(0)

import pytest  # noqa: E402  (not needed by the --peak subprocess)

_validated = set()
CASES = [case for device in ("cpu", "cuda")
         for case in cases(device, *WEIGHTED_DIVERGENCE[device],
                           lambda shape: "M{}-H{}-V{}".format(*shape))]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device,dtype,M,H,V", CASES)
def test_weighted_linear_divergence(benchmark, provider, mode, device, dtype, M, H, V):
    time_linear_case(benchmark, "weighted_linear_divergence", sys.modules[__name__], _validated,
                     provider, mode, device, dtype, M, H, V)
