"""tree_attention vs torch SDPA with an explicit dense mask on the same problem.

The baseline gets its best case: K/V of [cache | tree] concatenated, heads-first contiguous
layouts and the boolean [B, 1, N, L + N] mask (prefix visible, tree bits unpacked) are built
outside the timed region; SDPA runs with enable_gqa (no K/V expansion). Both providers are
checked to agree once before timing. Shapes: N = 64 tree nodes, Hq = 32, Hkv = 8, D = 128,
every row seeing its full prefix L. Shapes: `TREE_ATTENTION` in bench/conftest.py (CPU
float32, CUDA bfloat16, with achieved TFLOP/s and % of the H200 floor in extra_info).
`test_forward_decode`: the decode-sized calls of the default target (`TREE_ATTENTION_DECODE`:
B = 1, N = 1..16 nodes, 4 query / 2 kv heads of 64), where per-call costs dominate.
"""
import pytest
import torch
import torch.nn.functional as F

import vsd_ext
from vsd_ext import tree
from vsd_ext.reference.tree_attention import dense_visibility

from conftest import (
    H200_BYTES_PER_S,
    H200_FLOPS_PER_S,
    TREE_ATTENTION,
    TREE_ATTENTION_DECODE,
    cases,
    sync,
)

N, HQ, HKV, D = (TREE_ATTENTION[k] for k in ("N", "Hq", "Hkv", "D"))
CASES = [case for device in ("cpu", "cuda")
         for case in cases(device, *TREE_ATTENTION[device], lambda s: f"B{s[0]}-L{s[1]}")]


DECODE_CASES = cases("cpu", *TREE_ATTENTION_DECODE["cpu"],
                     lambda s: f"N{s[0]}-L{s[1]}")


def problem(device, dtype, B, L, N=N, HQ=HQ, HKV=HKV, D=D):
    gen = torch.Generator(device=device).manual_seed(0)  # inputs drawn where they live

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    q, k_tree, v_tree = randn(B, N, HQ, D), randn(B, N, HKV, D), randn(B, N, HKV, D)
    k_cache, v_cache = randn(B, L, HKV, D), randn(B, L, HKV, D)
    lens = torch.full((B,), L, dtype=torch.int64, device=device)
    parents = tree.random_parents(B, N, generator=torch.Generator().manual_seed(0))
    mask = tree.build_tree_mask(parents.to(device))
    ours = (q, k_cache, v_cache, lens, k_tree, v_tree, mask)
    sdpa = (
        q.transpose(1, 2).contiguous(),
        torch.cat([k_cache, k_tree], 1).transpose(1, 2).contiguous(),
        torch.cat([v_cache, v_tree], 1).transpose(1, 2).contiguous(),
        dense_visibility(lens, mask, L, N).unsqueeze(1),
    )
    return ours, sdpa


def cost(B, L, dtype, backward):
    """FLOPs (2 GEMMs of B Hq N (L + N) D MACs forward, 5 with the backward) and bytes moved
    (inputs once + outputs; the backward also reads dO and writes every gradient)."""
    size = torch.finfo(dtype).bits // 8
    fwd_flops = 4 * B * HQ * N * (L + N) * D
    q_bytes = B * N * HQ * D * size
    kv_bytes = 2 * B * (L + N) * HKV * D * size
    fwd_bytes = 2 * q_bytes + kv_bytes + B * N * HQ * 4 + B * N * 8
    if not backward:
        return fwd_flops, fwd_bytes
    return fwd_flops * 7 // 2, fwd_bytes + 3 * q_bytes + kv_bytes


def run(benchmark, provider, device, dtype, B, L, fn, backward):
    flops, moved = cost(B, L, dtype, backward)
    kind = "fwd+bwd" if backward else "fwd"
    benchmark.group = (f"tree_attention {kind} B={B} L={L} N={N} Hq={HQ} Hkv={HKV} D={D} "
                       f"{dtype} {device}")
    info = benchmark.extra_info
    info.update(provider=provider, flops=flops, bytes=moved)
    sync(device)
    slow = device == "cpu"
    benchmark.pedantic(lambda: (fn(), sync(device)), rounds=5 if slow else 20, iterations=1,
                       warmup_rounds=1 if slow else 3)
    seconds = benchmark.stats.stats.min
    info["tflops"] = flops / seconds / 1e12
    info["tbps"] = moved / seconds / 1e12
    if device == "cuda":
        info["pct_flop_floor"] = 100 * info["tflops"] * 1e12 / H200_FLOPS_PER_S
        info["pct_bw_floor"] = 100 * info["tbps"] * 1e12 / H200_BYTES_PER_S


def sdpa_fn(sdpa):
    q, k, v, mask = sdpa
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("provider", ["vsd_ext", "torch"])
@pytest.mark.parametrize("device, dtype, B, L", CASES)
def test_forward(benchmark, provider, device, dtype, B, L):
    ours, sdpa = problem(device, dtype, B, L)
    with torch.no_grad():
        expected = sdpa_fn(sdpa).transpose(1, 2).float()
        torch.testing.assert_close(vsd_ext.tree_attention(*ours)[0].float(), expected, atol=2e-2,
                                   rtol=2e-2)
        if provider == "vsd_ext":
            def fn():
                return vsd_ext.tree_attention(*ours)
        else:
            def fn():
                return sdpa_fn(sdpa)
        run(benchmark, provider, device, dtype, B, L, fn, backward=False)


@pytest.mark.parametrize("provider", ["vsd_ext", "torch"])
@pytest.mark.parametrize("device, dtype, nodes, L", DECODE_CASES)
def test_forward_decode(benchmark, provider, device, dtype, nodes, L):
    heads = {k: TREE_ATTENTION_DECODE[k] for k in ("Hq", "Hkv", "D")}
    ours, sdpa = problem(device, dtype, 1, L, nodes, heads["Hq"], heads["Hkv"], heads["D"])
    with torch.no_grad():
        expected = sdpa_fn(sdpa).transpose(1, 2)
        torch.testing.assert_close(vsd_ext.tree_attention(*ours)[0], expected, atol=1e-4,
                                   rtol=1e-4)
        fn = ((lambda: vsd_ext.tree_attention(*ours)) if provider == "vsd_ext" else
              (lambda: sdpa_fn(sdpa)))
        benchmark.group = (f"tree_attention decode fwd B=1 L={L} N={nodes} Hq={heads['Hq']} "
                           f"Hkv={heads['Hkv']} D={heads['D']} {dtype} {device}")
        benchmark.extra_info.update(provider=provider)
        benchmark.pedantic(fn, rounds=200, iterations=10, warmup_rounds=20)


@pytest.mark.parametrize("provider", ["vsd_ext", "torch"])
@pytest.mark.parametrize("device, dtype, B, L", CASES)
def test_forward_backward(benchmark, provider, device, dtype, B, L):
    ours, sdpa = problem(device, dtype, B, L)
    ours = [t.requires_grad_() if t.is_floating_point() else t for t in ours]
    sdpa = [t.requires_grad_() if t.is_floating_point() else t for t in sdpa]
    ours_inputs = [ours[i] for i in (0, 1, 2, 4, 5)]
    grad = torch.randn(B, N, HQ, D, generator=torch.Generator(device=device).manual_seed(1),
                       device=device).to(dtype)

    def ours_step():
        out, _ = vsd_ext.tree_attention(*ours)
        return torch.autograd.grad(out, ours_inputs, grad)

    def torch_step():
        out = sdpa_fn(sdpa)
        return torch.autograd.grad(out, sdpa[:3], grad.transpose(1, 2))

    dq_ours, dq_torch = ours_step()[0], torch_step()[0]
    torch.testing.assert_close(dq_ours.float(), dq_torch.transpose(1, 2).float(), atol=3e-2,
                               rtol=3e-2)
    run(benchmark, provider, device, dtype, B, L,
        ours_step if provider == "vsd_ext" else torch_step, backward=True)
