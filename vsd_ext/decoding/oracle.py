"""`OracleDrafter`: a proposer whose drafts are known continuations (the decoding loop's
ceiling when they are the target's own greedy output)."""
from __future__ import annotations

import torch

from .draft_tree import DraftTree
from .loop import as_batch, generate

DEFAULT_DEPTH = 4  # the oracle's chain depth where a TreeConfig leaves it to the cost model


class OracleDrafter:
    """A drafter-like proposer whose drafts are known continuations, e.g. the target's own
    greedy output (`from_target`): a chain of the next ``depth`` reference tokens per row.

    At T = 0 with the target's greedy continuation every draft is accepted, so τ reaches
    depth + 1 and the measured speed is the decoding loop's ceiling (drafting costs nothing).
    Row b of the batch must be generated from a prefix of ``references[b]``.
    """

    def __init__(self, references: list[list[int]], depth: int):
        self.references = [list(r) for r in references]
        self.depth = depth
        self.ref = None  # [B, L + depth] int64, -1 padded
        self.pos = None  # [B] index of the next token each row will generate
        self.num_nodes = depth + 1

    @classmethod
    def from_target(cls, target, prompts, max_new_tokens: int, depth: int) -> OracleDrafter:
        """Oracle of the target's greedy continuation of ``prompts`` (decoded once, plainly)."""
        prompts = as_batch(prompts)
        out = generate(target, None, prompts, max_new_tokens, ignore_eos=True)
        return cls([p + t for p, t in zip(prompts, out.tokens)], depth)

    def start(self, prompt_ids, lengths, features, first_tokens, capacity) -> None:
        B = prompt_ids.shape[0]
        if B != len(self.references):
            raise ValueError(f"OracleDrafter holds {len(self.references)} references, the "
                             f"batch has {B} rows")
        width = max(len(r) for r in self.references) + self.depth
        self.ref = torch.full((B, width), -1, dtype=torch.int64, device=prompt_ids.device)
        for b, r in enumerate(self.references):
            self.ref[b, :len(r)] = torch.tensor(r, dtype=torch.int64)
        self.pos = lengths.to(prompt_ids.device) + 1

    def propose(self, roots: torch.Tensor) -> DraftTree:
        B = roots.shape[0]
        idx = self.pos[:, None] + torch.arange(self.depth, device=roots.device)
        draft = self.ref.gather(1, idx.clamp(max=self.ref.shape[1] - 1))
        # A chain: node i's parent is i - 1; the chain stops at the first missing token.
        real = torch.cumprod((draft >= 0).long(), 1).bool()
        tokens = torch.cat((roots[:, None], torch.where(real, draft, -1)), 1)
        parents = torch.arange(-1, self.depth, device=roots.device).expand(B, -1)
        parents = torch.cat((parents[:, :1], torch.where(real, parents[:, 1:], -1)), 1)
        return DraftTree(tokens, parents)

    def advance(self, emitted, num_accepted, features) -> None:
        self.pos = self.pos + num_accepted + 1

    def keep(self, rows: torch.Tensor) -> None:
        self.ref, self.pos = self.ref[rows], self.pos[rows]
