"""Tree utilities shared by decoding and training: parents array -> depths, root-to-node paths,
the bit-packed visibility mask that `vsd_ext.tree_attention` takes, its dense form, masks grown
node by node, and the masks of chains.

Conventions (the same as `vsd_ext.verify_tree`):

- ``parents`` is ``[B, N]`` int64. Node 0 of every row is the root (``parents[:, 0] == -1``).
  A real node ``i > 0`` has ``0 <= parents[b, i] < i`` (topological order) and a real parent.
- A node ``i > 0`` with a negative parent is a *padding* node, and so is any node marked
  ``False`` in the optional ``valid`` ``[B, N]`` bool (e.g. ``draft_tokens >= 0``; a row whose
  root is invalid is all padding). Padding nodes have depth -1, an all ``-1`` path and an
  all-zero mask row, and are nobody's ancestor.
- Node ``j`` is visible to node ``i`` iff ``j`` is an ancestor of ``i`` or ``i`` itself.
  Packed: bit ``j % 64`` of word ``j // 64`` of ``tree_mask[b, i]`` (``W = ceil(N / 64)`` words).

Everything is vectorized over rows and nodes: ancestors come from pointer jumping (binary
lifting), ``O(B * N * log N)`` gathers for depths and ``O(B * N * depth * log N)`` for paths;
there is no Python loop over nodes.
"""
from __future__ import annotations

import torch

__all__ = [
    "tree_depths",
    "tree_paths",
    "build_tree_mask",
    "append_nodes",
    "append_child",
    "chain_mask",
    "unchecked_mask_and_depths",
    "padded_chain",
    "pack_tree_mask",
    "unpack_tree_mask",
    "chain_parents",
    "random_parents",
]

_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def persistent(build):
    """``build()`` run outside inference mode and without autograd: for tensors cached across
    calls. A tensor made under `torch.inference_mode` (e.g. while decoding) is an inference
    tensor, which autograd refuses to save, so a cache filled while decoding would break a
    later training step that reads it."""
    with torch.inference_mode(False), torch.no_grad():
        return build()


def _bit_weights(device: torch.device) -> torch.Tensor:
    """``[64]`` int64 with entry t equal to ``1 << t`` (entry 63 is the sign bit)."""
    if device not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[device] = persistent(lambda: torch.ones(64, dtype=torch.int64,
                                                             device=device)
                                          << torch.arange(64, device=device))
    return _BIT_WEIGHTS[device]


def _fail(arg: str, msg: str):
    raise ValueError(f"vsd_ext.tree: argument '{arg}': {msg}")


def _check_parents(parents: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Validates the tree and returns ``real`` ``[B, N]`` bool (False on padding nodes)."""
    if not isinstance(parents, torch.Tensor) or parents.dim() != 2:
        got = tuple(parents.shape) if isinstance(parents, torch.Tensor) else type(parents)
        _fail("parents", f"expected a [B, N] tensor, got {got}")
    if parents.dtype != torch.int64:
        _fail("parents", f"expected dtype torch.int64, got {parents.dtype}")
    B, N = parents.shape
    if N == 0:
        _fail("parents", "expected N >= 1 nodes, got 0")
    idx = torch.arange(N, device=parents.device)
    real = (parents >= 0) | (idx == 0)
    if valid is not None:
        if valid.shape != parents.shape or valid.dtype != torch.bool:
            _fail("valid", f"expected a bool tensor of shape {tuple(parents.shape)}, "
                  f"got {valid.dtype} {tuple(valid.shape)}")
        if valid.device != parents.device:
            _fail("valid", f"expected device {parents.device}, got {valid.device}")
        real = real & valid
    root_ok = parents[:, 0] == -1
    topo_ok = (parents < idx) | ~real | (idx == 0)
    # A real node's parent must be real (a padding node is nobody's ancestor).
    parent_real = torch.gather(real, 1, parents.clamp(0, N - 1))
    parent_ok = parent_real | ~real | (idx == 0)
    if not bool(root_ok.all() & topo_ok.all() & parent_ok.all()):
        if not bool(root_ok.all()):
            _fail("parents", "expected parents[:, 0] == -1 (node 0 is the root)")
        if not bool(topo_ok.all()):
            b, i = (~topo_ok).nonzero()[0].tolist()
            _fail("parents", f"expected parents[b, i] < i (topological order), "
                  f"got parents[{b}, {i}] = {int(parents[b, i])}")
        b, i = (~parent_ok).nonzero()[0].tolist()
        _fail("parents", f"real node {i} of row {b} has padding node {int(parents[b, i])} as its "
              f"parent")
    return real


def _lifting(parents: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Depths and the binary-lifting table by pointer jumping.

    ``up[0][b, i]`` is the parent of i (the root and padding nodes point to themselves), and
    ``up[k] = up[k-1][up[k-1]]`` is the 2^k-th ancestor, clamped at the root. List ranking:
    ``dist_{k+1}(i) = dist_k(i) + dist_k(up_k(i))`` with ``dist_0 = 1`` for non-root nodes, so
    after ``ceil(log2 N)`` rounds ``dist(i) = depth(i)``.
    """
    B, N = parents.shape
    idx = torch.arange(N, device=parents.device).expand(B, N)
    has_parent = real & (idx > 0)
    up = torch.where(has_parent, parents, idx)
    dist = has_parent.long()
    table = [up]
    for _ in range(max(1, (N - 1).bit_length())):
        dist = dist + torch.gather(dist, 1, up)
        up = torch.gather(up, 1, up)
        table.append(up)
    depth = torch.where(real, dist, torch.full_like(dist, -1))
    return depth, table


def tree_depths(parents: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Depth of every node: ``[B, N]`` int64, root 0, padding -1."""
    real = _check_parents(parents, valid)
    return _lifting(parents, real)[0]


def _paths(parents: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    depth, table = _lifting(parents, real)
    B, N = parents.shape
    max_depth = int(depth.max().clamp(min=0)) if depth.numel() else 0  # B = 0: no rows
    d = torch.arange(max_depth + 1, device=parents.device)
    # path[b, i, d] is the (depth(i) - d)-th ancestor of i: jump by the set bits of that count.
    steps = depth.unsqueeze(-1) - d  # [B, N, D+1]; < 0 past the node itself (and on padding)
    cur = torch.arange(N, device=parents.device).view(1, N, 1)
    cur = cur.expand(B, N, max_depth + 1).reshape(B, N * (max_depth + 1))
    flat_steps = steps.clamp(min=0).reshape(B, N * (max_depth + 1))
    for k, up in enumerate(table):
        jump = ((flat_steps >> k) & 1).bool()
        cur = torch.where(jump, torch.gather(up, 1, cur), cur)
    path = torch.where(steps >= 0, cur.view(B, N, max_depth + 1), torch.full_like(steps, -1))
    return path, depth


def tree_paths(parents: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Root-to-node paths: ``[B, N, max_depth + 1]`` int64; ``paths[b, i, :depth(i) + 1]`` lists
    the node indices from the root (index 0) down to ``i`` itself, the rest is ``-1`` (a
    padding node's path is all ``-1``). ``max_depth`` is the deepest real node of the batch."""
    real = _check_parents(parents, valid)
    return _paths(parents, real)[0]


def pack_tree_mask(dense: torch.Tensor) -> torch.Tensor:
    """Packs a ``[B, N, N]`` bool visibility matrix into the ``[B, N, ceil(N/64)]`` int64 bitmask
    (bit ``j % 64`` of word ``j // 64`` = column j)."""
    if dense.dim() != 3 or dense.dtype != torch.bool:
        _fail("dense", f"expected a [B, N, N] bool tensor, got {dense.dtype} {tuple(dense.shape)}")
    B, N, M = dense.shape
    W = (M + 63) // 64
    padded = torch.zeros(B, N, W * 64, dtype=torch.int64, device=dense.device)
    padded[..., :M] = dense
    # Distinct powers of two never carry, so the int64 sum is the bitwise OR (bit 63 included).
    return (padded.view(B, N, W, 64) * _bit_weights(dense.device)).sum(-1)


def unpack_tree_mask(tree_mask: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack_tree_mask`: ``[B, N, W]`` int64 -> ``[B, N, n]`` bool."""
    if tree_mask.dim() != 3 or tree_mask.dtype != torch.int64:
        _fail("tree_mask", f"expected a [B, N, W] int64 tensor, got {tree_mask.dtype} "
              f"{tuple(tree_mask.shape)}")
    if tree_mask.shape[-1] * 64 < n:
        _fail("tree_mask", f"{tree_mask.shape[-1]} words hold fewer than n = {n} bits")
    bits = (tree_mask.unsqueeze(-1) & _bit_weights(tree_mask.device)) != 0
    return bits.flatten(-2)[..., :n]


def build_tree_mask(parents: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The ``[B, N, ceil(N/64)]`` int64 bitmask of `vsd_ext.tree_attention`: node i sees its
    ancestors and itself; padding rows are all zero."""
    real = _check_parents(parents, valid)
    path, _ = _paths(parents, real)
    B, N = parents.shape
    # Scatter every path entry into its row; invalid entries go to a dump column N, dropped.
    cols = torch.where(path >= 0, path, torch.full_like(path, N))
    dense = torch.zeros(B, N, N + 1, dtype=torch.bool, device=parents.device)
    dense.scatter_(2, cols, True)
    return pack_tree_mask(dense[..., :N])


_OWN_BITS: dict = {}


def _own_bits(start: int, n: int, words: int, device) -> torch.Tensor:
    """``[n, words]`` int64: row j holds node ``start + j``'s own bit (in word
    ``(start + j) // 64``). Cached: a draft loop appends the same ranges at every step."""
    key = (start, n, words, str(device))
    if key not in _OWN_BITS:
        def build():
            node = torch.arange(start, start + n, device=device)
            return torch.where(torch.arange(words, device=device) == (node // 64)[:, None],
                               _bit_weights(device)[node % 64][:, None], 0)

        _OWN_BITS[key] = persistent(build)
    return _OWN_BITS[key]


def append_nodes(tree_mask: torch.Tensor, depths: torch.Tensor, parents: torch.Tensor):
    """Extend a tree by n nodes without re-walking it: tree_mask ``[B, P, W]`` and depths
    ``[B, P]`` of the P nodes so far (as `vsd_ext.tree.build_tree_mask` / `tree_depths` give
    them), parents ``[B, n]`` of the new nodes, each an earlier node (``< P``) or -1
    (padding). A new node sees what its parent sees plus itself, one level deeper; padding
    nodes get an all-zero mask row and depth -1. Returns the mask ``[B, P + n, W']`` and
    depths ``[B, P + n]``. Unchecked: for trees the caller builds itself."""
    B, P, W = tree_mask.shape
    n = parents.shape[1]
    words = (P + n + 63) // 64
    if words > W:
        tree_mask = torch.cat((tree_mask, tree_mask.new_zeros(B, P, words - W)), 2)
    real = parents >= 0
    parent = parents.clamp(min=0)
    inherited = tree_mask.gather(1, parent[..., None].expand(B, n, words))
    rows = torch.where(real[..., None], inherited | _own_bits(P, n, words, parents.device), 0)
    new_depths = torch.where(real, depths.gather(1, parent) + 1, -1)
    return torch.cat((tree_mask, rows), 1), torch.cat((depths, new_depths), 1)


def append_child(tree_mask: torch.Tensor, depths: torch.Tensor, parent: int):
    """`append_nodes` for one new node per row whose parent is the same real node of every
    row (the next level of a chain): slices instead of gathers, a few ops fewer per level."""
    B, P, W = tree_mask.shape
    words = (P + 64) // 64
    if words > W:
        tree_mask = torch.cat((tree_mask, tree_mask.new_zeros(B, P, words - W)), 2)
    row = tree_mask[:, parent:parent + 1] | _own_bits(P, 1, words, tree_mask.device)
    return (torch.cat((tree_mask, row), 1),
            torch.cat((depths, depths[:, parent:parent + 1] + 1), 1))


def unchecked_mask_and_depths(parents: torch.Tensor, max_depth: int):
    """`build_tree_mask(parents)` and `tree_depths(parents)` of a tree its caller built
    itself (valid by construction, at most ``max_depth`` deep), without the checks and the
    pointer jumping: a few small GEMMs instead of a hundred small ops, for a draft tree each
    decoding step. With A the parent relation (``A[i, parents[i]] = 1``) and I on the real
    nodes, ``(I + A)^(2^r)`` for ``2^r >= max_depth`` marks every ancestor of a node and the
    node itself (padding nodes: nothing); a node's depth is its row sum minus one."""
    B, N = parents.shape
    device = parents.device
    idx = torch.arange(N, device=device)
    real = (parents >= 0) | (idx == 0)
    reach = torch.zeros(B, N, N + 1, device=device)
    reach.scatter_(2, torch.where(parents >= 0, parents, N)[..., None], 1.0)
    reach = reach[..., :N] + torch.diag_embed(real.float())
    for _ in range(max(max_depth - 1, 0).bit_length()):
        reach = torch.bmm(reach, reach).clamp_(max=1.0)
    return pack_tree_mask(reach > 0), reach.sum(-1).long() - 1


_CHAIN_MASKS: dict = {}


def chain_mask(levels: int, device, paths: int = 1) -> torch.Tensor:
    """``[1, levels·paths, W]`` bitmask of ``paths`` disjoint chains of ``levels`` nodes,
    stored level-major: node (l, s) at index ``l·paths + s`` sees the nodes (l', s) with
    l' ≤ l. One chain (``paths=1``) is causal attention over a chunk appended to the cache;
    S chains are S sampled paths under one root that lives in the cache. Cached per
    (levels, paths, device): decoding builds one every step."""
    key = (levels, paths, str(device))
    if key not in _CHAIN_MASKS:
        def build():
            idx = torch.arange(levels * paths, device=device)
            level, path = idx // paths, idx % paths
            dense = (path[:, None] == path[None, :]) & (level[None, :] <= level[:, None])
            return pack_tree_mask(dense[None])

        _CHAIN_MASKS[key] = persistent(build)
    return _CHAIN_MASKS[key]


_PADDED_CHAINS: dict = {}


def padded_chain(levels: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``[1, n, ceil(n/64)]`` and depths ``[1, n]`` of a tree of n nodes whose first
    ``levels`` + 1 form a chain from the root and whose others are padding (a draft chain
    shorter than its tree, or the root alone): `build_tree_mask` / `tree_depths` of it,
    cached per (levels, n, device)."""
    key = (levels, n, str(device))
    if key not in _PADDED_CHAINS:
        def build():
            parents = torch.arange(-1, n - 1, device=device)
            parents[levels + 1:] = -1
            return build_tree_mask(parents[None]), tree_depths(parents[None])

        _PADDED_CHAINS[key] = persistent(build)
    return _PADDED_CHAINS[key]


def chain_parents(batch: int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Parents of B chains of n nodes (``[-1, 0, 1, ..., n-2]``): a chain tree's mask is causal."""
    row = torch.arange(-1, n - 1, dtype=torch.int64, device=device)
    return row.expand(batch, n).clone()


def random_parents(
    batch: int, n: int, generator: torch.Generator | None = None,
    device: torch.device | str | None = None
) -> torch.Tensor:
    """Parents of B random recursive trees of n nodes: node i > 0 picks its parent uniformly
    among nodes 0..i-1 (drawn on the CPU with ``generator``, then moved to ``device``)."""
    u = torch.rand(batch, n, generator=generator, dtype=torch.float64)
    parents = (u * torch.arange(n, dtype=torch.float64)).long()
    parents[:, 0] = -1
    return parents.to(device)
