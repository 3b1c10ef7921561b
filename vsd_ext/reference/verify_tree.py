"""Reference of vsd_ext.verify_tree: batched lossless tree verification (the specification).

Pure PyTorch in float64 on the inputs' device: a softmax of every node, then a readable Python
walk per row. The CPU and CUDA kernels implement exactly this rule (same float64 formulas; only
the order of long sums differs, so they make the same decisions except on measure-zero ties).

Tree. Node 0 is the root (the last accepted token; never verified). Node i >= 1 is real unless
``draft_tokens[b, i] == -1`` (padding). The children of a node are the real nodes whose parent it
is, tried in increasing index order. Padding nodes are never children.

Target distribution at node i: ``p_i = softmax(target_logits[b, i] / T)``, computed as
``e(v) = exp((x_v - max x) / T)``, ``p = e / sum(e)`` (no overflow for any T > 0). ``-inf``
logits are allowed (probability 0); a used row holding NaN or +inf, or no finite entry, is an
error (the kernels raise; this reference assumes valid inputs).

Uniforms: ``uniforms[b, c]`` decides the test of node c; ``uniforms[b, N]`` drives the single
final draw. All tests are strict ``<``.

Walk from ``cur = 0``; at ``cur``:

- greedy (T ignored): ``a`` = argmax of the logits row (ties: lowest index). Move to the first
  child whose token is ``a``; if none, emit ``a`` and stop (at a leaf too). This is exactly greedy
  decoding of the target.
- no children (a leaf): emit the bonus token drawn from ``p_cur``; stop.
- target_only (children are deterministic drafts, q = delta): ``r = p_cur``. For each child c
  with token x: accept iff ``u_c < r(x) / sum(r)`` (never when r(x) = 0); on rejection set
  ``r(x) = 0`` (renormalization is implicit in ``/ sum(r)``; the kernels keep the rejected mass as
  a scalar, no O(V) work). A repeated sibling token has r(x) = 0: rejected. If no child is
  accepted, emit the correction drawn from r.
- sampled (children were drawn without replacement from ``q = draft_probs[b, cur]``, normalized
  by its float64 sum; a used row must be finite and nonnegative with a positive sum, else the
  kernels raise): ``r = p_cur``. For each child c with token x, with r and q normalized: accept iff
  ``u_c * q(x) < r(x)``, i.e. ``u_c < min(1, r(x) / q(x))``; q(x) = 0 accepts iff r(x) > 0, and
  r(x) = 0 never accepts. On rejection ``r <- norm(max(r - q, 0))`` and then
  ``q <- norm(q with x zeroed)``. A q with no mass left counts as all zeros (r is then unchanged
  by the next rejection). If ``max(r - q, 0)`` has no mass, r is kept: in exact arithmetic that
  means r == q, where this rejection had probability 0, and keeping r keeps every later draw
  inside the support of p. If no child is accepted, emit the correction drawn from r.
  Lossless: given the history, child x ~ q (the current, zeroed q), accepting with
  min(1, r/q) and otherwise continuing with the residual reproduces r exactly (recursive
  rejection sampling without replacement).

Final draw from unnormalized weights w (r, or p for the bonus) with ``u = uniforms[b, N]``:
the smallest v with ``w(v) > 0`` and ``cumsum(w)[v] > u * sum(w)``; if rounding leaves none,
the largest v with ``w(v) > 0``. Zero-probability tokens are never drawn. If w has no mass at
all (target_only after every token of positive probability was rejected, reachable only
through rounding), the correction is drawn from p instead.

Outputs: ``accepted_nodes[b]`` = root 0, then the accepted nodes, -1 padded;
``emitted_tokens[b]`` = tokens of the accepted nodes, then exactly one final token, -1 padded;
``num_accepted[b]`` = number of accepted nodes (at most N - 1, so both fit in N columns).
"""
from __future__ import annotations

import torch

MODES = ("greedy", "target_only", "sampled")


def _children(tokens: list[int], parents: list[int]) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in tokens]
    for i in range(1, len(tokens)):
        if tokens[i] != -1:
            kids[parents[i]].append(i)
    return kids


def _draw(w: torch.Tensor, u: float) -> int:
    """Inverse CDF of the unnormalized weights w; -1 when w has no mass."""
    positive = w > 0
    if not bool(positive.any()):
        return -1
    hits = torch.nonzero(positive & (torch.cumsum(w, 0) > u * w.sum()))
    if hits.numel():
        return int(hits[0])
    return int(torch.nonzero(positive)[-1])


def _walk_row(logits, probs, q_rows, tokens, parents, u, mode):
    n = len(tokens)
    kids = _children(tokens, parents)
    path, cur = [0], 0
    while True:
        if mode == "greedy":
            a = int(torch.argmax(logits[cur]))  # first maximal index
            nxt = next((c for c in kids[cur] if tokens[c] == a), None)
            if nxt is None:
                final = a
                break
        elif not kids[cur]:
            final = _draw(probs[cur], u[n])
            break
        elif mode == "target_only":
            r = probs[cur].clone()
            nxt = None
            for c in kids[cur]:
                x = tokens[c]
                if r[x] > 0 and u[c] * r.sum() < r[x]:
                    nxt = c
                    break
                r[x] = 0.0
            if nxt is None:
                final = _draw(r, u[n])
                if final < 0:
                    final = _draw(probs[cur], u[n])
                break
        else:
            r = probs[cur].clone()
            q = q_rows[cur].clone()
            nxt = None
            for c in kids[cur]:
                x = tokens[c]
                qn = q / q.sum() if q.sum() > 0 else torch.zeros_like(q)
                rn = r / r.sum()
                if u[c] * qn[x] < rn[x]:
                    nxt = c
                    break
                residual = (rn - qn).clamp_min(0.0)
                if residual.sum() > 0:
                    r = residual
                q[x] = 0.0
            if nxt is None:
                final = _draw(r, u[n])
                break
        path.append(nxt)
        cur = nxt
    emitted = [tokens[c] for c in path[1:]] + [final]
    return path, emitted


def verify_tree(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    uniforms: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    mode: str = "target_only",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of :func:`vsd_ext.verify_tree` (same arguments; ``mode`` is a string).

    Shapes: target_logits [B, N, V] (fp16/bf16/fp32), draft_tokens / parents [B, N] int64,
    uniforms [B, N + 1], draft_probs [B, N, V] or None. Returns accepted_nodes [B, N],
    emitted_tokens [B, N], num_accepted [B] (int64, on the logits' device).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "sampled" and draft_probs is None:
        raise ValueError("draft_probs is required for mode='sampled'")
    B, N, _ = target_logits.shape
    accepted = torch.full((B, N), -1, dtype=torch.long)
    emitted = torch.full((B, N), -1, dtype=torch.long)
    num = torch.zeros(B, dtype=torch.long)
    tokens, parent_lists = draft_tokens.tolist(), parents.tolist()
    u_all = uniforms.double().tolist()
    for b in range(B):  # one row at a time: float64 temporaries of [N, V], not [B, N, V]
        logits = target_logits[b].double()
        probs = None
        if mode != "greedy":
            # softmax of logits / T, shifted by the row max: exp((x - max) / T), normalized.
            shifted = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
            probs = torch.softmax(shifted, dim=-1)
        q_rows = draft_probs[b].double() if mode == "sampled" else None
        path, out = _walk_row(logits, probs, q_rows, tokens[b], parent_lists[b], u_all[b], mode)
        accepted[b, : len(path)] = torch.tensor(path)
        emitted[b, : len(out)] = torch.tensor(out)
        num[b] = len(path) - 1
    dev = target_logits.device
    return accepted.to(dev), emitted.to(dev), num.to(dev)
