"""vsd_ext.weighted_linear_divergence against the float64 reference
(vsd_ext/reference/divergence.py): values, gradients for every kind of upstream gradient, gradcheck,
ties q = p, masked classes, zero and negative weights, non-finite inputs, chunking, dtypes, opcheck,
torch.compile and bad inputs. One body per device."""
import pytest
import torch

import vsd_ext
from vsd_ext.reference import divergence as ref

OPS = torch.ops.vsd_ext
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
INF = float("inf")


def make_inputs(gen, M, H, V, *, dtype=torch.float32, bias=False, scale=1.0):
    """Random inputs on CPU: drafter logits of std ~2 * scale, teacher logits of std 3 (drawn
    around the drafter's, so that q and p overlap), weights of both signs, a few zero."""
    hidden = torch.randn(M, H, generator=gen) * (2.0 * scale / H ** 0.5)
    weight = torch.randn(V, H, generator=gen)
    b = torch.randn(V, generator=gen) if bias else None
    z = hidden @ weight.T + (0 if b is None else b)
    teacher = z + torch.randn(M, V, generator=gen) * 2
    tv_w = torch.rand(M, generator=gen) + 0.25
    kl_w = torch.rand(M, generator=gen) - 0.25
    tv_w[1::5] = 0.0
    kl_w[2::7] = 0.0

    def cast(t):
        return None if t is None else t.to(dtype)

    return cast(hidden), cast(weight), teacher, tv_w, kl_w, cast(b)


def to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def close(actual, expected, tol):
    """assert_close with absolute tolerance tol * max(1, |expected|) (NaN equal to NaN)."""
    expected = expected.to(actual.device, torch.float64)
    finite = expected[expected.isfinite()]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale,
                               equal_nan=True)


def reference(h, w, s, tv_w, kl_w, b, temperature, upstream, dtype=torch.float64):
    """Reference outputs (in `dtype`, float64 by default) and the gradients of upstream(loss)
    w.r.t. h, w (and b)."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(True)
              for t in (h, w, b)]
    loss, beta, kl = ref.weighted_linear_divergence(leaves[0], leaves[1], s.to(dtype), tv_w,
                                                    kl_w, leaves[2], temperature)
    grads = torch.autograd.grad(upstream(loss), [t for t in leaves if t is not None])
    return loss.detach(), beta, kl, grads


def run(h, w, s, tv_w, kl_w, b, temperature=1.0, chunk=None, upstream=lambda loss: loss.sum()):
    """The op's outputs and the gradients of upstream(loss) w.r.t. h, w (and b)."""
    leaves = [leaf(t) for t in (h, w, b)]
    loss, beta, kl = vsd_ext.weighted_linear_divergence(leaves[0], leaves[1], s, tv_w, kl_w,
                                                        leaves[2], temperature, chunk_size=chunk)
    grads = torch.autograd.grad(upstream(loss), [t for t in leaves if t is not None])
    return loss, beta, kl, grads


# ---- values and gradients vs the reference ------------------------------------------------------


@pytest.mark.parametrize("M", [1, 3, 67])
@pytest.mark.parametrize("V", [2, 111, 3001])
@pytest.mark.parametrize("H", [8, 33])
def test_matches_reference(device, gen, M, V, H):
    bias = (M + V) % 2 == 1
    h, w, s, tv_w, kl_w, b = to(device, *make_inputs(gen, M, H, V, bias=bias))
    got = run(h, w, s, tv_w, kl_w, b, 0.7, upstream=lambda loss: loss.sum() * 0.5)
    want = reference(h, w, s, tv_w, kl_w, b, 0.7, lambda loss: loss.sum() * 0.5)
    assert got[0].dtype == got[1].dtype == got[2].dtype == torch.float32
    assert got[0].shape == got[1].shape == got[2].shape == (M,)
    for a, c in zip(got[:3], want[:3]):
        close(a, c, 1e-5)
    # fp32 gradients sum V (or M) products: their rounding grows with the summands, not with
    # the result. Each gradient must be within 1e-4 of the float64 one (scaled), or no further
    # from it than 3x the same reference evaluated in float32.
    fp32 = reference(h, w, s, tv_w, kl_w, b, 0.7, lambda loss: loss.sum() * 0.5, torch.float32)
    for a, c, e in zip(got[3], want[3], fp32[3]):
        rounding = (e.double() - c.to(e.device)).abs().max().item()
        error = (a.double() - c.to(a.device)).abs().max().item()
        if error > 3 * rounding:
            close(a, c, 1e-4)


UPSTREAM = {
    "uniform": lambda loss, g: loss.sum() * 1.7,
    "non_uniform": lambda loss, g: (loss * g).sum(),
    "uniform_on_active_only": None,  # built in the test: g differs only on zero-weight rows
}


@pytest.mark.parametrize("case", list(UPSTREAM))
def test_gradients_any_upstream(device, gen, case):
    """Rescaled unit gradients (uniform upstream) and one recomputation (anything else)."""
    M, H, V = 23, 12, 37
    h, w, s, tv_w, kl_w, b = make_inputs(gen, M, H, V, dtype=torch.float64, bias=True)
    tv_w[4] = kl_w[4] = 0.0  # a row without any gradient
    g = torch.randn(M, generator=gen, dtype=torch.float64)
    if case == "uniform_on_active_only":
        g_used = torch.where((tv_w == 0) & (kl_w == 0), g, torch.full_like(g, 0.3))

        def upstream(loss):
            return (loss * g_used.to(loss.device)).sum()
    else:
        def upstream(loss):
            return UPSTREAM[case](loss, g.to(loss.device))
    h, w, s, tv_w, kl_w, b = to(device, h, w, s, tv_w, kl_w, b)
    got = run(h, w, s, tv_w, kl_w, b, 1.3, chunk=5 * V, upstream=upstream)
    want = reference(h, w, s, tv_w, kl_w, b, 1.3, upstream)
    for a, c in zip(got[3], want[3]):
        close(a, c, 1e-10)


@pytest.mark.parametrize("chunk", [1, 40, 111, 3 * 111 + 5, 29 * 111])
def test_chunk_sizes_agree(device, gen, chunk):
    """Chunks of whole rows (a chunk smaller than a row still holds one): several chunks, the
    same results as one."""
    M, H, V = 29, 10, 111
    h, w, s, tv_w, kl_w, b = to(device, *make_inputs(gen, M, H, V, bias=True))
    base = run(h, w, s, tv_w, kl_w, b, chunk=None)
    got = run(h, w, s, tv_w, kl_w, b, chunk=chunk)
    for a, c in zip(got[:3], base[:3]):
        close(a, c, 1e-6)
    for a, c in zip(got[3], base[3]):
        close(a, c, 1e-5)
    with torch.no_grad():
        nograd = vsd_ext.weighted_linear_divergence(h, w, s, tv_w, kl_w, b, chunk_size=chunk)
    for a, c in zip(nograd, base[:3]):
        close(a, c, 1e-6)


@pytest.mark.parametrize("soft", [False, True])
def test_gradcheck(device, gen, soft):
    M, H, V = 4, 3, 5
    h, w, s, tv_w, kl_w, b = to(device, *make_inputs(gen, M, H, V, dtype=torch.float64,
                                                     bias=True))
    s = s.double()
    if soft:
        tv_w[0], kl_w[1] = 0.0, -0.5  # a zero and a negative weight
    assert torch.autograd.gradcheck(
        lambda h_, w_, b_: vsd_ext.weighted_linear_divergence(h_, w_, s, tv_w, kl_w, b_, 1.3)[0],
        (leaf(h), leaf(w), leaf(b)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(device, gen, dtype):
    """fp16/bf16 inputs: fp32 outputs, gradients in the input dtype, close to the float64
    reference of the same (rounded) inputs."""
    M, H, V = 40, 32, 300
    h, w, s, tv_w, kl_w, b = to(device, *make_inputs(gen, M, H, V, dtype=dtype, bias=True))
    s = s.to(dtype)
    got = run(h, w, s, tv_w, kl_w, b)
    want = reference(h, w, s, tv_w, kl_w, b, 1.0, lambda loss: loss.sum())
    assert got[0].dtype == torch.float32
    assert [g.dtype for g in got[3]] == [dtype] * 3
    for a, c in zip(got[:3], want[:3]):
        close(a, c, 2e-3)
    for a, c in zip(got[3], want[3]):
        close(a, c, 3e-2)


# ---- edge cases ----------------------------------------------------------------------------------


def test_ties_q_equals_p(device, gen):
    """Teacher logits equal to the drafter's (exactly: small integers): q = p on every class, so
    beta = 1, TV = KL = 0 and, with ties on the p branch of min(p, q), a zero gradient."""
    M, H, V = 5, 2, 13
    h = torch.randint(-2, 3, (M, H), generator=gen).float()
    w = torch.randint(-3, 4, (V, H), generator=gen).float()
    s = h @ w.T
    tv_w, kl_w = torch.ones(M), torch.full((M,), 0.5)
    h, w, s, tv_w, kl_w = to(device, h, w, s, tv_w, kl_w)
    loss, beta, kl, (dh, dw) = run(h, w, s, tv_w, kl_w, None)
    close(beta, torch.ones(M), 1e-6)
    close(kl, torch.zeros(M), 1e-6)
    close(loss, torch.zeros(M), 1e-6)
    want = reference(h, w, s, tv_w, kl_w, None, 1.0, lambda x: x.sum())
    for a, c in zip((dh, dw), want[3]):
        close(a, c, 1e-6)
    assert dh.abs().max() < 1e-6 and dw.abs().max() < 1e-6


def test_masked_classes(device, gen):
    """-inf logits: a class masked on both sides counts 0 (finite KL); one the teacher masks but
    the drafter does not gives KL = +inf (and, with a zero KL weight, finite loss and gradients)."""
    M, H, V = 6, 5, 10
    h, w, s, tv_w, kl_w, b = make_inputs(gen, M, H, V, dtype=torch.float64, bias=True)
    b[7] = -INF
    s[:, 7] = -INF  # masked on both sides
    s[0:2, 3] = -INF  # the teacher alone masks class 3 in rows 0 and 1
    kl_w[0] = 0.0
    kl_w[1] = 0.5
    h, w, s, tv_w, kl_w, b = to(device, h, w, s, tv_w, kl_w, b)
    rows = torch.arange(M, device=device) != 1  # row 1 has an infinite loss

    def upstream(x):
        return x[rows].sum()

    loss, beta, kl, grads = run(h, w, s, tv_w, kl_w, b, upstream=upstream)
    assert torch.isinf(kl[0:2]).all() and torch.isfinite(kl[2:]).all()
    assert torch.isfinite(beta).all() and loss[1] == INF and torch.isfinite(loss[rows]).all()
    want = reference(h, w, s, tv_w, kl_w, b, 1.0, upstream)
    for a, c in zip((loss, beta, kl), want[:3]):
        close(a, c, 1e-12)
    for a, c in zip(grads, want[3]):
        close(a, c, 1e-10)
    assert torch.equal(grads[1][7], torch.zeros_like(grads[1][7]))  # masked class: no gradient


def test_zero_and_negative_weights(device, gen):
    """A row with both weights 0 still gets beta and kl, with loss 0 and no gradient; negative
    weights are plain coefficients."""
    M, H, V = 7, 4, 19
    h, w, s, tv_w, kl_w, _ = make_inputs(gen, M, H, V, dtype=torch.float64)
    tv_w[3] = kl_w[3] = 0.0
    tv_w[5], kl_w[5] = -0.7, -1.1
    h, w, s, tv_w, kl_w = to(device, h, w, s, tv_w, kl_w)
    loss, beta, kl, (dh, dw) = run(h, w, s, tv_w, kl_w, None)
    want = reference(h, w, s, tv_w, kl_w, None, 1.0, lambda x: x.sum())
    assert loss[3] == 0 and torch.equal(dh[3], torch.zeros_like(dh[3]))
    assert 0 < beta[3] < 1 and kl[3] > 0
    for a, c in zip((loss, beta, kl, dh, dw), (*want[:3], *want[3])):
        close(a, c, 1e-10)


def test_empty_batch(device, gen):
    h, w, s, tv_w, kl_w, _ = to(device, *make_inputs(gen, 0, 4, 9))
    loss, beta, kl, (dh, dw) = run(h, w, s, tv_w, kl_w, None)
    assert loss.shape == beta.shape == kl.shape == (0,)
    assert dh.shape == (0, 4) and torch.equal(dw, torch.zeros_like(dw))


def test_nonfinite_inputs(device, gen):
    """docs/design/OPS.md: a teacher row without mass has no target (loss 0, no gradient, beta and
    kl NaN); a +inf or NaN logit on either side makes beta, kl and the loss NaN and the row's
    gradient NaN; a zero weight keeps its term out."""
    M, H, V = 6, 4, 9
    h, w, s, tv_w, kl_w, _ = make_inputs(gen, M, H, V, dtype=torch.float64)
    s[0] = -INF              # teacher without mass
    h[1] = float("nan")      # NaN drafter row
    s[2, 4] = INF            # +inf teacher logit
    s[3, 1] = float("nan")   # NaN teacher logit
    tv_w[3], kl_w[3] = 0.0, 0.0  # ... with zero weights: loss 0
    h, w, s, tv_w, kl_w = to(device, h, w, s, tv_w, kl_w)
    loss, beta, kl, (dh, _) = run(h, w, s, tv_w, kl_w, None, upstream=lambda x: x[4:].sum())
    want = reference(h, w, s, tv_w, kl_w, None, 1.0, lambda x: x[4:].sum())
    for a, c in zip((loss, beta, kl), want[:3]):
        close(a, c, 1e-12)
    assert loss[0] == 0 and loss[3] == 0 and torch.isnan(loss[[1, 2]]).all()
    assert torch.isnan(beta[:4]).all() and torch.isnan(kl[:4]).all()
    close(dh[4:], want[3][0][4:], 1e-10)
    hl = leaf(h)
    loss, _, _ = vsd_ext.weighted_linear_divergence(hl, w, s, tv_w, kl_w)
    (dh,) = torch.autograd.grad(loss[[0, 2, 4]].sum(), [hl])
    assert torch.equal(dh[0], torch.zeros_like(dh[0])) and torch.isnan(dh[2]).all()


def test_deterministic(device, gen):
    h, w, s, tv_w, kl_w, b = to(device, *make_inputs(gen, 200, 24, 700, bias=True))
    first, second = (run(h, w, s, tv_w, kl_w, b, chunk=30000) for _ in range(2))
    for a, c in zip((*first[:3], *first[3]), (*second[:3], *second[3])):
        assert torch.equal(a, c)


def test_no_gradient_work_without_grad(device, gen):
    h, w, s, tv_w, kl_w, _ = to(device, *make_inputs(gen, 8, 4, 10))
    out = OPS.weighted_linear_divergence_forward(h, w, s, tv_w, kl_w, None, 1.0, 0,
                                                 [False, False, False])
    assert [o.numel() for o in out[6:]] == [0, 0, 0]
    loss, beta, kl = vsd_ext.weighted_linear_divergence(leaf(h), w, s, tv_w, kl_w)
    assert loss.grad_fn is not None and beta.grad_fn is None and kl.grad_fn is None


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_cuda_agree(gen, dtype):
    h, w, s, tv_w, kl_w, b = make_inputs(gen, 130, 64, 2001, dtype=dtype, bias=True)
    outs = {dev: run(*to(dev, h, w, s, tv_w, kl_w, b)) for dev in ("cpu", "cuda")}
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, c in zip((*outs["cpu"][:3], *outs["cpu"][3]), (*outs["cuda"][:3], *outs["cuda"][3])):
        close(c.cpu(), a.double(), tol)


# ---- registration --------------------------------------------------------------------------------


def test_opcheck(device, gen):
    h, w, s, tv_w, kl_w, b = to(device, *make_inputs(gen, 6, 5, 7, bias=True))
    hl, wl, bl = leaf(h), leaf(w), leaf(b)
    out = OPS.weighted_linear_divergence_forward(h, w, s, tv_w, kl_w, b, 1.0, 0, [True] * 3)
    cases = [
        (OPS.weighted_linear_divergence_forward,
         (hl, wl, s, tv_w, kl_w, bl, 0.8, 20, [True, True, True])),
        (OPS.weighted_linear_divergence_forward,
         (hl, wl, s, tv_w, kl_w, None, 1.0, 0, [False, True, False])),
        (OPS.weighted_linear_divergence_backward,
         (torch.rand_like(tv_w), h, w, s, tv_w, kl_w, b, *out[3:6], out[2], *out[6:], 1.0, 0,
          [True, True, True])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(device, gen):
    """The wrapper traces into one graph (fake kernel, autograd registration) and agrees with
    eager."""
    h, w, s, tv_w, kl_w, _ = to(device, *make_inputs(gen, 16, 8, 50))
    g = torch.randn(16, generator=gen).to(device)

    def step(h_, w_):
        loss, beta, kl = vsd_ext.weighted_linear_divergence(h_, w_, s, tv_w, kl_w)
        return (loss * g).sum() / 16, beta.mean(), kl.mean()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, step):
        hl, wl = leaf(h), leaf(w)
        out = fn(hl, wl)
        results.append((*out, *torch.autograd.grad(out[0], [hl, wl])))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c)


# ---- bad inputs ----------------------------------------------------------------------------------


def test_bad_inputs(device, gen):
    h, w, s, tv_w, kl_w, b = to(device, *make_inputs(gen, 4, 3, 5, bias=True))
    f = vsd_ext.weighted_linear_divergence
    cases = [
        ("hidden", lambda: f(h[0], w, s, tv_w, kl_w)),
        ("hidden", lambda: f(h.long(), w, s, tv_w, kl_w)),
        ("weight", lambda: f(h, w[:, :2], s, tv_w, kl_w)),
        ("weight", lambda: f(h, w.double(), s, tv_w, kl_w)),
        ("teacher_logits", lambda: f(h, w, s[:, :4], tv_w, kl_w)),
        ("teacher_logits", lambda: f(h, w, s.long(), tv_w, kl_w)),
        ("tv_weights", lambda: f(h, w, s, tv_w[:3], kl_w)),
        ("tv_weights", lambda: f(h, w, s, tv_w.double(), kl_w)),
        ("kl_weights", lambda: f(h, w, s, tv_w, kl_w[:3])),
        ("bias", lambda: f(h, w, s, tv_w, kl_w, b[:4])),
        ("soft_temperature", lambda: f(h, w, s, tv_w, kl_w, soft_temperature=0.0)),
        ("soft_temperature", lambda: f(h, w, s, tv_w, kl_w, soft_temperature=float("inf"))),
        ("chunk_size", lambda: f(h, w, s, tv_w, kl_w, chunk_size=0)),
    ]
    for arg, call in cases:
        with pytest.raises(ValueError, match=f"'{arg}'"):
            call()
    with pytest.raises(ValueError, match="'kl_weights'.*expected dtype"):
        OPS.weighted_linear_divergence_forward(h, w, s, tv_w, kl_w.double(), None, 1.0, 0,
                                               [False] * 3)
    with pytest.raises(ValueError, match="'teacher_logits'.*expected shape"):
        OPS.weighted_linear_divergence_forward(h, w, s[:, :4], tv_w, kl_w, None, 1.0, 0,
                                               [False] * 3)
    with pytest.raises(ValueError, match="'grad_mask'"):
        OPS.weighted_linear_divergence_forward(h, w, s, tv_w, kl_w, None, 1.0, 0,
                                               [False, False, True])


@needs_cuda
def test_device_mismatch(gen):
    h, w, s, tv_w, kl_w, _ = make_inputs(gen, 4, 3, 5)
    with pytest.raises(ValueError, match="'teacher_logits'.*device"):
        vsd_ext.weighted_linear_divergence(h.cuda(), w.cuda(), s, tv_w.cuda(), kl_w.cuda())
