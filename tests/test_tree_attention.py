"""vsd_ext.tree_attention (forward and backward) against the float64 reference, on every device.

Low-precision rule: the kernel's error vs the float64 reference is at most 2x the error of
PyTorch itself in that dtype (the reference run in that dtype) plus a small epsilon.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import vsd_ext
from vsd_ext import tree
from vsd_ext.reference.tree_attention import tree_attention as tree_attention_reference

EPS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_inputs(gen, device, B, Bc, N, Hq, Hkv, D, L, dtype, prefix="random", parents=None):
    def randn(*shape):
        values = torch.randn(*shape, generator=gen, dtype=torch.float32)
        return values.to(device=device, dtype=dtype)

    q, k_tree, v_tree = randn(B, N, Hq, D), randn(B, N, Hkv, D), randn(B, N, Hkv, D)
    k_cache, v_cache = randn(Bc, L, Hkv, D), randn(Bc, L, Hkv, D)
    if prefix == "full":
        lens = torch.full((B,), L, dtype=torch.int64)
    elif prefix == "nonempty":  # every row sees the cache: a shared cache's gradient sums rows
        lens = torch.randint(1, L + 1, (B,), generator=gen)
    else:  # ragged, with an empty and a full prefix whenever B allows
        lens = torch.randint(0, L + 1, (B,), generator=gen)
        lens[0] = 0
        if B > 1:
            lens[-1] = L
    if parents is None:
        parents = tree.random_parents(B, N, generator=gen)
    mask = tree.build_tree_mask(parents.to(device))
    return q, k_cache, v_cache, lens.to(device), k_tree, v_tree, mask


def assert_close_rule(got, ref64, ref_lowp, dtype, what):
    """|got - ref64| <= 2 |ref_lowp - ref64| + eps (elementwise max norms), finite values equal."""
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: non-finite entries differ"
    err = (got.double() - ref64)[finite].abs().max().item() if finite.any() else 0.0
    torch_err = (ref_lowp.double() - ref64)[finite].abs().max().item() if finite.any() else 0.0
    bound = 2 * torch_err + EPS[dtype]
    assert err <= bound, f"{what}: error {err:.3g} > 2 x torch's {torch_err:.3g} + {EPS[dtype]:g}"


def check_forward(args, dtype):
    out, lse = vsd_ext.tree_attention(*args)
    ref_out, ref_lse = tree_attention_reference(*args)
    low_out, _ = tree_attention_reference(*args, compute_dtype=dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close_rule(out, ref_out, low_out, dtype, "out")
    # lse: fp32 math on the same (rounded) inputs for every dtype.
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=2e-5, rtol=2e-5)
    return out, lse


# (B, Bc, N, Hq, Hkv, D, L): GQA ratios 1/2/4/8, Bc = 1 and Bc = B, N from 1 to 300,
# prefixes up to 3000 (ragged, with 0 and L), D 64/128. B * Hkv = 1 with N = 45: the CPU kernel
# splits the nodes into query tiles whatever the thread count (each tile reads its own mask rows).
CONFIGS = [
    (1, 1, 45, 4, 1, 64, 30),
    (3, 3, 1, 4, 4, 64, 50),
    (2, 1, 200, 8, 1, 128, 3000),
    (4, 4, 67, 8, 2, 64, 1000),
    (3, 1, 130, 4, 2, 128, 513),
    (5, 5, 64, 2, 2, 128, 2048),
    (2, 2, 17, 16, 4, 64, 300),
    (1, 1, 300, 2, 1, 64, 100),
]


CONFIG_IDS = "B{}Bc{}N{}Hq{}Hkv{}D{}L{}".format


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: CONFIG_IDS(*c))
def test_random_trees(device, gen, config):
    check_forward(make_inputs(gen, device, *config, torch.float32), torch.float32)


# Low precision: every config but the largest (its reference in bf16/fp16 alone takes seconds).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", [c for c in CONFIGS if c[6] < 3000],
                         ids=lambda c: CONFIG_IDS(*c))
def test_random_trees_low_precision(device, gen, config, dtype):
    check_forward(make_inputs(gen, device, *config, dtype), dtype)


# Decode-sized query tiles: R = N * Hq / Hkv packed rows across the CPU kernel's three score
# paths (cpu::scores: dot products for R <= 6, the GEMM over K^T below 32, over Q^T from 32 on),
# odd head dims included.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N, Hq, Hkv, D", [(1, 4, 2, 64), (3, 4, 2, 37), (8, 4, 2, 64),
                                           (9, 4, 2, 64), (4, 8, 2, 80), (5, 8, 2, 19),
                                           (1, 32, 2, 64), (2, 16, 1, 64)])
def test_decode_sized_tiles(device, gen, N, Hq, Hkv, D, dtype):
    check_forward(make_inputs(gen, device, 3, 1, N, Hq, Hkv, D, 300, dtype), dtype)


@pytest.mark.parametrize("D", [1, 37, 80, 200])
def test_any_head_dim_cpu(gen, D):
    check_forward(make_inputs(gen, "cpu", 3, 1, 21, 6, 3, D, 90, torch.float32), torch.float32)


@pytest.mark.parametrize("L", [0, 37])
def test_chain_is_causal_attention(device, gen, L):
    B, N, Hq, Hkv, D = 2, 75, 8, 2, 64
    parents = tree.chain_parents(B, N)
    args = make_inputs(gen, device, B, B, N, Hq, Hkv, D, L, torch.float32, prefix="full",
                       parents=parents)
    q, k_cache, v_cache, _, k_tree, v_tree, _ = args
    out, _ = vsd_ext.tree_attention(*args)
    # Plain causal attention over the sequence [cache | tree]: query i sits at position L + i.
    k = torch.cat([k_cache, k_tree], 1).double().repeat_interleave(Hq // Hkv, 2).transpose(1, 2)
    v = torch.cat([v_cache, v_tree], 1).double().repeat_interleave(Hq // Hkv, 2).transpose(1, 2)
    causal = torch.ones(N, L + N, dtype=torch.bool, device=device).tril(diagonal=L)
    expected = F.scaled_dot_product_attention(q.double().transpose(1, 2), k, v, attn_mask=causal)
    torch.testing.assert_close(out.double(), expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_nodes_that_see_nothing(device, gen):
    """Padding nodes (zero mask row) in rows with an empty prefix: zeros, lse = -inf, no NaN."""
    B, N, Hq, Hkv, D, L = 3, 70, 4, 2, 64, 40
    parents = tree.random_parents(B, N, generator=gen)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[:, 50:] = False  # tail padding in every row
    valid[2] = False  # row 2 is all padding
    args = list(make_inputs(gen, device, B, B, N, Hq, Hkv, D, L, torch.float32))
    args[3] = torch.tensor([0, 17, 0], device=device)
    args[6] = tree.build_tree_mask(parents.to(device), valid.to(device))
    args = [a.requires_grad_() if a.is_floating_point() else a for a in args]
    out, lse = vsd_ext.tree_attention(*args)
    dead = torch.zeros(B, N, dtype=torch.bool)
    dead[0, 50:] = True
    dead[2] = True
    assert (out[dead] == 0).all() and torch.isneginf(lse[dead]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[~dead]).all()
    # Row 1's padding nodes still see its 17 prefix keys.
    assert torch.isfinite(lse[1]).all()
    grads = torch.autograd.grad(out.sum() + lse[~dead].sum(), [args[i] for i in (0, 1, 2, 4, 5)])
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][dead] == 0).all()


def check_grads(args, dtype):
    """Gradients of <out, g_out> + <lse, g_lse> against the reference's autograd (fp64),
    with the low-precision rule for fp16/bf16 (reference autograd in that dtype)."""
    diff = [0, 1, 2, 4, 5]
    gen = torch.Generator().manual_seed(0)

    def grads_of(fn, inputs, cast):
        inputs = [a.detach().to(cast).requires_grad_() if i in diff else a
                  for i, a in enumerate(inputs)]
        out, lse = fn(*inputs)
        go = torch.randn(out.shape, generator=gen).to(out.device, cast)
        gl = torch.randn(lse.shape, generator=gen).to(lse.device, lse.dtype)
        gen.manual_seed(0)
        loss = (out * go).sum() + (lse.masked_fill(torch.isinf(lse), 0) * gl).sum()
        return torch.autograd.grad(loss, [inputs[i] for i in diff])

    got = grads_of(vsd_ext.tree_attention, args, dtype)
    ref = grads_of(tree_attention_reference, args, torch.float64)
    names = ["q", "k_cache", "v_cache", "k_tree", "v_tree"]
    if dtype == torch.float32:
        for name, g, r in zip(names, got, ref):
            torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=1e-4,
                                       msg=lambda m: f"d{name}: {m}")
        return
    low = grads_of(lambda *a: tree_attention_reference(*a, compute_dtype=dtype), args, dtype)
    for name, g, r, lo in zip(names, got, ref, low):
        assert_close_rule(g, r, lo, dtype, f"d{name}")


@pytest.mark.parametrize(
    "config",
    [(3, 3, 40, 8, 2, 64, 300), (4, 1, 33, 4, 1, 128, 600), (1, 1, 70, 4, 4, 64, 0),
     (3, 1, 9, 6, 3, 37, 520)],
    ids=lambda c: CONFIG_IDS(*c),
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients(device, gen, config, dtype):
    check_grads(make_inputs(gen, device, *config, dtype), dtype)


@pytest.mark.parametrize("Bc", [1, 2])
def test_gradcheck_float64(device, gen, Bc):
    args = make_inputs(gen, device, 2, Bc, 5, 4, 2, 8, 3, torch.float64, prefix="nonempty")
    args = [a.requires_grad_() if a.is_floating_point() else a for a in args]
    assert torch.autograd.gradcheck(lambda *a: vsd_ext.tree_attention(*a), args, eps=1e-6,
                                    atol=1e-6)


def test_opcheck(device, gen):
    args = make_inputs(gen, device, 2, 1, 6, 4, 2, 64, 9, torch.float32)
    args = [a.requires_grad_() if a.is_floating_point() else a for a in args]
    torch.library.opcheck(torch.ops.vsd_ext.tree_attention.default, (*args, 0.125))
    out, lse = vsd_ext.tree_attention(*args)
    grad_args = (torch.randn_like(out), torch.randn_like(lse), *[a.detach() for a in args],
                 out.detach(), lse.detach(), 0.125)
    torch.library.opcheck(torch.ops.vsd_ext.tree_attention_backward.default, grad_args)


def test_torch_compile(device, gen):
    args = make_inputs(gen, device, 2, 2, 6, 4, 2, 64, 9, torch.float32)
    args = [a.requires_grad_() if a.is_floating_point() else a for a in args]

    def loss(*a):
        out, lse = vsd_ext.tree_attention(*a)
        return out.square().sum() + lse.sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    diff = [args[i] for i in (0, 1, 2, 4, 5)]
    expected = torch.autograd.grad(loss(*args), diff)
    got = torch.autograd.grad(compiled(*args), diff)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


def test_strided_inputs_and_scale(device, gen):
    """Views of larger buffers (only the last dim contiguous), int32 prefix_lens, explicit scale."""
    B, N, Hq, Hkv, D, L = 3, 20, 4, 2, 64, 50
    base = make_inputs(gen, device, B, B, N, Hq, Hkv, D, L + 7, torch.float32)
    q = torch.randn(B, N, Hq + 3, D, generator=gen).to(device)[:, :, 1:Hq + 1]
    k_cache, v_cache = base[1][:, 3:L + 3], base[2][:, 5:L + 5]
    k_tree = torch.randn(B, N, 2 * Hkv, D, generator=gen).to(device)[:, :, ::2]
    lens = torch.tensor([0, L, 31], dtype=torch.int32, device=device)
    mask = torch.zeros(B, N, 3, dtype=torch.int64, device=device)[..., 1:2]
    mask.copy_(base[6])
    args = (q, k_cache, v_cache, lens, k_tree, base[5], mask)
    assert not q.is_contiguous() and not k_cache.is_contiguous() and not mask.is_contiguous()
    out, lse = vsd_ext.tree_attention(*args, sm_scale=0.3)
    ref_out, ref_lse = tree_attention_reference(*args, sm_scale=0.3)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_cuda_agree(gen, dtype):
    args = make_inputs(gen, "cpu", 4, 1, 100, 16, 4, 128, 700, dtype)
    cpu_out, cpu_lse = vsd_ext.tree_attention(*args)
    cuda_out, cuda_lse = vsd_ext.tree_attention(*[a.cuda() for a in args])
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(cuda_out.cpu().float(), cpu_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(cuda_lse.cpu(), cpu_lse, atol=1e-4, rtol=1e-5)


def bad_cases(device):
    """(argument index, replacement, expected-message regex): one bad argument each."""
    B, N, Hq, Hkv, D, L = 2, 5, 4, 2, 64, 10

    def t(*shape, dtype=torch.float32, dev=device):
        return torch.zeros(*shape, dtype=dtype, device=dev)

    mask = tree.build_tree_mask(tree.chain_parents(B, N, device=device))
    good = [t(B, N, Hq, D), t(B, L, Hkv, D), t(B, L, Hkv, D), torch.full((B,), L, device=device),
            t(B, N, Hkv, D), t(B, N, Hkv, D), mask]
    cases = [
        (0, t(B, N, Hq), r"argument 'q'.*4-D"),
        (0, t(B, N, Hq, D, dtype=torch.int32), r"argument 'q'.*dtype"),
        (1, t(B, L, Hkv, D + 1), r"argument 'k_cache'.*head dim"),
        (1, t(B, L, 3, D), r"argument 'k_cache'.*divides Hq"),
        (1, t(3, L, Hkv, D), r"argument 'k_cache'.*batch size 1.*or B"),
        (2, t(B, L + 1, Hkv, D), r"argument 'v_cache'.*shape"),
        (4, t(B, N + 1, Hkv, D), r"argument 'k_tree'.*shape"),
        (5, t(B, N, Hkv, D, dtype=torch.float16), r"argument 'v_tree'.*dtype"),
        (6, t(B, N, 2, dtype=torch.int64), r"argument 'tree_mask'.*shape"),
        (6, mask.int(), r"argument 'tree_mask'.*dtype"),
        (3, torch.full((B,), 1.0, device=device), r"argument 'prefix_lens'.*dtype"),
        (3, torch.full((B + 1,), L, device=device), r"argument 'prefix_lens'.*shape"),
        (0, t(B, N, Hq, 2 * D)[..., ::2], r"argument 'q'.*contiguous last dimension"),
        (1, t(B, L, Hkv, 2 * D)[..., ::2], r"argument 'k_cache'.*contiguous last dimension"),
        (4, t(B, N, Hkv, 2 * D)[..., ::2], r"argument 'k_tree'.*contiguous last dimension"),
        (4, t(B, N, Hkv, D, dev="meta"), r"argument 'k_tree'.*device"),
    ]
    return good, cases


@pytest.mark.parametrize("case", range(16))
def test_bad_inputs(device, case):
    good, cases = bad_cases(device)
    index, bad, match = cases[case]
    args = list(good)
    args[index] = bad
    with pytest.raises(ValueError, match=match):
        vsd_ext.tree_attention(*args)
    if bad.device.type != "meta":  # the C++ checks say the same to direct callers
        with pytest.raises(ValueError, match=match):
            torch.ops.vsd_ext.tree_attention(*args, 0.125)


@pytest.mark.parametrize("lens, match", [([3, 11], r"\[0, L = 10\].*\[3, 11\]"),
                                         ([-1, 4], r"\[-1, 4\]")])
def test_bad_prefix_lens_values(device, lens, match):
    good, _ = bad_cases(device)
    good[3] = torch.tensor(lens, device=device)
    with pytest.raises(ValueError, match=r"argument 'prefix_lens'.*" + match):
        vsd_ext.tree_attention(*good)


def test_default_scale(gen):
    args = make_inputs(gen, "cpu", 2, 2, 4, 2, 1, 48, 6, torch.float32)
    out_default, _ = vsd_ext.tree_attention(*args)
    out_explicit, _ = vsd_ext.tree_attention(*args, sm_scale=1 / math.sqrt(48))
    assert torch.equal(out_default, out_explicit)


# ---- input contract: rejected shapes and scales, empty batches, any prefix_lens stride -------

def small_args(device, B=2, N=5, Hq=4, Hkv=2, D=64, L=10, Bc=None):
    gen = torch.Generator().manual_seed(0)
    Bc = B if Bc is None else Bc
    return list(make_inputs(gen, device, B, Bc, N, Hq, Hkv, D, L, torch.float32))


def backward_args(args, sm_scale=0.125):
    """The backward op's arguments for forward arguments `args` (grad_out = 1, no grad_lse)."""
    q = args[0]
    lse = torch.zeros(q.shape[:3], device=q.device)
    return (torch.ones_like(q), None, *args, torch.zeros_like(q), lse, sm_scale)


@pytest.mark.parametrize("Hq, D, match", [(0, 64, r"at least one query head"),
                                          (4, 0, r"head dim D >= 1")])
def test_rejects_no_heads_and_empty_head_dim(device, Hq, D, match):
    """Hq = 0 or D = 0 would leave lse (and the tree gradients) unwritten: both ops raise, on
    every device and in the fake kernel, and the default scale is no ZeroDivisionError."""
    args = small_args(device, Hq=4, D=max(D, 1))
    args[0] = torch.zeros(2, 5, Hq, D, device=device)
    Hkv = 1 if Hq == 0 else 2
    for i in (1, 2):
        args[i] = torch.zeros(2, 10, Hkv, D, device=device)
    for i in (4, 5):
        args[i] = torch.zeros(2, 5, Hkv, D, device=device)
    pattern = r"argument 'q'.*" + match
    with pytest.raises(ValueError, match=pattern):
        vsd_ext.tree_attention(*args)  # default sm_scale
    with pytest.raises(ValueError, match=pattern):
        torch.ops.vsd_ext.tree_attention(*args, 0.125)
    with pytest.raises(ValueError, match=pattern):
        torch.ops.vsd_ext.tree_attention_backward(*backward_args(args))
    with pytest.raises(ValueError, match=pattern):  # the fake kernel: meta tensors
        vsd_ext.tree_attention(*[a.to("meta") for a in args])


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_rejects_non_finite_sm_scale(device, scale):
    args = small_args(device)
    pattern = r"argument 'sm_scale'.*finite"
    with pytest.raises(ValueError, match=pattern):
        vsd_ext.tree_attention(*args, sm_scale=scale)
    with pytest.raises(ValueError, match=pattern):
        torch.ops.vsd_ext.tree_attention_backward(*backward_args(args, scale))
    with pytest.raises(ValueError, match=pattern):
        vsd_ext.tree_attention(*[a.to("meta") for a in args], sm_scale=scale)


@pytest.mark.parametrize("B, N", [(0, 5), (3, 0), (0, 0)])
@pytest.mark.parametrize("shared_cache", [False, True], ids=["Bc=B", "Bc=1"])
def test_empty_batch_forward_and_backward(device, B, N, shared_cache):
    """B = 0 or N = 0: empty outputs, and gradients of the inputs' shapes (zeros)."""
    Bc, L, Hq, Hkv, D = 1 if shared_cache else B, 10, 4, 2, 64

    def randn(*shape):
        return torch.randn(*shape, device=device, requires_grad=True)

    args = [randn(B, N, Hq, D), randn(Bc, L, Hkv, D), randn(Bc, L, Hkv, D),
            torch.full((B,), L, device=device), randn(B, N, Hkv, D), randn(B, N, Hkv, D),
            torch.zeros(B, N, (N + 63) // 64, dtype=torch.int64, device=device)]
    out, lse = vsd_ext.tree_attention(*args)
    assert out.shape == (B, N, 4, 64) and lse.shape == (B, N, 4)
    inputs = [args[i] for i in (0, 1, 2, 4, 5)]
    grads = torch.autograd.grad(out.sum() + lse.sum(), inputs)
    for g, x in zip(grads, inputs):
        assert g.shape == x.shape and g.dtype == x.dtype and not g.any()


@pytest.mark.parametrize("layout", ["column", "expanded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefix_lens_of_any_stride(device, gen, layout, dtype):
    """prefix_lens as a column view (stride 2) or an expanded scalar (stride 0), int32 and
    int64: forward and gradients equal those with the same values contiguous."""
    B, N, Hq, Hkv, D, L = 4, 20, 4, 2, 64, 150
    args = list(make_inputs(gen, device, B, B, N, Hq, Hkv, D, L, dtype))
    for lens_dtype in (torch.int32, torch.int64):
        if layout == "column":
            table = torch.stack([torch.tensor([7, L, 0, 99]), torch.full((B,), L + 5)], 1)
            lens = table.to(device, lens_dtype)[:, 0]
        else:
            lens = torch.tensor([63], dtype=lens_dtype, device=device).expand(B)
        assert not lens.is_contiguous()
        strided = args[:3] + [lens] + args[4:]
        dense = args[:3] + [lens.contiguous()] + args[4:]
        for got, want in zip(vsd_ext.tree_attention(*strided), vsd_ext.tree_attention(*dense)):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        check_grads(strided, dtype)


# ---- keys no node sees contribute nothing (issue #17, item 2) --------------------------------

def poison_unseen(args, unseen_nodes, value):
    """Copies of the forward arguments with `value` in k/v of the tree nodes no node of the row
    sees (unseen_nodes [B, N] bool; their columns cleared from the mask) and of the cache
    positions no row sees."""
    q, k_cache, v_cache, lens, k_tree, v_tree, mask = args
    B, N = unseen_nodes.shape
    unseen_nodes = unseen_nodes.to(mask.device)
    dense = tree.unpack_tree_mask(mask, N) & ~unseen_nodes[:, None, :]
    mask = tree.pack_tree_mask(dense)
    k_tree, v_tree = k_tree.clone(), v_tree.clone()
    k_tree[unseen_nodes] = value
    v_tree[unseen_nodes] = value
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    pos = torch.arange(k_cache.shape[1], device=lens.device)
    for bc in range(k_cache.shape[0]):
        seen_len = lens.max() if k_cache.shape[0] == 1 else lens[bc]
        k_cache[bc, pos >= seen_len] = value
        v_cache[bc, pos >= seen_len] = value
    return [q, k_cache, v_cache, lens, k_tree, v_tree, mask]


@pytest.mark.parametrize("Bc", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unseen_keys_contribute_nothing(device, gen, Bc, dtype):
    """NaN / inf in k, v of a tree node that no node of its row sees (padding) and of cache
    positions past every row's prefix: outputs and gradients are exactly those with zeros
    there (the 0 * NaN of P V must not happen), and those keys' gradients are 0."""
    B, N, Hq, Hkv, D, L = 3, 70, 8, 2, 64, 90
    args = list(make_inputs(gen, device, B, Bc, N, Hq, Hkv, D, L, dtype))
    args[3] = torch.tensor([40, 0, 77], device=device)
    unseen = torch.zeros(B, N, dtype=torch.bool)
    unseen[0, 50:] = True  # tail padding across both 64-node mask words
    unseen[1, 10:20] = True  # padding in the middle of a row
    unseen[2, 3] = True
    poisoned = poison_unseen(args, unseen, math.nan)
    poisoned[5][unseen] = math.inf  # and inf values
    clean = poison_unseen(args, unseen, 0.0)
    diff = [0, 1, 2, 4, 5]

    def run(fn, inputs):
        inputs = [a.detach().requires_grad_() if i in diff else a for i, a in enumerate(inputs)]
        out, lse = fn(*inputs)
        go = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape).to(out.dtype)
        loss = (out * go).sum() + lse.masked_fill(torch.isinf(lse), 0).sum()
        return (out, lse, *torch.autograd.grad(loss, [inputs[i] for i in diff]))

    for fn in (vsd_ext.tree_attention, tree_attention_reference):
        got, want = run(fn, poisoned), run(fn, clean)
        for name, g, w in zip(["out", "lse", "dq", "dk_cache", "dv_cache", "dk_tree", "dv_tree"],
                              got, want):
            assert torch.equal(g, w), f"{fn.__module__}: {name} differs from the clean run"
        dk_tree, dv_tree = got[5], got[6]
        assert not dk_tree[unseen].any() and not dv_tree[unseen].any()
    out = run(vsd_ext.tree_attention, poisoned)
    assert all(torch.isfinite(t).all() for t in out[2:])


# ---- CUDA only: the two kernel paths, determinism, one synchronization ----------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")


def unaligned(t):
    """The same values in a view whose rows are not 16-byte aligned: the tensor-core kernels
    decline it, so the warp-per-row (simple) kernels run."""
    buf = torch.empty(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype, device=t.device)
    view = buf[..., 1:]
    view.copy_(t)
    return view


@cuda_only
@pytest.mark.parametrize("config", [(3, 1, 70, 8, 2, 64, 300), (2, 2, 33, 4, 4, 128, 130)],
                         ids=lambda c: CONFIG_IDS(*c))
def test_tensor_core_path_matches_simple_path(gen, config):
    """The ldmatrix tensor-core kernels (forward, dQ, dK/dV with the split shared-cache
    reduction) against the simple warp-per-row kernels on the same bf16 inputs."""
    args = list(make_inputs(gen, "cuda", *config, torch.bfloat16))
    simple = [unaligned(a) if a.is_floating_point() else a for a in args]

    def outputs(inputs):
        inputs = [a.detach().requires_grad_() if a.is_floating_point() else a for a in inputs]
        out, lse = vsd_ext.tree_attention(*inputs)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        grads = torch.autograd.grad((out * go).sum() + lse.masked_fill(lse.isinf(), 0).sum(),
                                    [a for a in inputs if a.is_floating_point()])
        return out, lse, *grads

    for name, fast, slow in zip(["out", "lse", "dq", "dk_cache", "dv_cache", "dk_tree", "dv_tree"],
                                outputs(args), outputs(simple)):
        scale = slow.float().abs().max().item() or 1.0
        err = (fast.float() - slow.float()).abs().max().item()
        assert err <= 2e-2 * scale, f"{name}: tensor-core vs simple {err:.3g} (scale {scale:.3g})"


@cuda_only
def test_shared_cache_backward_is_deterministic(gen):
    """Bc = 1 with few key tiles: the rows are split over blocks into fp32 partials reduced in
    a fixed order; two runs give bit-identical gradients."""
    args = [a.requires_grad_() if a.is_floating_point() else a
            for a in make_inputs(gen, "cuda", 16, 1, 40, 8, 2, 128, 200, torch.bfloat16)]
    inputs = [args[i] for i in (0, 1, 2, 4, 5)]
    runs = [torch.autograd.grad(vsd_ext.tree_attention(*args)[0].float().square().sum(), inputs)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    check_grads(args, torch.bfloat16)


@cuda_only
def test_one_synchronization_per_call(gen):
    """check_prefix_values reads (min, max) of prefix_lens back in one blocking copy: the only
    synchronization of a forward or backward call."""
    import warnings
    args = make_inputs(gen, "cuda", 2, 2, 10, 4, 2, 64, 50, torch.bfloat16)
    out, lse = vsd_ext.tree_attention(*args)
    calls = [lambda: torch.ops.vsd_ext.tree_attention(*args, 0.125),
             lambda: torch.ops.vsd_ext.tree_attention_backward(torch.ones_like(out), None, *args,
                                                              out, lse, 0.125)]
    torch.cuda.synchronize()
    for call in calls:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, [str(w.message) for w in caught]
