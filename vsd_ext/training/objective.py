"""What every objective shares: the frozen target's pass, the fused loss call, the step module.

`TrainStep` is the `nn.Module` the trainer (and DDP) runs: its only submodule is the drafter,
so DDP synchronizes exactly the drafter's gradients; the target is held outside the module
tree, frozen (`requires_grad_(False)`, run under `torch.no_grad`). Its forward takes one
micro-batch, computes the target's logits and features online, and returns the
objective's scalar loss and metrics.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.cross_entropy import weighted_linear_cross_entropy
from .auf import auf_loss
from .divergence_eager import weighted_linear_divergence
from .drafting import DraftVocab, head_inputs
from .eagle3 import eagle3_loss
from .vsd import vsd_loss

OBJECTIVES = {"eagle3": eagle3_loss, "auf": auf_loss, "vsd": vsd_loss}


@dataclass
class TargetBatch:
    """One micro-batch with the frozen target's outputs: input_ids `[B, T]` (−1 padded),
    loss_mask `[B, T]`, logits `[B, T, V]`, features `[B, T, F]`, and the target's KV cache
    of the sequences (VSD's tree scoring reads it) or None."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    logits: torch.Tensor
    features: torch.Tensor
    cache: object = None


@torch.no_grad()
def target_pass(target, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                with_cache: bool = False) -> TargetBatch:
    """The target's logits and features of every position (online, never stored); with
    `with_cache` the sequences' keys/values are kept in a `KVCache` of capacity T."""
    if not with_cache:
        out = target.run(input_ids)
        return TargetBatch(input_ids, loss_mask, out.logits, out.features)
    B, T = input_ids.shape
    cache = target.new_cache(B, T)
    out = target.prefill(input_ids, cache, (input_ids >= 0).sum(1))
    return TargetBatch(input_ids, loss_mask, out.logits, out.features, cache)


class LossHead:
    """The fused weighted cross-entropy over the drafter's LM head, in the run's precision.

    `__call__(hidden [M, H] pre-norm, targets [M], weights [M], soft [M, Vd] | None)` →
    loss_rows `[M]` fp32. Rows are normed, cast with the LM head weight to `dtype` (bf16 in
    mixed precision: the op requires both in one dtype), and go through
    `vsd_ext.weighted_linear_cross_entropy`, which never forms the `[M, Vd]` logits.
    """

    def __init__(self, drafter, dtype: torch.dtype):
        self.drafter, self.dtype = drafter, dtype

    def rows(self, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """The LM head's input rows in the run's dtype; dividing them by `temperature`
        divides the drafter's logits by it (the head has no bias)."""
        rows = head_inputs(self.drafter, hidden)
        return (rows if temperature == 1.0 else rows / temperature).to(self.dtype)

    def __call__(self, hidden, targets, weights, soft=None, soft_temperature: float = 1.0,
                 temperature: float = 1.0):
        """Weighted CE of q = softmax(logits / temperature) against hard `targets` or the
        soft targets softmax(soft / soft_temperature)."""
        if hidden.shape[0] == 0:
            return hidden.new_zeros(0, dtype=torch.float32)
        weight = self.drafter.lm_head.weight.to(self.dtype)
        loss, _ = weighted_linear_cross_entropy(
            self.rows(hidden, temperature), weight, targets, weights.float(),
            soft_targets=soft, soft_temperature=soft_temperature)
        return loss

    def divergence(self, hidden, teacher, tv_weights, kl_weights, temperature: float = 1.0):
        """(loss_rows, beta, kl) `[M]`: tv_weights · (1 − β) + kl_weights · KL(q ‖ p) with
        q = softmax(logits / T), p = softmax(teacher / T), β = Σ_v min(p_v, q_v)."""
        if hidden.shape[0] == 0:
            empty = hidden.new_zeros(0, dtype=torch.float32)
            return empty, empty, empty
        weight = self.drafter.lm_head.weight.to(self.dtype)
        return weighted_linear_divergence(self.rows(hidden, temperature), weight, teacher,
                                          tv_weights.float(), kl_weights.float(),
                                          soft_temperature=temperature)


def connect_all(module: nn.Module) -> torch.Tensor:
    """0 · Σ params: added to every loss so each parameter is in the graph even when a
    micro-batch has no target rows (DDP then never waits for a missing gradient)."""
    return sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0


class TrainStep(nn.Module):
    """forward(input_ids, loss_mask, seed, want_metrics) → (loss, metrics) for one
    micro-batch. `seed` keys the objective's randomness (VSD's anchors, samples, uniforms),
    so it does not depend on the process layout or on resuming."""

    def __init__(self, drafter, target, config):
        super().__init__()
        self.drafter = drafter
        self.__dict__["target"] = target  # frozen, outside the module tree (not synced)
        self.config = config
        self.vocab = DraftVocab(drafter)
        self._loss = OBJECTIVES[config.method]
        mixed = config.precision == "bf16" or (config.precision == "auto"
                                               and target.device.type == "cuda")
        self.compute_dtype = torch.bfloat16 if mixed else torch.float32

    def autocast(self):
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.target.device.type, dtype=self.compute_dtype)

    def forward(self, input_ids, loss_mask, seed: int, want_metrics: bool = False):
        batch = target_pass(self.target, input_ids, loss_mask,
                            with_cache=self.config.method == "vsd")
        gen = torch.Generator(device=input_ids.device).manual_seed(seed)
        head = LossHead(self.drafter, self.compute_dtype)
        with self.autocast():
            loss, metrics = self._loss(self, batch, head, gen, want_metrics)
        return loss + connect_all(self.drafter), metrics
