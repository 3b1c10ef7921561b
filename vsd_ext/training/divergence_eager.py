"""Placeholder until the fused `vsd_ext.weighted_linear_divergence` op lands: the same
contract computed with materialized logits."""
from __future__ import annotations

import torch


def weighted_linear_divergence(hidden, weight, teacher, tv_weights, kl_weights,
                               soft_temperature: float = 1.0):
    logq = torch.log_softmax((hidden @ weight.t()).float(), -1)
    logp = torch.log_softmax(teacher.float() / soft_temperature, -1)
    q = logq.exp()
    beta = torch.minimum(q, logp.exp()).sum(-1)
    kl = (q * (logq - logp)).sum(-1)
    loss = tv_weights * (1.0 - beta) + kl_weights * kl
    return loss, beta.detach(), kl.detach()
