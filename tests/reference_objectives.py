"""Slow specifications of the training objectives (the oracle of tests/test_training.py).

Everything here is loops over sequences, columns, anchors and paths, using only the models'
decoding-time API: `Drafter.prefill` of the pairs before a root and `Drafter.tree_step` down
a chain (exactly what a draft tree does at inference time), materialized logits, and
float64 cross-entropies. No code shared with `vsd_ext.training`: the weights are computed by
explicit loops here.
"""
from __future__ import annotations

import math

import torch


def chain_outputs(drafter, input_ids, features, column: int, chain: list[int]):
    """Drafter outputs at the root pair `column` (token x_{c+1}, feature f_c) and down the
    chain of target ids `chain`: list of (hidden `[H]`, logits `[Vd]`), root first."""
    cache = drafter.new_cache(1, column + len(chain) + 3)
    out = drafter.prefill(input_ids[None, 1:column + 2], features[None, :column + 1], cache)
    results = [(out.hidden[0, -1], out.logits[0, -1])]
    hidden, past, parents = out.hidden[:, -1:], None, []
    for i, token in enumerate(chain):
        parents.append(i - 1)
        step = drafter.tree_step(torch.tensor([[token]], device=input_ids.device), hidden,
                                 torch.tensor([parents], device=input_ids.device), cache,
                                 past=past)
        past, hidden = step.tree_kv, step.hidden
        results.append((step.hidden[0, 0], step.logits[0, 0]))
    return results


def _draft_ids(drafter):
    return drafter.to_target_ids(torch.arange(drafter.draft_vocab_size, device=drafter.d2t.device))


def _soft_ce(logits, teacher, temperature=1.0):
    p = torch.softmax(teacher.double() / temperature, -1)
    return -(p * torch.log_softmax(logits.double(), -1)).sum()


def _valid(mask_row, T, column, step):
    return column + 2 + step <= T - 1 and bool(mask_row[column + 2 + step])


def eagle3_loss(drafter, target, input_ids, loss_mask, steps: int, decay: float = 0.8,
                soft_temperature: float = 1.0):
    """Σ_j decay^j · mean over valid columns of the soft CE at step j (float64)."""
    B, T = input_ids.shape
    ids = _draft_ids(drafter)
    counts = [sum(_valid(loss_mask[b], T, c, j) for b in range(B) for c in range(T - 1))
              for j in range(steps)]
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        out = target.run(input_ids[b:b + 1])
        for c in range(T - 1):
            depth = [j for j in range(steps) if _valid(loss_mask[b], T, c, j)]
            if not depth:
                continue
            chain = input_ids[b, c + 2:c + 2 + max(depth)].tolist()
            results = chain_outputs(drafter, input_ids[b], out.features[0], c, chain)
            for j in depth:
                teacher = out.logits[0, c + 1 + j][ids]
                total = total + decay ** j / counts[j] * _soft_ce(results[j][1], teacher,
                                                                   soft_temperature)
    return total


def auf_loss(drafter, target, input_ids, loss_mask, steps: int):
    """Hard CE on the ground truth up to and including the first greedy mismatch, averaged
    over the kept (column, step) pairs (float64)."""
    B, T = input_ids.shape
    to_draft = {int(t): d for d, t in enumerate(_draft_ids(drafter).tolist())}
    terms = []
    for b in range(B):
        out = target.run(input_ids[b:b + 1])
        for c in range(T - 1):
            chain = input_ids[b, c + 2:c + 1 + steps].tolist()
            results = None
            for j in range(steps):
                truth = int(input_ids[b, c + 2 + j]) if c + 2 + j <= T - 1 else -1
                if not _valid(loss_mask[b], T, c, j) or truth not in to_draft:
                    break
                if results is None:
                    results = chain_outputs(drafter, input_ids[b], out.features[0], c, chain)
                logits = results[j][1].double()
                terms.append(-torch.log_softmax(logits, -1)[to_draft[truth]])
                if int(logits.argmax()) != to_draft[truth]:
                    break
    return torch.stack(terms).sum() / len(terms)


def vsd_alphas(drafter, target, input_ids, features, anchor: int, z_target: list[int],
               temperature: float):
    """(q rows `[K, Vd]` the draft distributions z_1..z_K were drawn from, α `[K]`) of one
    path below anchor a, from explicit sequences: the drafter's chain and the target's full
    forward over x_0..x_a, z_1..z_{i−1}."""
    ids = _draft_ids(drafter)
    results = chain_outputs(drafter, input_ids, features, anchor - 1, z_target[:-1])
    qs, alphas = [], []
    for i, token in enumerate(z_target):
        q = torch.softmax(results[i][1].detach().double() / temperature, -1)
        seq = torch.cat((input_ids[:anchor + 1], torch.tensor(z_target[:i], dtype=torch.int64,
                                                              device=input_ids.device)))
        p = torch.softmax(target.run(seq[None]).logits[0, -1].double() / temperature, -1)
        d = int((ids == token).nonzero()[0, 0])
        qs.append(q)
        alphas.append(min(1.0, float(p[token] / q[d])))
    return torch.stack(qs), torch.tensor(alphas, dtype=torch.float64)


def _target_next(target, prefix: list[int], temperature: float) -> torch.Tensor:
    """The target's next-token logits after the token list `prefix` (float64)."""
    seq = torch.tensor([prefix], dtype=torch.int64)
    return target.run(seq).logits[0, -1].double() / temperature


def _chain_values(alphas: list[float]) -> tuple[list[float], list[float]]:
    """(reach r_k, future value Ŵ_k) of nodes k = 0..K−1 of one chain, by explicit loops."""
    K = len(alphas)
    reach = [math.prod(alphas[:k]) for k in range(K)]
    future = [sum(math.prod(alphas[k + 1:j + 1]) for j in range(k + 1, K)) for k in range(K)]
    return reach, future


def vsd_sampled_tree_loss(drafter, target, input_ids, anchors, ok, z, num, cfg):
    """The T > 0 tree terms of docs/design/METHOD.md by loops over anchors, chains and
    nodes, from explicit sequences (float64). anchors/ok `[B, C]`, z `[B, C, S, K]` draft
    ids (the E-step's samples), num `[B, C, S]` accepted counts (used by reach="realized")."""
    ids = _draft_ids(drafter)
    T = cfg.temperature
    B, C, S, K = z.shape
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        features = target.run(input_ids[b:b + 1]).features[0]
        for c in range(C):
            if not bool(ok[b, c]):
                continue
            a = int(anchors[b, c])
            context = input_ids[b, :a + 1].tolist()
            chains = []
            for s in range(S):
                zt = ids[z[b, c, s]].tolist()
                outs = chain_outputs(drafter, input_ids[b], features, a - 1, zt[:-1])
                logq = [torch.log_softmax(o[1].double() / T, -1) for o in outs]
                full = [torch.log_softmax(_target_next(target, context + zt[:k], T), -1)
                        for k in range(K)]
                # β and KL use the target renormalized on the draft vocabulary; α (reach,
                # future value) is the true acceptance probability, with the full p.
                logp = [torch.log_softmax(f[ids], -1) for f in full]
                alphas = [min(1.0, float(full[k][zt[k]].exp() / logq[k][z[b, c, s, k]].exp()))
                          for k in range(K)]
                chains.append((logq, logp, alphas))
            values = []
            for s, (logq, logp, alphas) in enumerate(chains):
                reach, future = _chain_values(alphas)
                if cfg.reach == "realized":
                    reach = [float(k <= int(num[b, c, s])) for k in range(K)]
                value = [1.0 + f if cfg.future_value else 1.0 for f in future]
                values.append(value)
                for k in range(1, K):  # the nodes below the root
                    q, p = logq[k].exp(), logp[k].exp()
                    beta = torch.minimum(q, p).sum()
                    kl = (q * (logq[k] - logp[k])).sum()
                    total = total + cfg.lambda_accept * reach[k] * value[k] * (1 - beta)
                    total = total + cfg.lambda_kl * reach[k] * kl
            base = sum(v[0] for v in values) / S
            logq0, logp0 = chains[0][0][0], chains[0][1][0]
            q0, p0 = logq0.exp(), logp0.exp()
            total = total + cfg.lambda_accept * base * (1 - torch.minimum(q0, p0).sum())
            total = total + cfg.lambda_kl * (q0 * (logq0 - logp0)).sum()
            if cfg.baseline == "mean":  # the score-function term at the root
                for s in range(S):
                    z1 = int(z[b, c, s, 0])
                    if float(q0[z1]) < float(p0[z1]):
                        total = total - (values[s][0] - base) / S * logq0[z1]
    return total / max(int(ok.sum()), 1)


def greedy_continuation(target, prefix: list[int], n: int) -> list[int]:
    """The target's greedy continuation of `prefix`, n tokens, one full forward per token."""
    out = list(prefix)
    for _ in range(n):
        out.append(int(_target_next(target, out, 1.0).argmax()))
    return out[len(prefix):]


def vsd_greedy_tree_loss(drafter, target, input_ids, anchors, ok, num, emitted, cfg):
    """The T = 0 tree terms given the E-step's greedy paths (num `[B, C]`, emitted
    `[B, C, N]`): Σ_k (1 + Ŵ_k) CE(y_{k+1}) along each path, from explicit sequences."""
    to_draft = {int(t): d for d, t in enumerate(_draft_ids(drafter).tolist())}
    B, C = anchors.shape
    mean_n = float(num[ok].double().mean())
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        features = target.run(input_ids[b:b + 1]).features[0]
        for c in range(C):
            if not bool(ok[b, c]):
                continue
            n = int(num[b, c])
            y = emitted[b, c, :n + 1].tolist()
            outs = chain_outputs(drafter, input_ids[b], features, int(anchors[b, c]) - 1, y[:n])
            for k in range(n + 1):
                if y[k] not in to_draft:
                    continue
                future = (n - k - 1) if k < n else mean_n
                weight = 1.0 + future if cfg.future_value else 1.0
                total = total - weight * torch.log_softmax(outs[k][1].double(), -1)[
                    to_draft[y[k]]]
    return total / max(int(ok.sum()), 1)
