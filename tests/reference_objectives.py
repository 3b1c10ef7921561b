"""Slow specifications of the training objectives (the oracle of tests/test_training.py).

Everything here is loops over sequences, columns, anchors and paths, using only the models'
decoding-time API: `Drafter.prefill` of the pairs before a root and `Drafter.tree_step` down
a chain (exactly what a draft tree does at inference time), materialized logits, and
float64 cross-entropies. No shared code with `vsd_ext.training` besides the ARW/CAR weight
functions of `vsd_ext.training.weights` (tested on their own, tests/test_training_weights.py).
They live with the tests, not in `vsd_ext.reference`, because they depend on that code.
"""
from __future__ import annotations

import torch

from vsd_ext.training.weights import arw_path_weights, car_confidence


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


def vsd_loss(drafter, target, input_ids, loss_mask, records, cfg):
    """ARW + λ_CAR·CAR of docs/design/METHOD.md given the E-step records (`training.vsd.PathRecord`:
    anchors, ok, z, alphas, num_accepted, emitted), by loops (λ_tok = 0)."""
    ids = _draft_ids(drafter)
    to_draft = {int(t): d for d, t in enumerate(ids.tolist())}
    B, T = input_ids.shape
    rows = []  # (weight, ce)
    for rec in records:
        out = target.run(input_ids[rec.b:rec.b + 1])
        C, S, K = rec.z.shape
        for ci in range(C):
            if not bool(rec.ok[ci]):
                continue
            alphas = rec.alphas[ci].double()
            utility = torch.zeros(S, dtype=torch.float64)
            for s in range(S):
                prod = 1.0
                for k in range(K):
                    prod *= float(alphas[s, k])
                    utility[s] += prod if cfg.utility == "expected" else 0.0
                if cfg.utility == "realized":
                    utility[s] = float(rec.num_accepted[ci, s]) + 1.0
            w = arw_path_weights(utility[None], cfg.rho, cfg.min_temperature)[0]
            a = int(rec.anchors[ci])
            for s in range(S):
                n = int(rec.num_accepted[ci, s])
                emitted = rec.emitted[ci, s, :n + 1].tolist()
                if cfg.arw_positions == "all":  # every node of the sampled path
                    n = K
                    emitted = ids[rec.z[ci, s]].tolist()
                results = chain_outputs(drafter, input_ids[rec.b], out.features[0], a - 1,
                                        emitted[:n])
                reach = 1.0
                for i in range(n + 1):
                    r = max(cfg.r_min, reach)
                    reach *= float(alphas[s, i]) if i < K else 1.0
                    if cfg.arw_target == "soft":  # the target's distribution at the node
                        seq = torch.tensor(input_ids[rec.b, :a + 1].tolist() + emitted[:i])
                        teacher = target.run(seq[None]).logits[0, -1][ids]
                        rows.append((float(w[s]) * r, _soft_ce(results[i][1], teacher)))
                        continue
                    if emitted[i] not in to_draft:
                        continue
                    ce = -torch.log_softmax(results[i][1].double(), -1)[to_draft[emitted[i]]]
                    rows.append((float(w[s]) * r, ce))
    weights = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    arw = sum(wt * ce for wt, (_, ce) in zip(weights / weights.sum(), rows))
    car_num, car_den = torch.zeros((), dtype=torch.float64), 0.0
    for b in range(B):
        out = target.run(input_ids[b:b + 1])
        logits = drafter(input_ids[b:b + 1, 1:], out.features[:, :-1]).logits[0]
        for c in range(T - 1):
            if not _valid(loss_mask[b], T, c, 0):
                continue
            teacher = out.logits[0, c + 1]
            conf = float(car_confidence(teacher[None], cfg.car_beta, cfg.confidence)[0])
            car_num = car_num + conf * _soft_ce(logits[c], teacher[ids])
            car_den += conf
    return arw + cfg.lambda_car * car_num / car_den
