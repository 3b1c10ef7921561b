"""vsd_ext.verify_tree: batched lossless tree verification (OPS.md section 2).

The rule (modes, tie-breaks, zero-mass cases, the final inverse-CDF draw) is specified in
:mod:`vsd_ext.reference.verify_tree`. Verification is not differentiable: no autograd.
"""
from __future__ import annotations

import math

import torch

MODES = {"greedy": 0, "target_only": 1, "sampled": 2}
_LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_UNIFORM_DTYPES = (torch.float32, torch.float64)
_DRAFT_PROBS_DTYPES = (torch.float32, torch.bfloat16)


def _fail(arg: str, msg: str):
    raise ValueError(f"vsd_ext: argument '{arg}': {msg}")


def _check_tensor(t, arg, shape, dtypes, device):
    if not isinstance(t, torch.Tensor):
        _fail(arg, f"expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        _fail(arg, f"expected shape {list(shape)}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        _fail(arg, f"expected dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.device != device:
        _fail(arg, f"expected device {device} (that of 'target_logits'), got {t.device}")


def _check_logits(target_logits):
    """Returns (B, N, V) of a valid target_logits."""
    if not isinstance(target_logits, torch.Tensor) or target_logits.dim() != 3:
        shape = list(target_logits.shape) if isinstance(target_logits, torch.Tensor) else None
        _fail("target_logits", f"expected a 3-D tensor [B, N, V], got shape {shape}")
    if target_logits.dtype not in _LOGITS_DTYPES:
        _fail("target_logits",
              f"expected dtype float16, bfloat16 or float32, got {target_logits.dtype}")
    B, N, V = target_logits.shape
    if N < 1 or V < 1:
        _fail("target_logits", f"expected N >= 1 nodes and V >= 1 tokens, got shape {[B, N, V]}")
    return B, N, V


def _check_args(target_logits, draft_tokens, parents, uniforms, draft_probs, mode, temperature):
    """Shape / dtype / device / mode / temperature checks (the data checks run in the kernels)."""
    if mode not in (0, 1, 2):
        _fail("mode", f"expected 0 (greedy), 1 (target_only) or 2 (sampled), got {mode}")
    if mode != 0 and not (math.isfinite(temperature) and temperature > 0):
        _fail("temperature", f"expected a finite value > 0, got {temperature}")
    B, N, V = _check_logits(target_logits)
    dev = target_logits.device
    _check_tensor(draft_tokens, "draft_tokens", (B, N), (torch.int64,), dev)
    _check_tensor(parents, "parents", (B, N), (torch.int64,), dev)
    _check_tensor(uniforms, "uniforms", (B, N + 1), _UNIFORM_DTYPES, dev)
    if draft_probs is not None:
        _check_tensor(draft_probs, "draft_probs", (B, N, V), _DRAFT_PROBS_DTYPES, dev)
    elif mode == 2:
        _fail("draft_probs", "required for mode='sampled': the distributions the children were "
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
        _fail("mode", f"expected one of {sorted(MODES)}, got {mode!r}")
    mode_id = MODES[mode]
    if uniforms is None:
        B, N, _ = _check_logits(target_logits)
        gen_device = generator.device if generator is not None else target_logits.device
        uniforms = torch.rand((B, N + 1), generator=generator, dtype=torch.float64,
                              device=gen_device).to(target_logits.device)
    _check_args(target_logits, draft_tokens, parents, uniforms, draft_probs, mode_id,
                float(temperature))
    return torch.ops.vsd_ext.verify_tree(
        target_logits, draft_tokens, parents, uniforms, draft_probs, mode_id, float(temperature)
    )


@torch.library.register_fake("vsd_ext::verify_tree")
def _verify_tree_fake(target_logits, draft_tokens, parents, uniforms, draft_probs, mode,
                      temperature):
    _check_args(target_logits, draft_tokens, parents, uniforms, draft_probs, mode, temperature)
    B, N, _ = target_logits.shape
    out = target_logits.new_empty((B, N), dtype=torch.int64)
    return out, torch.empty_like(out), target_logits.new_empty((B,), dtype=torch.int64)
