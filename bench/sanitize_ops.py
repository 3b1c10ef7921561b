"""Every CUDA kernel of vsd_ext once, on tiny shapes: the program bench/gpu_check.sh runs under
compute-sanitizer (memcheck, racecheck). Each kernel path is reached: tree attention's
tensor-core forward and backward (shared cache with its split reduction, per-row cache, two
64-node mask words, padding nodes, split-KV) and its warp-per-row kernels (fp32), verify_tree in
its three modes, and both weighted cross-entropy ops forward and backward. Exits 0 when every
call returns finite results; the sanitizer reports memory errors and races itself.

    compute-sanitizer --tool memcheck --error-exitcode 3 python3 bench/sanitize_ops.py
"""
import torch

import vsd_ext
from vsd_ext import tree


def tree_attention_case(dtype, B, Bc, N, L, D, gen):
    """Forward and backward of one tree_attention problem (padding in the last row)."""
    Hq, Hkv = 4, 2

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to("cuda", dtype).requires_grad_()

    q, k_tree, v_tree = randn(B, N, Hq, D), randn(B, N, Hkv, D), randn(B, N, Hkv, D)
    k_cache, v_cache = randn(Bc, L, Hkv, D), randn(Bc, L, Hkv, D)
    lens = torch.randint(0, L + 1, (B,), generator=gen).cuda()
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[-1, N // 2:] = False
    mask = tree.build_tree_mask(tree.random_parents(B, N, generator=gen).cuda(), valid.cuda())
    out, lse = vsd_ext.tree_attention(q, k_cache, v_cache, lens, k_tree, v_tree, mask)
    loss = out.float().square().sum() + lse.masked_fill(lse.isinf(), 0).sum()
    grads = torch.autograd.grad(loss, [q, k_cache, v_cache, k_tree, v_tree])
    return [out, *grads]


def verify_case(mode, gen):
    B, N, V = 3, 9, 1000
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 3, 5]).expand(B, N).contiguous()
    logits = torch.randn(B, N, V, generator=gen) * 3
    tokens = torch.randint(0, V, (B, N), generator=gen)
    probs = torch.softmax(torch.randn(B, N, V, generator=gen), -1) if mode == "sampled" else None
    uniforms = torch.rand(B, N + 1, generator=gen, dtype=torch.float64)
    args = [t.cuda() if t is not None else None for t in (logits, tokens, parents, uniforms, probs)]
    return [t.float() for t in vsd_ext.verify_tree(*args, mode=mode)]


def cross_entropy_case(gen):
    M, H, V = 24, 32, 300
    hidden = torch.randn(M, H, generator=gen).cuda().requires_grad_()
    weight = torch.randn(V, H, generator=gen).cuda().requires_grad_()
    targets = torch.randint(0, V, (M,), generator=gen).cuda()
    targets[3] = -100
    row_weights = torch.rand(M, generator=gen).cuda()
    loss, lse = vsd_ext.weighted_linear_cross_entropy(hidden, weight, targets, row_weights)
    fused = torch.autograd.grad(loss.sum() + lse.sum(), [hidden, weight])
    logits = (hidden @ weight.T).detach().requires_grad_()
    loss2, lse2 = vsd_ext.weighted_cross_entropy(logits, targets, row_weights)
    plain = torch.autograd.grad(loss2.sum() + lse2.sum(), [logits])
    return [loss, lse, *fused, loss2, *plain]


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    results = []
    # tensor cores: shared cache (row split), per-row cache with split-KV, D 64 / 128
    results += tree_attention_case(torch.bfloat16, 3, 1, 70, 130, 64, gen)
    results += tree_attention_case(torch.float16, 2, 2, 17, 1100, 128, gen)
    results += tree_attention_case(torch.float32, 2, 1, 9, 40, 48, gen)  # warp-per-row kernels
    for mode in ("greedy", "target_only", "sampled"):
        results += verify_case(mode, gen)
    results += cross_entropy_case(gen)
    torch.cuda.synchronize()
    bad = [i for i, t in enumerate(results) if not torch.isfinite(t.float()).all()]
    if bad:
        raise SystemExit(f"non-finite results at {bad}")
    print(f"sanitize_ops: {len(results)} results, all finite")


if __name__ == "__main__":
    main()
