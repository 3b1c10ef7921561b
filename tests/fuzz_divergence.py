"""Fuzz cases of `vsd_ext.weighted_linear_divergence` (the VSD objective's fused divergence,
docs/design/OPS.md section 4) and the scalar arguments it shares with
`weighted_linear_cross_entropy`: wrong ranks, shapes, dtypes, devices and strides, empty
dimensions, non-finite teacher logits / weights / hidden states, bad ``soft_temperature``
and ``chunk_size``. A result must equal the pure-PyTorch reference
(`vsd_ext.reference.divergence`, NaN where it gives NaN); anything else must be a
ValueError naming the argument."""
from __future__ import annotations

import torch

from vsd_ext.ops import weighted_linear_cross_entropy, weighted_linear_divergence
from vsd_ext.reference import divergence as ref_div

from fuzz_core import INF, NAN, SEED, Case

M, H, V = 5, 8, 11
NON_TEMPERATURES = (0, -1.0, NAN, INF, "x", None, True, [1.0], torch.tensor([2.0]))
NON_CHUNKS = (0, -1, 1.5, "x", True, [4])


def _inputs() -> dict:
    g = torch.Generator().manual_seed(SEED)
    return dict(hidden=torch.randn(M, H, generator=g), weight=torch.randn(V, H, generator=g),
                teacher_logits=torch.randn(M, V, generator=g) * 2,
                tv_weights=torch.rand(M, generator=g), kl_weights=torch.rand(M, generator=g))


def _matches(args: dict):
    """check(result): (loss_rows, beta, kl) equal the reference's (NaN where it is NaN)."""
    expected = ref_div.weighted_linear_divergence(
        **{k: v for k, v in args.items() if k != "chunk_size"})

    def check(out) -> bool:
        return len(out) == 3 and all(
            a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=1e-5,
                                                  equal_nan=True)
            for a, b in zip(out, expected))
    return check


def _with(base: dict, **changes) -> dict:
    return {**base, **changes}


def _row(t: torch.Tensor, row: int, value: float, cols=slice(None)) -> torch.Tensor:
    t = t.clone()
    t[row, cols] = value
    return t


def bad_tensor_cases() -> list[Case]:
    """Every tensor argument wrong in rank, shape, dtype, device or kind: named."""
    b = _inputs()
    bad = {"hidden-rank": ("hidden", b["hidden"][0]),
           "hidden-int": ("hidden", b["hidden"].long()),
           "hidden-list": ("hidden", b["hidden"].tolist()),
           "hidden-meta": ("hidden", b["hidden"].to("meta")),
           "weight-rank": ("weight", b["weight"][None]),
           "weight-width": ("weight", torch.randn(V, H + 1)),
           "weight-dtype": ("weight", b["weight"].double()),
           "weight-empty-vocab": ("weight", torch.randn(0, H)),
           "weight-none": ("weight", None),
           "teacher_logits-shape": ("teacher_logits", torch.randn(M, V + 1)),
           "teacher_logits-rank": ("teacher_logits", torch.randn(M, V, 1)),
           "teacher_logits-int": ("teacher_logits", b["teacher_logits"].long()),
           "teacher_logits-rows": ("teacher_logits", torch.randn(M + 1, V)),
           "tv_weights-shape": ("tv_weights", torch.rand(M + 1)),
           "tv_weights-double": ("tv_weights", b["tv_weights"].double()),
           "tv_weights-int": ("tv_weights", torch.ones(M, dtype=torch.int64)),
           "kl_weights-rank": ("kl_weights", b["kl_weights"][:, None]),
           "kl_weights-bool": ("kl_weights", b["kl_weights"] > 0.5),
           "bias-shape": ("bias", torch.randn(V + 1)),
           "bias-dtype": ("bias", torch.randn(V).half())}
    names = {"hidden-meta": ("weight", "hidden")}  # either side of the device mismatch
    cases = []
    for name, (arg, value) in bad.items():
        args = _with(b, **{arg: value})
        cases.append(Case(f"divergence-{name}", lambda a=args: weighted_linear_divergence(**a),
                          names.get(name, (arg,))))
    return cases


def scalar_cases() -> list[Case]:
    """soft_temperature and chunk_size of both fused linear ops: bad values named, good
    ones (including a one-row chunk and one larger than the input) equal the reference."""
    b = _inputs()
    ce = dict(hidden=b["hidden"], weight=b["weight"], targets=torch.arange(M) % V,
              row_weights=b["tv_weights"])
    cases = []
    for value in NON_TEMPERATURES:
        cases.append(Case(f"divergence-soft_temperature={value!r}", lambda v=value:
                          weighted_linear_divergence(**b, soft_temperature=v),
                          ("soft_temperature",)))
        cases.append(Case(f"linear_ce-soft_temperature={value!r}", lambda v=value:
                          weighted_linear_cross_entropy(**ce, soft_temperature=v),
                          ("soft_temperature",)))
    for value in NON_CHUNKS:
        cases.append(Case(f"divergence-chunk_size={value!r}", lambda v=value:
                          weighted_linear_divergence(**b, chunk_size=v), ("chunk_size",)))
        cases.append(Case(f"linear_ce-chunk_size={value!r}", lambda v=value:
                          weighted_linear_cross_entropy(**ce, chunk_size=v), ("chunk_size",)))
    for value in (1, 3, 10 ** 12):
        cases.append(Case(f"divergence-chunk_size={value}", lambda v=value:
                          weighted_linear_divergence(**b, chunk_size=v), check=_matches(b)))
    for value in (1e-3, 0.25, 40.0, torch.tensor(2.0)):
        args = _with(b, soft_temperature=value)
        cases.append(Case(f"divergence-soft_temperature={value}", lambda a=args:
                          weighted_linear_divergence(**a), check=_matches(
                              _with(args, soft_temperature=float(value)))))
    return cases


def value_cases() -> list[Case]:
    """Strides, empty dimensions and non-finite values: the reference's result."""
    b = _inputs()
    g = torch.Generator().manual_seed(SEED + 1)
    t, tv, kl, h = b["teacher_logits"], b["tv_weights"], b["kl_weights"], b["hidden"]
    variants = {
        "strided-hidden": dict(hidden=torch.randn(H, M, generator=g).t()),
        "strided-weight": dict(weight=torch.randn(H, V, generator=g).t()),
        "strided-teacher": dict(teacher_logits=torch.randn(V, M, generator=g).t()),
        "strided-weights": dict(tv_weights=torch.rand(2 * M, generator=g)[::2],
                                kl_weights=torch.rand(3 * M, generator=g)[::3]),
        "empty-rows": dict(hidden=torch.randn(0, H), teacher_logits=torch.randn(0, V),
                           tv_weights=torch.rand(0), kl_weights=torch.rand(0)),
        "empty-width": dict(hidden=torch.randn(M, 0), weight=torch.randn(V, 0)),
        "one-class": dict(weight=b["weight"][:1], teacher_logits=t[:, :1]),
        "bias": dict(bias=torch.randn(V, generator=g)),
        "float64": {k: v.double() if k in ("hidden", "weight", "teacher_logits") else v
                    for k, v in b.items()},
        "teacher-nan-row": dict(teacher_logits=_row(t, 0, NAN)),
        "teacher-nan-entry": dict(teacher_logits=_row(t, 1, NAN, 3)),
        "teacher-inf-entry": dict(teacher_logits=_row(t, 1, INF, 2)),
        "teacher-all-masked": dict(teacher_logits=_row(t, 2, -INF)),
        "teacher-some-masked": dict(teacher_logits=_row(t, 2, -INF, slice(0, 5))),
        "teacher-huge": dict(teacher_logits=t * 1e30),
        "hidden-nan-row": dict(hidden=_row(h, 3, NAN)),
        "hidden-inf-entry": dict(hidden=_row(h, 3, INF, 0)),
        "tv_weights-nan": dict(tv_weights=torch.where(torch.arange(M) == 0, NAN, tv)),
        "kl_weights-inf": dict(kl_weights=torch.where(torch.arange(M) == 1, INF, kl)),
        "weights-negative": dict(tv_weights=-tv, kl_weights=-kl),
        "weights-zero-on-masked": dict(teacher_logits=_row(t, 2, -INF, slice(0, 5)),
                                       kl_weights=torch.where(torch.arange(M) == 2, 0.0, kl)),
    }
    cases = []
    for name, change in variants.items():
        args = _with(b, **change)
        cases.append(Case(f"divergence-{name}", lambda a=args: weighted_linear_divergence(**a),
                          check=_matches(args)))
    return cases


def gradient_cases() -> list[Case]:
    """Gradients w.r.t. hidden, weight and bias (one-row chunks, a per-row upstream gradient)
    equal the reference's autograd."""
    b = _inputs()
    bias = torch.randn(V, generator=torch.Generator().manual_seed(SEED + 2))
    upstream = torch.linspace(-1, 2, M)

    def grads(fn, **kw):
        leaves = [b["hidden"].clone().requires_grad_(), b["weight"].clone().requires_grad_(),
                  bias.clone().requires_grad_()]
        loss = fn(leaves[0], leaves[1], b["teacher_logits"], b["tv_weights"], b["kl_weights"],
                  leaves[2], 0.7, **kw)[0]
        (loss * upstream).sum().backward()
        return [leaf.grad for leaf in leaves]

    expected = grads(ref_div.weighted_linear_divergence)
    return [Case("divergence-gradients-chunk1", lambda: grads(weighted_linear_divergence,
                                                               chunk_size=1),
                 check=lambda got: all(torch.allclose(a, e, atol=1e-5)
                                       for a, e in zip(got, expected)))]


def divergence_cases(world) -> list[Case]:
    return bad_tensor_cases() + scalar_cases() + value_cases() + gradient_cases()


BUILDERS = (divergence_cases,)
