"""verify_tree: vsd_ext vs the PyTorch reference (float64 softmax of every node + Python walk).

Trees are EAGLE-style (64 nodes, depth 6, up to 8 children per node, lower index = likelier)
with draft tokens drawn from a noisy copy of the target, so walks accept a few tokens.
"bytes" is the size of target_logits (the op reads only the rows its walks reach).
"""
import pytest
import torch

import vsd_ext
from vsd_ext.reference.verify_tree import verify_tree as reference

from conftest import VERIFY_TREE, cases, sync

LEVELS = VERIFY_TREE["levels"]
N_NODES = 1 + sum(n for n, _ in LEVELS)


def eagle_parents():
    parents, prev = [-1], [0]
    for size, expanded in LEVELS:
        level = []
        for j in range(size):
            parents.append(prev[j % expanded])
            level.append(len(parents) - 1)
        prev = level
    return torch.tensor(parents)


def make_inputs(B, V, dtype, device, mode, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N = N_NODES
    logits = torch.randn(B, N, V, generator=gen) * 2.0
    likely = torch.randint(0, V, (B, N, 4), generator=gen)  # a few plausible next tokens
    logits.scatter_add_(2, likely, torch.tensor([12.0, 10.0, 9.0, 8.0]).expand(B, N, 4))
    parents = eagle_parents().expand(B, N).contiguous()
    # draft: the target plus noise; children = top tokens of the noisy draft, in rank order
    noisy = logits + torch.randn(B, N, V, generator=gen) * 1.5
    ranked = torch.topk(noisy, 8, dim=-1).indices
    tokens = torch.zeros(B, N, dtype=torch.long)
    rank = {}
    for i in range(1, N):
        p = int(parents[0, i])
        tokens[:, i] = ranked[:, p, rank.get(p, 0)]
        rank[p] = rank.get(p, 0) + 1
    q = torch.softmax(noisy, -1) if mode == "sampled" else None
    uniforms = torch.rand(B, N + 1, generator=gen, dtype=torch.float64)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dev(logits.to(dtype)), dev(tokens), dev(parents), dev(uniforms), dev(q)


CASES = [case for device in ("cpu", "cuda")
         for case in cases(device, *VERIFY_TREE[device], lambda s: f"{s[0]}-B{s[1]}-V{s[2]}")]


def _rounds(B, V, provider):
    if provider == "torch":
        return 1 if B * V >= 64 * 32_000 else 3
    return 20 if B * V <= 8 * 128_256 else 5


@pytest.mark.parametrize("device,dtype,mode,B,V", CASES)
@pytest.mark.parametrize("provider", ["vsd_ext", "torch"])
def test_verify_tree(benchmark, provider, device, dtype, mode, B, V):
    args = make_inputs(B, V, dtype, device, mode)
    op_out = vsd_ext.verify_tree(*args, mode=mode)
    # Validate before timing: rows are independent, so two rows of the reference suffice.
    head = [None if t is None else t[:2] for t in args]
    want = reference(*head, mode=mode)
    for got, ref in zip(op_out, want):
        assert torch.equal(got[:2].cpu(), ref.cpu())

    if provider == "vsd_ext":
        def run():
            out = vsd_ext.verify_tree(*args, mode=mode)
            sync(device)
            return out
    else:
        def run():
            out = reference(*args, mode=mode)
            sync(device)
            return out

    benchmark.group = f"verify_tree {device} {str(dtype)[6:]} {mode} B={B} N={N_NODES} V={V}"
    benchmark.extra_info.update(provider=provider, bytes=args[0].numel() * args[0].element_size(),
                                accepted_mean=float(op_out[2].float().mean()))
    warmup = 1 if provider == "vsd_ext" or device == "cuda" else 0
    out = benchmark.pedantic(run, rounds=_rounds(B, V, provider), iterations=1,
                             warmup_rounds=warmup)
    if provider == "torch":
        for got, ref in zip(op_out, out):
            assert torch.equal(got.cpu(), ref.cpu())
