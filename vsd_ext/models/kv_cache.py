"""Static KV cache for a batch of rows with ragged lengths, and KV compaction.

Layout: `k`, `v` are `[layers, B, capacity, Hkv, D]`; `k[layer]` is the `[B, L, Hkv, D]`
cache `vsd_ext.tree_attention` reads, and `lengths[b]` is how many positions of row b are
committed (row b's attention sees exactly `[0, lengths[b])`).

Everything beyond `lengths[b]` is scratch. A tree-verify step writes the keys/values of
its N tree nodes there (node i at `lengths[b] + i`) without committing them; `commit`
then moves the accepted path into place (KV compaction):

    accepted nodes a_0 = 0 (the root), a_1, ..., a_n   (topological order: a_i >= i)
    k[lengths + i] <- k[lengths + a_i]   for i = 0..n,     lengths += n + 1

The gather reads every source before anything is written, so overlapping moves are safe.
"""
from __future__ import annotations

import copy

import torch


class KVCache:
    """Per-layer key/value buffers `[layers, B, capacity, Hkv, D]` plus `lengths` `[B]`.

    `max_length` (e.g. a sliding window) bounds every row's length; `capacity` bounds
    committed plus scratch positions.
    """

    def __init__(self, num_layers: int, batch_size: int, capacity: int, num_kv_heads: int,
                 head_dim: int, dtype=torch.float32, device=None, max_length: int | None = None):
        if batch_size < 1 or capacity < 1:
            raise ValueError(f"KVCache: batch_size and capacity must be >= 1, got "
                             f"{batch_size} and {capacity}")
        shape = (num_layers, batch_size, capacity, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.max_length = max_length

    @classmethod
    def wrap(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """A cache over existing keys/values `[layers, B, L, Hkv, D]`, every position
        committed: e.g. training's step-0 keys/values, which keep their autograd graph."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_length = k, v, None
        cache.lengths = torch.full((k.shape[1],), k.shape[2], dtype=torch.int64, device=k.device)
        return cache

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def device(self) -> torch.device:
        return self.k.device

    def reset(self) -> None:
        """Forget every row's content (lengths back to 0)."""
        self.lengths.zero_()

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop the rows not in ``rows`` (indices into the batch), e.g. finished sequences."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
        self.lengths = self.lengths[rows]

    def row(self, b: int) -> KVCache:
        """A view of row b as a one-row cache (e.g. one sequence's prefix, shared by many
        tree rows through `prefix_lens`); writes to it land in this cache."""
        view = copy.copy(self)
        view.k, view.v = self.k[:, b:b + 1], self.v[:, b:b + 1]
        view.lengths = self.lengths[b:b + 1]
        return view

    def reserve(self, extra: int, prefix_lens: torch.Tensor | None = None) -> None:
        """Check that `extra` more positions fit after `prefix_lens` (default `lengths`)."""
        end = int((self.lengths if prefix_lens is None else prefix_lens).max()) + extra
        if end > self.capacity:
            raise ValueError(f"KVCache: {end} positions needed but the capacity is "
                             f"{self.capacity}; allocate a larger cache")
        if self.max_length is not None and end > self.max_length:
            raise ValueError(f"KVCache: {end} positions exceed the model's sliding window "
                             f"({self.max_length}); longer sequences are not supported")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor,
              positions: torch.Tensor) -> None:
        """Store k, v `[B, T, Hkv, D]` of layer `layer` at `positions` `[B, T]`."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(positions)
        self.k[layer][rows, positions] = k.to(self.k.dtype)
        self.v[layer][rows, positions] = v.to(self.v.dtype)

    def write_layers(self, ks: list[torch.Tensor], vs: list[torch.Tensor],
                     positions: torch.Tensor) -> None:
        """`write` of layers 0 .. len(ks) − 1 at once (the same positions `[B, T]` in every
        layer): one copy per buffer instead of a dozen small ops per layer and buffer, which
        at decode sizes cost more than the copies (`AttentionContext` collects a forward's
        keys/values and writes them here at its end)."""
        n = len(ks)
        if not (self.k.is_contiguous() and self.v.is_contiguous()):  # e.g. a `row` view
            for layer, (k, v) in enumerate(zip(ks, vs)):
                self.write(layer, k, v, positions)
            return
        B, T = positions.shape
        flat = (torch.arange(B, device=positions.device)[:, None] * self.capacity
                + positions).reshape(-1)
        for buffer, values in ((self.k, ks), (self.v, vs)):
            rows = buffer[:n].view(n, B * self.capacity, *buffer.shape[3:])
            rows.index_copy_(1, flat, torch.stack(values).to(buffer.dtype).reshape(
                n, B * T, *buffer.shape[3:]))

    def advance(self, counts: torch.Tensor | int) -> None:
        """Commit `counts` more positions per row (written before by `write`)."""
        self.lengths += counts

    def commit(self, accepted_nodes: torch.Tensor) -> torch.Tensor:
        """KV compaction of a verified tree (module docstring).

        accepted_nodes: `[B, N]` int64, node indices of each row's accepted path, root (0)
        first, `-1` padded (the `accepted_nodes` output of `vsd_ext.verify_tree`); a row of
        all `-1` commits nothing. Returns the per-row count committed `[B]`.
        """
        if accepted_nodes.dim() != 2 or accepted_nodes.shape[0] != self.batch_size:
            raise ValueError(f"commit: accepted_nodes must be [{self.batch_size}, N], got "
                             f"{tuple(accepted_nodes.shape)}")
        accepted = accepted_nodes.to(device=self.device, dtype=torch.int64)
        valid = accepted >= 0
        counts = valid.sum(1)
        src = self.lengths[:, None] + accepted.clamp(min=0)
        dst = self.lengths[:, None] + torch.arange(accepted.shape[1], device=self.device)
        if valid.any() and int(src[valid].max()) >= self.capacity:
            raise ValueError("commit: an accepted node lies beyond the cache capacity")
        rows = torch.arange(self.batch_size, device=self.device)[:, None].expand_as(accepted)
        rows, src, dst = rows[valid], src[valid], dst[valid]
        self.k[:, rows, dst] = self.k[:, rows, src]
        self.v[:, rows, dst] = self.v[:, rows, src]
        self.lengths += counts
        return counts
