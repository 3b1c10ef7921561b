"""Evaluation of a drafter against its target: held-out KL and τ of real decoding.

- `heldout_kl`: the step-0 KL(p ‖ q) on the draft vocabulary, averaged over the target
  positions of held-out rows (the fused CE gives CE(p, q); the teacher entropy is
  subtracted). Cheap; computed with the same passes as training, without gradients.
- `decode_tau`: τ = accepted + 1 per target forward (EAGLE's convention), measured by
  `vsd_ext.decoding.generate` on held-out prompts: T = 0 with top-k trees and greedy
  verification; T > 0 with trees sampled from the drafter and verified against its q
  ("sampled") unless `sampled_trees=False` (top-k trees, "target_only"). The tree is fixed
  (`EVAL_TREE` unless given): τ measures the drafter, not the choices of `generate`'s cost
  model (which may decode autoregressively or cut trees short).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..decoding import TreeConfig, generate
from ..models import Drafter
from .drafting import causal_pass, step_rows
from .objective import LossHead, target_pass

EVAL_TREE = TreeConfig(depth=4, topk=4, total_tokens=12)


@torch.no_grad()
def heldout_kl(step, data, batch_size: int = 4) -> float:
    """Mean step-0 KL(p ‖ q) over the target positions of `data` (a `TokenDataset`)."""
    head = LossHead(step.drafter, step.compute_dtype)
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        ids = data.input_ids[start:start + batch_size].to(step.target.device)
        mask = data.loss_mask[start:start + batch_size].to(step.target.device)
        batch = target_pass(step.target, ids, mask)
        with step.autocast():
            h0, _ = causal_pass(step.drafter, ids[:, 1:],
                                batch.features[:, :-1])
            valid = step_rows(ids, mask, 0)
            soft = step.vocab.restrict(batch.logits[:, 1:][valid])
            if soft.shape[0] == 0:
                continue
            ones = torch.ones(soft.shape[0], device=ids.device)
            ce = head(h0[valid], torch.zeros_like(ones, dtype=torch.int64), ones, soft)
        logp = torch.log_softmax(soft.float(), -1)
        entropy = -(logp.exp() * logp).sum(-1)
        total += float((ce - entropy).sum())
        count += soft.shape[0]
    return total / max(count, 1)


def inference_drafter(drafter, target):
    """The drafter in the target's dtype (what serving runs; a mixed-precision run trains
    fp32 master weights next to a bf16 target): itself when they already agree."""
    if drafter.fc.weight.dtype == target.dtype:
        return drafter
    copy = Drafter(drafter.config)
    copy.load_state_dict(drafter.state_dict())
    return copy.to(device=target.device, dtype=target.dtype).attach(target)


@torch.no_grad()
def decode_tau(target, drafter, prompts, temperature: float, max_new_tokens: int = 48,
               tree: TreeConfig | None = None, seed: int = 0,
               sampled_trees: bool = True) -> dict:
    """Decode `prompts` with the drafter; returns generate's stats (tau, tokens_per_second,
    acceptance_histogram, ...) for one temperature."""
    tree = replace(tree or EVAL_TREE, sampled=sampled_trees and temperature > 0)
    gen = torch.Generator(device=target.device).manual_seed(seed)
    out = generate(target, inference_drafter(drafter, target), prompts, max_new_tokens,
                   temperature=temperature, tree=tree, generator=gen)
    return out.stats
