"""vsd_ext.weighted_cross_entropy / weighted_linear_cross_entropy against the float64 reference
(vsd_ext/reference/cross_entropy.py): values, gradients for every kind of upstream gradient,
gradcheck, edge cases, chunking, opcheck and bad inputs. One body per device."""
import pytest
import torch

import vsd_ext
from vsd_ext.reference import cross_entropy as ref

OPS = torch.ops.vsd_ext
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")


def make_linear(gen, M, H, V, *, dtype=torch.float32, soft=False, bias=False, ignore_every=4,
                scale=1.0):
    """Random fused-op inputs on CPU: logits hidden @ weight.T of std ~ 2 * scale."""
    hidden = torch.randn(M, H, generator=gen) * (2.0 * scale / H ** 0.5)
    weight = torch.randn(V, H, generator=gen)
    targets = torch.randint(0, V, (M,), generator=gen)
    if ignore_every:
        targets[::ignore_every] = -100
    row_weights = torch.rand(M, generator=gen) + 0.25
    soft_targets = torch.randn(M, V, generator=gen) * 3 if soft else None
    b = torch.randn(V, generator=gen) if bias else None

    def cast(t):
        return None if t is None else t.to(dtype)

    return cast(hidden), cast(weight), targets, row_weights, soft_targets, cast(b)


def to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def close(actual, expected, tol, scale=None):
    """assert_close with absolute tolerance relative to `scale` (default: the magnitude of the
    expected values, at least 1). A cross-entropy lse - z_t cancels, so its error scales with
    the logits: compare losses and log-sum-exps with logit_scale()."""
    expected = expected.to(actual.dtype) if actual.dtype == torch.float64 else expected.float()
    if scale is None:  # inputs are O(1): rounding errors are O(tol) even where the values are tiny
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=tol, atol=tol * scale)


# Unit roundoff: a value computed in fp32 and rounded once to the dtype is off by at most
# UNIT[dtype] * |value| (plus the fp32 error).
UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24,
        torch.float64: 2.0 ** -53}


def close_rounded(actual, expected, dtype, atol):
    """Elementwise |actual - expected| <= 2 UNIT[dtype] |expected| + atol * max(1, max|expected|):
    what fp32 math rounded once to ``dtype`` achieves. Unlike a tolerance relative to the largest
    entry, a wrong small entry (a sign-flipped soft-target term) is not hidden by the big ones."""
    expected = expected.double()
    err = (actual.double() - expected).abs()
    bound = 2 * UNIT[dtype] * expected.abs() + atol * max(1.0, expected.abs().max().item())
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"entry {worst.item()}: got {actual.flatten()[worst].item():.6g}, expected "
        f"{expected.flatten()[worst].item():.6g} (bound {bound.flatten()[worst].item():.3g})")


def logit_scale(lse):
    """The magnitude that bounds the rounding error of fp32 losses and log-sum-exps."""
    return max(1.0, lse.abs().max().item()) if lse.numel() else 1.0


def reference_grads(fn, inputs, upstream):
    """float64 reference outputs and gradients of sum(upstream(loss, lse)) w.r.t. `inputs`."""
    leaves = [None if t is None else t.detach().double().requires_grad_(True) for t in inputs]
    loss, lse = fn(*leaves)
    grads = torch.autograd.grad(upstream(loss, lse), [t for t in leaves if t is not None])
    return loss.detach(), lse.detach(), grads


# ---- fused linear variant: values and gradients vs the reference on odd shapes -------------------


@pytest.mark.parametrize("M", [1, 3, 257])
@pytest.mark.parametrize("V", [2, 111, 32001])
@pytest.mark.parametrize("H", [8, 129])
def test_linear_matches_reference(device, gen, M, V, H):
    for soft, bias in ((False, (M + V) % 2 == 1), (True, (M + V) % 2 == 0)):
        h, w, t, rw, s, b = to(device, *make_linear(gen, M, H, V, soft=soft, bias=bias))
        hl, wl, bl = leaf(h), leaf(w), leaf(b)
        loss, lse = vsd_ext.weighted_linear_cross_entropy(hl, wl, t, rw, s, bl,
                                                          soft_temperature=0.7)
        params = [p for p in (hl, wl, bl) if p is not None]
        grads = torch.autograd.grad(loss.sum() * 0.5, params)

        def fn(h_, w_, b_):
            return ref.weighted_linear_cross_entropy(h_, w_, t, rw,
                                                     None if s is None else s.double(), b_,
                                                     soft_temperature=0.7)

        rl, rlse, rgrads = reference_grads(fn, [h, w, b], lambda a, _: a.sum() * 0.5)
        assert loss.dtype == lse.dtype == torch.float32 and loss.shape == lse.shape == (M,)
        close(loss, rl, 1e-5, scale=logit_scale(rlse))
        close(lse, rlse, 1e-5, scale=logit_scale(rlse))
        for g, rg in zip(grads, rgrads):
            close(g, rg, 1e-4)


# ---- every kind of upstream gradient (the reduction="none" bug class) ----------------------------

UPSTREAM = {
    "uniform": lambda loss, lse, g, gl: loss.sum() * 1.7,
    "uniform_on_active_only": None,  # built in the test: g differs only on ignored rows
    "non_uniform": lambda loss, lse, g, gl: (loss * g).sum(),
    "through_lse": lambda loss, lse, g, gl: loss.sum() + (lse * gl).sum(),
    "z_loss": lambda loss, lse, g, gl: loss.sum() / 3 + 1e-2 * (lse ** 2).sum(),
    "lse_only": lambda loss, lse, g, gl: (lse * gl).sum(),
}


@pytest.mark.parametrize("case", list(UPSTREAM))
@pytest.mark.parametrize("precompute", [True, False])
@pytest.mark.parametrize("soft", [False, True])
def test_linear_gradients_any_upstream(device, gen, case, precompute, soft):
    M, H, V = 23, 12, 37
    h, w, t, rw, s, b = make_linear(gen, M, H, V, dtype=torch.float64, soft=soft, bias=True,
                                    ignore_every=3)
    rw[5] = 0.0  # a zero row weight contributes nothing either
    g = torch.randn(M, generator=gen, dtype=torch.float64)
    gl = torch.randn(M, generator=gen, dtype=torch.float64)
    if case == "uniform_on_active_only":
        inactive = (t == -100) | (rw == 0)
        g_used = torch.where(inactive, g, torch.full_like(g, 0.3))

        def upstream(loss, lse, g_, gl_):
            return (loss * g_used.to(loss.device)).sum()
    else:
        upstream = UPSTREAM[case]
    h, w, t, rw, s, b, g, gl = to(device, h, w, t, rw, s, b, g, gl)
    hl, wl, bl = leaf(h), leaf(w), leaf(b)
    loss, lse = vsd_ext.weighted_linear_cross_entropy(hl, wl, t, rw, s, bl, chunk_size=5 * V,
                                                      precompute_grad=precompute)
    grads = torch.autograd.grad(upstream(loss, lse, g, gl), [hl, wl, bl])

    def fn(h_, w_, b_):
        return ref.weighted_linear_cross_entropy(h_, w_, t, rw, s, b_)

    _, _, rgrads = reference_grads(fn, [h, w, b], lambda a, c: upstream(a, c, g, gl))
    for got, want in zip(grads, rgrads):
        close(got, want, 1e-10)


def test_linear_only_hidden_or_only_weight(device, gen):
    """Frozen head (only hidden trains) and frozen input (only weight trains), non-uniform g."""
    M, H, V = 9, 6, 13
    h, w, t, rw, _, _ = to(device, *make_linear(gen, M, H, V, dtype=torch.float64))
    g = torch.randn(M, generator=gen, dtype=torch.float64).to(device)
    for trains_hidden in (True, False):
        hl, wl = (leaf(h), w) if trains_hidden else (h, leaf(w))
        loss, _ = vsd_ext.weighted_linear_cross_entropy(hl, wl, t, rw)
        (got,) = torch.autograd.grad((loss * g).sum(), [hl if trains_hidden else wl])
        _, _, (want,) = reference_grads(
            lambda x: ref.weighted_linear_cross_entropy(x, w, t, rw) if trains_hidden
            else ref.weighted_linear_cross_entropy(h, x, t, rw),
            [h if trains_hidden else w], lambda a, _: (a * g).sum())
        close(got, want, 1e-10)


def test_nonfinite_upstream_on_ignored_rows(device, gen):
    """An ignored row's loss is a constant 0: its upstream gradient, even inf/NaN, changes
    nothing."""
    h, w, t, rw, _, _ = to(device, *make_linear(gen, 8, 5, 11, dtype=torch.float64, ignore_every=4))
    g = torch.ones(8, dtype=torch.float64, device=device)
    g[0], g[4] = float("nan"), float("inf")  # rows 0 and 4 are ignored
    hl, wl = leaf(h), leaf(w)
    loss, _ = vsd_ext.weighted_linear_cross_entropy(hl, wl, t, rw)
    grads = torch.autograd.grad((loss * g).sum(), [hl, wl])
    _, _, want = reference_grads(lambda a, c: ref.weighted_linear_cross_entropy(a, c, t, rw),
                                 [h, w], lambda a, _: (a * g).sum())
    for got, ref_grad in zip(grads, want):
        close(got, ref_grad, 1e-10)


def test_retain_graph_backward_twice(device, gen):
    h, w, t, rw, _, b = to(device, *make_linear(gen, 7, 5, 11, dtype=torch.float64, bias=True))
    hl, wl, bl = leaf(h), leaf(w), leaf(b)
    loss, lse = vsd_ext.weighted_linear_cross_entropy(hl, wl, t, rw, None, bl)
    first = torch.autograd.grad(loss.sum(), [hl, wl, bl], retain_graph=True)
    second = torch.autograd.grad(loss.sum() * 2, [hl, wl, bl])
    for a, c in zip(first, second):
        torch.testing.assert_close(c, 2 * a)


# ---- gradcheck (float64, tiny shapes: one-hot upstream gradients into loss_rows and lse) ---------


@pytest.mark.parametrize("soft", [False, True])
def test_gradcheck(device, gen, soft):
    M, H, V = 4, 3, 5
    h, w, t, rw, s, b = to(device, *make_linear(gen, M, H, V, dtype=torch.float64, soft=soft,
                                                bias=True, ignore_every=3))
    s = None if s is None else s.double()
    for precompute in (True, False):
        assert torch.autograd.gradcheck(
            lambda h_, w_, b_: vsd_ext.weighted_linear_cross_entropy(h_, w_, t, rw, s, b_,
                                                                     soft_temperature=1.3,
                                                                     precompute_grad=precompute),
            (leaf(h), leaf(w), leaf(b)))
    logits = leaf(torch.randn(M, V, generator=gen, dtype=torch.float64).to(device))
    assert torch.autograd.gradcheck(
        lambda z: vsd_ext.weighted_cross_entropy(z, t, rw, s, soft_temperature=1.3), (logits,))


# ---- non-fused variant ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("M,V", [(1, 2), (3, 111), (257, 32001)])
def test_cross_entropy_matches_reference(device, gen, dtype, M, V):
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # fp32 math on the same rounded inputs
    for soft in (False, True):
        logits = (torch.randn(M, V, generator=gen) * 4).to(dtype)
        t = torch.randint(0, V, (M,), generator=gen)
        t[1::3] = -7
        rw = torch.rand(M, generator=gen)
        s = torch.randn(M, V, generator=gen).to(torch.bfloat16) if soft else None
        g, gl = torch.randn(M, generator=gen), torch.randn(M, generator=gen)
        logits, t, rw, s, g, gl = to(device, logits, t, rw, s, g, gl)
        z = leaf(logits)
        loss, lse = vsd_ext.weighted_cross_entropy(z, t, rw, s, ignore_index=-7,
                                                   soft_temperature=2.0)
        upstream = (loss * g.to(loss.dtype)).sum() + (lse * gl.to(lse.dtype)).sum()
        (dz,) = torch.autograd.grad(upstream, [z])
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert dz.dtype == dtype and dz.shape == (M, V)

        def fn(z_):
            return ref.weighted_cross_entropy(z_, t, rw, None if s is None else s.double(), -7, 2.0)

        rl, rlse, (rdz,) = reference_grads(
            fn, [logits], lambda a, c: (a * g.double()).sum() + (c * gl.double()).sum())
        close(loss, rl, tol, scale=logit_scale(rlse))
        close(lse, rlse, tol, scale=logit_scale(rlse))
        close_rounded(dz, rdz, dtype, tol * 4)


def test_cross_entropy_strided_logits(device, gen):
    """Row-strided logits (a slice of a wider tensor) are read in place."""
    wide = torch.randn(6, 20, generator=gen, dtype=torch.float64).to(device)
    logits = leaf(wide)[:, 3:14]
    t = torch.randint(0, 11, (6,), generator=gen).to(device)
    rw = torch.rand(6, generator=gen).to(device)
    loss, lse = vsd_ext.weighted_cross_entropy(logits, t, rw)
    rl, rlse = ref.weighted_cross_entropy(logits.detach(), t, rw)
    close(loss, rl, 1e-12)
    close(lse, rlse, 1e-12, scale=logit_scale(rlse))


# ---- edge cases ----------------------------------------------------------------------------------


@pytest.mark.parametrize("soft", [False, True])
def test_all_ignored_rows(device, gen, soft):
    M, H, V = 5, 4, 9
    h, w, t, rw, s, b = to(device, *make_linear(gen, M, H, V, soft=soft, bias=True))
    t = torch.full_like(t, -100)
    hl, wl, bl = leaf(h), leaf(w), leaf(b)
    loss, lse = vsd_ext.weighted_linear_cross_entropy(hl, wl, t, rw, s, bl)
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.isfinite(lse).all()
    for grad in torch.autograd.grad(loss.sum() / rw.sum(), [hl, wl, bl]):
        assert torch.equal(grad, torch.zeros_like(grad))
    z = leaf(h @ w.T)
    loss, lse = vsd_ext.weighted_cross_entropy(z, t, rw, s)
    assert torch.equal(loss, torch.zeros_like(loss))
    (dz,) = torch.autograd.grad(loss.sum(), [z])
    assert torch.equal(dz, torch.zeros_like(dz))


def test_empty_batch(device, gen):
    h, w, t, rw, _, _ = to(device, *make_linear(gen, 0, 4, 9))
    hl, wl = leaf(h), leaf(w)
    loss, lse = vsd_ext.weighted_linear_cross_entropy(hl, wl, t, rw)
    assert loss.shape == lse.shape == (0,)
    dh, dw = torch.autograd.grad(loss.sum(), [hl, wl])
    assert dh.shape == (0, 4) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("soft", [False, True])
def test_logits_times_1000_are_stable(device, gen, soft):
    M, H, V = 33, 16, 300
    h, w, t, rw, s, _ = to(device, *make_linear(gen, M, H, V, soft=soft, scale=1000.0))
    hl, wl = leaf(h), leaf(w)
    loss, lse = vsd_ext.weighted_linear_cross_entropy(hl, wl, t, rw, s)
    assert lse.abs().max() > 1000  # the logits really are huge
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all()
    grads = torch.autograd.grad(loss.sum(), [hl, wl])
    assert all(torch.isfinite(g).all() for g in grads)
    rl, rlse, rgrads = reference_grads(
        lambda a, c: ref.weighted_linear_cross_entropy(a, c, t, rw, s), [h, w],
        lambda a, _: a.sum())
    close(loss, rl, 1e-6, scale=logit_scale(rlse))
    close(lse, rlse, 1e-6, scale=logit_scale(rlse))
    for g, rg in zip(grads, rgrads):
        close(g, rg, 1e-4)
    z = h.double() @ w.double().T
    loss_z, lse_z = vsd_ext.weighted_cross_entropy(z.float(), t, rw, s)
    close(loss_z, rl, 1e-6, scale=logit_scale(rlse))
    close(lse_z, rlse, 1e-6, scale=logit_scale(rlse))


def test_masked_vocabulary_entries(device, gen):
    """-inf logits (bias mask) and -inf teacher logits: finite losses, zero gradient there."""
    M, H, V = 6, 5, 10
    h, w, t, rw, s, b = to(device, *make_linear(gen, M, H, V, soft=True, bias=True, ignore_every=0))
    b[7] = float("-inf")
    s[:, 7] = float("-inf")
    hl, wl = leaf(h), leaf(w)
    loss, lse = vsd_ext.weighted_linear_cross_entropy(hl, wl, t.clamp(max=6), rw, s, b)
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all()
    dh, dw = torch.autograd.grad(loss.sum(), [hl, wl])
    assert torch.isfinite(dh).all() and torch.equal(dw[7], torch.zeros_like(dw[7]))
    rl, rlse = ref.weighted_linear_cross_entropy(h.double(), w.double(), t.clamp(max=6), rw,
                                                 s.double(), b.double())
    close(loss, rl, 1e-5, scale=logit_scale(rlse))


@pytest.mark.parametrize("chunk", [None, 4])
def test_zero_teacher_mass_on_masked_logits(device, gen, chunk):
    """A teacher entry of probability 0 (exp(-1000) is 0 even in float64) where the drafter logit
    is -inf adds nothing: no 0 * -inf = NaN when teacher weights are rescaled (CUDA thread merges,
    CPU vocabulary tiles: chunk_size=4 streams the rows of 8 classes in two tiles)."""
    M, H, V = 3, 4, 8
    h, w, t, rw, _, b = make_linear(gen, M, H, V, dtype=torch.float64, bias=True, ignore_every=0)
    b[5] = float("-inf")
    s = torch.randn(M, V, generator=gen, dtype=torch.float64)
    s[:, 4:] = -1000.0
    h, w, t, rw, s, b = to(device, h, w, t, rw, s, b)
    rl, rlse = ref.weighted_linear_cross_entropy(h, w, t, rw, s, b)
    assert torch.isfinite(rl).all()
    with torch.no_grad():
        loss, lse = vsd_ext.weighted_linear_cross_entropy(h, w, t, rw, s, b, chunk_size=chunk)
    close(loss, rl, 1e-12, scale=logit_scale(rlse))
    hl, wl = leaf(h), leaf(w)
    loss, _ = vsd_ext.weighted_linear_cross_entropy(hl, wl, t, rw, s, b, chunk_size=chunk)
    close(loss, rl, 1e-12, scale=logit_scale(rlse))
    grads = torch.autograd.grad(loss.sum(), [hl, wl])
    _, _, want = reference_grads(lambda a, c: ref.weighted_linear_cross_entropy(a, c, t, rw, s, b),
                                 [h, w], lambda a, _: a.sum())
    for got, ref_grad in zip(grads, want):
        close(got, ref_grad, 1e-10)
    loss, _ = vsd_ext.weighted_cross_entropy(h @ w.T + b, t, rw, s)
    close(loss, rl, 1e-12, scale=logit_scale(rlse))


@pytest.mark.parametrize("bad_target", [5, -1])
def test_out_of_range_target_raises(device, gen, bad_target):
    """An active row's hard target outside [0, V) raises on every device, before any gradient is
    computed (on CUDA it used to give a NaN loss row but a finite, wrong gradient, which the fused
    op's backward then rescaled into a bad optimizer step)."""
    h, w, t, rw, _, _ = to(device, *make_linear(gen, 4, 3, 5, ignore_every=0))
    bad = t.clone()
    bad[2] = bad_target
    message = rf"'targets'.*\[0, 5\).*got {bad_target} at row 2"
    hl, wl = leaf(h), leaf(w)
    with pytest.raises(ValueError, match=message):
        vsd_ext.weighted_linear_cross_entropy(hl, wl, bad, rw)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        vsd_ext.weighted_linear_cross_entropy(h, w, bad, rw)
    with pytest.raises(ValueError, match=message):
        vsd_ext.weighted_cross_entropy(leaf(h @ w.T), bad, rw)
    bad[2] = -100  # ignored rows may hold anything equal to ignore_index
    loss, _ = vsd_ext.weighted_linear_cross_entropy(hl, wl, bad, rw)
    assert torch.isfinite(loss).all() and loss[2] == 0


def test_fp16_unit_gradients_keep_small_entries(device, gen):
    """fp16: with V = 32768 and row weights of 1e-3 (a mean over 1k rows), the entries of G = dL/dz
    are ~3e-8, which fp16 rounds to zero. The forward's unit gradients must keep them (on CUDA G is
    scaled by 2^k before rounding for the fp16 GEMMs); a GradScaler-like upstream factor of 2^16
    makes the final gradients representable in fp16. The gradient of every weight row that is no
    target is made of those small entries only."""
    M, H, V = 64, 64, 32768
    hidden = (torch.randn(M, H, generator=gen) * (0.5 / H ** 0.5)).half()
    weight = torch.randn(V, H, generator=gen).half()
    t = torch.randint(0, V, (M,), generator=gen)
    rw = torch.full((M,), 1e-3)
    hidden, weight, t, rw = to(device, hidden, weight, t, rw)
    hl, wl = leaf(hidden), leaf(weight)
    loss, _ = vsd_ext.weighted_linear_cross_entropy(hl, wl, t, rw)
    dh, dw = torch.autograd.grad(loss.sum() * 2.0 ** 16, [hl, wl])
    _, _, (rdh, rdw) = reference_grads(
        lambda a, c: ref.weighted_linear_cross_entropy(a, c, t, rw), [hidden, weight],
        lambda a, _: a.sum() * 2.0 ** 16)
    others = torch.ones(V, dtype=torch.bool, device=t.device)
    others[t] = False
    err = (dw.double()[others] - rdw[others]).norm() / rdw[others].norm()
    assert err < 1e-2, f"relative error {err:.3g} of the non-target rows of dweight"
    close(dh.double(), rdh, 1e-2)


def _nonfinite_logits(gen, device):
    """[7, 9] float64 logits and hard targets, one non-finite case per row (docs/design/OPS.md)."""
    z = torch.randn(7, 9, generator=gen, dtype=torch.float64) * 3
    t = torch.randint(0, 9, (7,), generator=gen)
    t[0], z[0, 5] = 2, float("inf")     # +inf logit, target elsewhere: lse +inf, CE NaN
    t[1], z[1, 4] = 4, float("inf")     # +inf logit at the target: CE NaN
    z[2] = float("-inf")                # no drafter mass: lse -inf, CE NaN
    z[3] = float("nan")                 # all NaN (a NaN hidden row): lse NaN, CE NaN
    z[4, 6] = float("nan")              # one NaN logit: lse NaN, CE NaN
    t[5], z[5, 1] = -100, float("inf")  # ignored: loss 0, lse +inf
    t[6], z[6, 3] = 3, float("-inf")    # target masked: CE +inf (true value)
    return z.to(device), t.to(device)


def test_nonfinite_logits_follow_the_contract(device, gen):
    """lse is the exact log-sum-exp (+inf, -inf or NaN as the reference); a row with a +inf logit
    or without mass has no distribution (NaN loss); zero row weights give exactly 0."""
    z, t = _nonfinite_logits(gen, device)
    rw = torch.rand(7, generator=gen).to(device) + 0.5
    loss, lse = vsd_ext.weighted_cross_entropy(z, t, rw)
    rl, rlse = ref.weighted_cross_entropy(z, t, rw)
    torch.testing.assert_close(lse, rlse, equal_nan=True)
    torch.testing.assert_close(loss, rl, equal_nan=True)
    assert lse[0] == float("inf") and lse[2] == float("-inf") and torch.isnan(lse[[3, 4]]).all()
    assert torch.isnan(loss[:5]).all() and loss[5] == 0 and loss[6] == float("inf")
    loss, _ = vsd_ext.weighted_cross_entropy(z, t, torch.zeros_like(rw))
    assert torch.equal(loss, torch.zeros_like(loss))


def test_nonfinite_teacher_rows(device, gen):
    """A teacher row without mass (all -inf: padding) has no target: loss 0 and no gradient, like
    an ignored row; +inf or NaN in a teacher row makes its loss NaN."""
    M, V = 5, 8
    z = torch.randn(M, V, generator=gen, dtype=torch.float64)
    s = torch.randn(M, V, generator=gen, dtype=torch.float64)
    s[0] = float("-inf")
    s[1, 2] = float("inf")
    s[2, 5] = float("nan")
    t = torch.zeros(M, dtype=torch.int64)
    rw = torch.rand(M, generator=gen) + 0.5
    z, s, t, rw = to(device, z, s, t, rw)
    zl = leaf(z)
    loss, lse = vsd_ext.weighted_cross_entropy(zl, t, rw, s)
    rl, rlse = ref.weighted_cross_entropy(z, t, rw, s)
    torch.testing.assert_close(loss, rl, equal_nan=True)
    torch.testing.assert_close(lse, rlse)
    assert loss[0] == 0 and torch.isnan(loss[1:3]).all() and torch.isfinite(loss[3:]).all()
    (dz,) = torch.autograd.grad(loss[[0, 3, 4]].sum() + lse.sum(), [zl])
    _, _, (rdz,) = reference_grads(lambda a: ref.weighted_cross_entropy(a, t, rw, s), [z],
                                   lambda a, c: a[[0, 3, 4]].sum() + c.sum())
    close(dz, rdz, 1e-12)
    eye = torch.eye(V, dtype=torch.float64, device=device)  # z = z @ eye.T: the fused op
    loss_f, lse_f = vsd_ext.weighted_linear_cross_entropy(z, eye, t, rw, s)
    torch.testing.assert_close(loss_f, rl, equal_nan=True)
    torch.testing.assert_close(lse_f, rlse)


def test_nonfinite_hidden_rows(device, gen):
    """The fused op: an all-NaN hidden row gives lse NaN (and a NaN loss), a +inf bias entry lse
    +inf; the other rows and their gradients are those of the reference."""
    M, H, V = 6, 4, 11
    h, w, t, rw, _, b = make_linear(gen, M, H, V, dtype=torch.float64, bias=True, ignore_every=0)
    h[1] = float("nan")
    h, w, t, rw, b = to(device, h, w, t, rw, b)
    hl, wl = leaf(h), leaf(w)
    for chunk in (None, 5):
        loss, lse = vsd_ext.weighted_linear_cross_entropy(hl, wl, t, rw, None, b, chunk_size=chunk)
        rl, rlse = ref.weighted_linear_cross_entropy(h, w, t, rw, None, b)
        torch.testing.assert_close(lse, rlse, equal_nan=True)
        torch.testing.assert_close(loss, rl, equal_nan=True)
        assert torch.isnan(lse[1]) and torch.isnan(loss[1])
    rows = torch.arange(M, device=device) != 1
    (dh,) = torch.autograd.grad(loss[rows].sum(), [hl])
    _, _, (rdh,) = reference_grads(
        lambda a: ref.weighted_linear_cross_entropy(a, w, t, rw, None, b), [h],
        lambda a, _: a[rows].sum())
    close(dh[rows], rdh[rows], 1e-10)
    b_inf = b.clone()
    b_inf[3] = float("inf")
    with torch.no_grad():
        loss, lse = vsd_ext.weighted_linear_cross_entropy(h, w, t, rw, None, b_inf)
    assert (lse[rows] == float("inf")).all() and torch.isnan(loss).all()


# ---- chunking, dtypes, determinism ---------------------------------------------------------------


@pytest.mark.parametrize("soft", [False, True])
def test_chunk_sizes_agree(device, gen, soft):
    """Whole-row chunks (gradients) and vocabulary tiles with online log-sum-exp (no gradients)."""
    M, H, V = 29, 10, 97
    h, w, t, rw, s, b = to(device, *make_linear(gen, M, H, V, soft=soft, bias=True))
    rl, rlse = ref.weighted_linear_cross_entropy(h.double(), w.double(), t, rw,
                                                 None if s is None else s.double(), b.double())
    results = []
    for chunk in (None, 1, 40, V, 3 * V + 5, M * V):
        with torch.no_grad():
            loss, lse = vsd_ext.weighted_linear_cross_entropy(h, w, t, rw, s, b, chunk_size=chunk)
        close(loss, rl, 1e-5, scale=logit_scale(rlse))
        close(lse, rlse, 1e-5, scale=logit_scale(rlse))
        hl, wl, bl = leaf(h), leaf(w), leaf(b)
        loss, _ = vsd_ext.weighted_linear_cross_entropy(hl, wl, t, rw, s, bl, chunk_size=chunk)
        results.append(torch.autograd.grad(loss.sum(), [hl, wl, bl]))
    for grads in results[1:]:
        for a, c in zip(grads, results[0]):
            close(a, c, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_half_precision(device, gen, dtype):
    """fp16/bf16 inputs: fp32 outputs, gradients in the input dtype, close to the float64 reference
    of the same (rounded) inputs."""
    M, H, V = 40, 32, 300
    h, w, t, rw, s, b = to(device, *make_linear(gen, M, H, V, dtype=dtype, soft=True, bias=True))
    hl, wl, bl = leaf(h), leaf(w), leaf(b)
    loss, lse = vsd_ext.weighted_linear_cross_entropy(hl, wl, t, rw, s, bl)
    assert loss.dtype == lse.dtype == torch.float32
    grads = torch.autograd.grad(loss.sum(), [hl, wl, bl])
    assert [g.dtype for g in grads] == [dtype] * 3
    rl, rlse, rgrads = reference_grads(
        lambda a, c, d: ref.weighted_linear_cross_entropy(a, c, t, rw, s, d), [h, w, b],
        lambda a, _: a.sum())
    close(loss, rl, 1e-5, scale=logit_scale(rlse))  # fp32 math on the same rounded inputs
    close(lse, rlse, 1e-5, scale=logit_scale(rlse))
    for g, rg in zip(grads, rgrads):
        if device.type == "cpu":  # GEMM operands upcast to fp32: one rounding at the end
            close_rounded(g, rg, dtype, 1e-5)
        else:  # the logits' gradient enters the GEMMs in the input dtype
            close(g.double(), rg, 3e-2)


def test_deterministic(device, gen):
    h, w, t, rw, s, b = to(device, *make_linear(gen, 300, 24, 1000, soft=True, bias=True))
    runs = []
    for _ in range(2):
        hl, wl, bl = leaf(h), leaf(w), leaf(b)
        loss, lse = vsd_ext.weighted_linear_cross_entropy(hl, wl, t, rw, s, bl, chunk_size=40000)
        runs.append((loss, lse, *torch.autograd.grad(loss.sum(), [hl, wl, bl])))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_no_gradient_work_without_grad(device, gen):
    """The forward computes unit gradients only for tensors that require grad, in grad mode."""
    h, w, t, rw, _, _ = to(device, *make_linear(gen, 8, 4, 10))
    hl = leaf(h)
    out = OPS.weighted_linear_cross_entropy_forward(h, w, t, rw, None, None, -100, 1.0, 0,
                                                    [False, False, False])
    assert [o.numel() for o in out[3:]] == [0, 0, 0]
    _, lse = vsd_ext.weighted_linear_cross_entropy(hl, w, t, rw)
    assert lse.grad_fn is not None
    with torch.no_grad():
        _, lse = vsd_ext.weighted_linear_cross_entropy(hl, w, t, rw)
    assert lse.grad_fn is None


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_cuda_agree(gen, dtype):
    h, w, t, rw, s, b = make_linear(gen, 130, 64, 2001, dtype=dtype, soft=True, bias=True)
    outs = {}
    for dev in ("cpu", "cuda"):
        hl, wl, bl = [leaf(x.to(dev)) for x in (h, w, b)]
        loss, lse = vsd_ext.weighted_linear_cross_entropy(hl, wl, t.to(dev), rw.to(dev), s.to(dev),
                                                          bl)
        outs[dev] = [loss, lse, *torch.autograd.grad(loss.sum(), [hl, wl, bl])]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, c in zip(outs["cpu"], outs["cuda"]):
        close(c.cpu().double(), a.double(), tol)


# ---- registration --------------------------------------------------------------------------------


def test_opcheck(device, gen):
    h, w, t, rw, s, b = to(device, *make_linear(gen, 6, 5, 7, soft=True, bias=True))
    z = h @ w.T
    hl, wl, bl, zl = leaf(h), leaf(w), leaf(b), leaf(z)
    lse = torch.logsumexp(z, -1)
    soft_lse = torch.logsumexp(s, -1)
    cases = [
        (OPS.weighted_cross_entropy_forward, (zl, t, rw, s, -100, 1.0)),
        (OPS.weighted_cross_entropy_forward, (zl, t, rw, None, -100, 1.0)),
        (OPS.weighted_cross_entropy_backward, (torch.rand_like(rw), None, z, t, rw, s, lse,
                                               soft_lse, -100, 1.0)),
        (OPS.weighted_linear_cross_entropy_forward, (hl, wl, t, rw, s, bl, -100, 1.0, 20,
                                                     [True, True, True])),
        (OPS.weighted_linear_cross_entropy_forward, (hl, wl, t, rw, None, None, -100, 1.0, 0,
                                                     [False, True, False])),
        (OPS.weighted_linear_cross_entropy_backward,
         (torch.rand_like(rw), torch.rand_like(rw), h, w, t, rw, s, b, lse, soft_lse,
          h.new_empty(0), h.new_empty(0), h.new_empty(0), -100, 1.0, 0, [True, True, True])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(device, gen):
    """The wrappers trace into one graph (fake kernels, autograd registration) and agree with
    eager."""
    h, w, t, rw, s, _ = to(device, *make_linear(gen, 16, 8, 50, soft=True))
    g = torch.randn(16, generator=gen).to(device)

    def step(h_, w_):
        loss, lse = vsd_ext.weighted_linear_cross_entropy(h_, w_, t, rw, s)
        return (loss * g).sum() / rw.sum() + 1e-3 * (lse ** 2).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, step):
        hl, wl = leaf(h), leaf(w)
        out = fn(hl, wl)
        results.append((out, *torch.autograd.grad(out, [hl, wl])))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c)


# ---- bad inputs ----------------------------------------------------------------------------------


def test_bad_inputs(device, gen):
    h, w, t, rw, s, b = to(device, *make_linear(gen, 4, 3, 5, soft=True, bias=True))
    f = vsd_ext.weighted_linear_cross_entropy
    cases = [
        ("hidden", lambda: f(h[0], w, t, rw)),
        ("hidden", lambda: f(h.long(), w, t, rw)),
        ("weight", lambda: f(h, w[:, :2], t, rw)),
        ("weight", lambda: f(h, w.double(), t, rw)),
        ("targets", lambda: f(h, w, t[:3], rw)),
        ("targets", lambda: f(h, w, t.int(), rw)),
        ("row_weights", lambda: f(h, w, t, rw.double())),
        ("row_weights", lambda: f(h, w, t, rw[:2])),
        ("soft_targets", lambda: f(h, w, t, rw, s[:, :4])),
        ("bias", lambda: f(h, w, t, rw, None, b[:4])),
        ("soft_temperature", lambda: f(h, w, t, rw, s, soft_temperature=0.0)),
        ("soft_temperature", lambda: f(h, w, t, rw, s, soft_temperature=float("nan"))),
        ("chunk_size", lambda: f(h, w, t, rw, chunk_size=0)),
        ("logits", lambda: vsd_ext.weighted_cross_entropy(h[0], t, rw)),
        ("logits", lambda: vsd_ext.weighted_cross_entropy(h[:, :0], t, rw)),
        ("targets", lambda: vsd_ext.weighted_cross_entropy(h @ w.T, t.float(), rw)),
    ]
    for arg, call in cases:
        with pytest.raises(ValueError, match=f"'{arg}'"):
            call()
    # the C++ checks name the argument too (direct op calls, bypassing the wrapper)
    with pytest.raises(ValueError, match="'row_weights'.*expected dtype"):
        OPS.weighted_cross_entropy_forward(h @ w.T, t, rw.double(), None, -100, 1.0)
    with pytest.raises(ValueError, match="'weight'.*expected shape"):
        OPS.weighted_linear_cross_entropy_forward(h, w[:, :2], t, rw, None, None, -100, 1.0, 0,
                                                  [False] * 3)


@needs_cuda
def test_device_mismatch(gen):
    h, w, t, rw, _, _ = make_linear(gen, 4, 3, 5)
    with pytest.raises(ValueError, match="'weight'.*device"):
        vsd_ext.weighted_linear_cross_entropy(h.cuda(), w, t.cuda(), rw.cuda())
    with pytest.raises(ValueError, match="'targets'.*device"):
        vsd_ext.weighted_linear_cross_entropy(h.cuda(), w.cuda(), t, rw.cuda())
