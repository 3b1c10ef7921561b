"""vsd_ext.verify_tree: batched lossless tree verification (docs/design/OPS.md section 2).

The rule (modes, tie-breaks, zero-mass cases, the final inverse-CDF draw) is specified in
:mod:`vsd_ext.reference.verify_tree`. Verification is not differentiable: no autograd.

The C++ op checks every argument and value; the wrapper adds what only Python sees (mode
names, uniforms drawn from a generator). The fake kernel checks the metadata itself: fake and
meta tensors never reach the C++ checks.
"""
from __future__ import annotations

import torch

from .checks import check_dtype, check_positive, check_rank, check_tensor, fail, real_scalar

MODES = {"greedy": 0, "target_only": 1, "sampled": 2}
_LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_UNIFORM_DTYPES = (torch.float32, torch.float64)
_DRAFT_PROBS_DTYPES = (torch.float32, torch.bfloat16)


def _logits_shape(target_logits) -> tuple[int, int, int]:
    """(B, N, V) of a valid target_logits: the outputs' shapes, and the uniforms'."""
    B, N, V = check_rank(target_logits, "target_logits", 3, "[B, N, V]")
    check_dtype(target_logits, "target_logits", _LOGITS_DTYPES)
    if N < 1 or V < 1:
        fail("target_logits", f"expected N >= 1 nodes and V >= 1 tokens, got shape {[B, N, V]}")
    return B, N, V


def _check_args(target_logits, draft_tokens, parents, uniforms, draft_probs, mode, temperature):
    """The fake kernel's checks (`vsd_ext.ops.checks`): shapes, dtypes, devices, mode and
    temperature. The data checks (parents, tokens, uniforms and probabilities of the rows a
    walk reads) need the data: the kernels make them."""
    if mode not in (0, 1, 2):
        fail("mode", f"expected 0 (greedy), 1 (target_only) or 2 (sampled), got {mode}")
    if mode != 0:
        check_positive(temperature, "temperature")
    B, N, V = _logits_shape(target_logits)
    ref = (target_logits, "target_logits")
    check_tensor(draft_tokens, "draft_tokens", (B, N), (torch.int64,), *ref)
    check_tensor(parents, "parents", (B, N), (torch.int64,), *ref)
    check_tensor(uniforms, "uniforms", (B, N + 1), _UNIFORM_DTYPES, *ref)
    if draft_probs is not None:
        check_tensor(draft_probs, "draft_probs", (B, N, V), _DRAFT_PROBS_DTYPES, *ref)
    elif mode == 2:
        fail("draft_probs", "required for mode='sampled': the distributions the children were "
             "drafted from")


def verify_tree(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    uniforms: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    mode: str = "target_only",
    temperature: float = 1.0,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Verify B draft trees against the target in one call (lossless rejection sampling).

    Args:
        target_logits: ``[B, N, V]`` float16 / bfloat16 / float32. Row ``i`` is the target's
            distribution of the token that follows node ``i`` (softmax of ``logits / T``).
            ``-inf`` masks a token; NaN / +inf in a row the walk uses raises.
        draft_tokens: ``[B, N]`` int64. Token of node ``i``; node 0 is the root (the last
            accepted token, never verified, must be a valid id); ``-1`` marks a padding node.
        parents: ``[B, N]`` int64. ``parents[b, 0] == -1``; a real node ``i >= 1`` has a real
            parent ``0 <= parents[b, i] < i`` (topological order). Padding nodes' parents are
            ignored. Children are tried in increasing index order.
        uniforms: ``[B, N + 1]`` float32 / float64 in ``[0, 1)``, or None to draw float64
            uniforms from ``generator`` (on the generator's device, then moved).
            ``uniforms[b, i]`` decides the test of node ``i``; ``uniforms[b, N]`` the final draw.
        draft_probs: ``[B, N, V]`` float32 / bfloat16 or None: ``q`` at node ``i`` (normalized
            by its sum), the distribution its children were drafted from without replacement.
            Required for ``mode="sampled"``, ignored otherwise.
        mode: ``"greedy"``, ``"target_only"`` or ``"sampled"``.
        temperature: float > 0 applied to the target logits (ignored in greedy mode).
        generator: used only when ``uniforms`` is None.

    Returns:
        accepted_nodes: ``[B, N]`` int64, root 0 first, then the accepted nodes, -1 padded.
        emitted_tokens: ``[B, N]`` int64, the accepted draft tokens then exactly one
        correction / bonus token, -1 padded.
        num_accepted: ``[B]`` int64, accepted draft tokens (``num_accepted + 1`` are emitted).

    Every mode emits tokens distributed exactly as the target samples them at this
    temperature (greedy: exactly greedy decoding). CPU and CUDA make the same decisions.
    """
    if mode not in MODES:
        fail("mode", f"expected one of {sorted(MODES)}, got {mode!r}")
    mode_id = MODES[mode]
    if uniforms is None:
        B, N, _ = _logits_shape(target_logits)
        gen_device = generator.device if generator is not None else target_logits.device
        uniforms = torch.rand((B, N + 1), generator=generator, dtype=torch.float64,
                              device=gen_device).to(target_logits.device)
    return torch.ops.vsd_ext.verify_tree(
        target_logits, draft_tokens, parents, uniforms, draft_probs, mode_id,
        real_scalar(temperature, "temperature")
    )


@torch.library.register_fake("vsd_ext::verify_tree")
def _verify_tree_fake(target_logits, draft_tokens, parents, uniforms, draft_probs, mode,
                      temperature):
    _check_args(target_logits, draft_tokens, parents, uniforms, draft_probs, mode, temperature)
    B, N, _ = target_logits.shape
    out = target_logits.new_empty((B, N), dtype=torch.int64)
    return out, torch.empty_like(out), target_logits.new_empty((B,), dtype=torch.int64)
