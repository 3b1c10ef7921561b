"""Per-node weights of the VSD M-step (docs/design/METHOD.md): reach, future value, the
expected length of a chain, the greedy path's row weights — against brute force, and the
reach counted once."""
import itertools

import torch

from vsd_ext.training.weights import (
    expected_lengths,
    future_values,
    greedy_row_weights,
    path_length,
    reach_weights,
)


def brute_force(alphas: list[float]):
    """Enumerate every accept/reject outcome of a chain: (P(node k reached), E[accepted],
    E[accepted after z_{k+1} | z_{k+1} accepted])."""
    K = len(alphas)
    reach, length = [0.0] * K, 0.0
    after = [0.0] * K
    for outcome in itertools.product([0, 1], repeat=K):
        prob = 1.0
        for a, o in zip(alphas, outcome):
            prob *= a if o else 1 - a
        n = next((i for i, o in enumerate(outcome) if not o), K)  # accepted prefix
        length += prob * n
        for k in range(K):
            reach[k] += prob * (k <= n)
    for k in range(K):
        tail = alphas[k + 1:]
        after[k] = sum(torch.tensor(tail[:j + 1]).prod().item() for j in range(len(tail)))
    return reach, length, after


def test_weights_equal_brute_force_enumeration():
    gen = torch.Generator().manual_seed(0)
    alphas = torch.rand(6, 4, generator=gen, dtype=torch.float64)
    alphas[0] = 1.0
    alphas[1, 2] = 0.0
    for row in alphas:
        reach, length, after = brute_force(row.tolist())
        assert torch.allclose(reach_weights(row), torch.tensor(reach, dtype=torch.float64))
        assert abs(float(path_length(row)) - length) < 1e-12
        assert torch.allclose(future_values(row), torch.tensor(after, dtype=torch.float64))
    assert expected_lengths(alphas).shape == (6, 5)
    assert bool((expected_lengths(alphas)[:, -1] == 0).all())


def test_reach_is_counted_once():
    """Sampling outcomes and keeping the reached nodes unweighted ("realized") has the same
    expected row weight as weighting every node by r ("expected"): r, not r²."""
    alphas = torch.tensor([0.9, 0.5, 0.7, 0.3], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    u = torch.rand(200_000, 4, generator=gen, dtype=torch.float64)
    accepted = torch.cumprod((u < alphas).long(), 1).sum(1)                  # n per draw
    realized = (torch.arange(4)[None] <= accepted[:, None]).double().mean(0)  # reached
    assert torch.allclose(realized, reach_weights(alphas), atol=3e-3)
    assert not torch.allclose(realized, reach_weights(alphas) ** 2, atol=3e-2)


def test_greedy_row_weights():
    num = torch.tensor([0, 2, 3])
    w = greedy_row_weights(num, 3, future_value=True, fail_value=1.5)
    assert w.tolist() == [[2.5, 0, 0, 0], [2.0, 1.0, 2.5, 0], [3.0, 2.0, 1.0, 2.5]]
    plain = greedy_row_weights(num, 3, future_value=False, fail_value=1.5)
    assert plain.tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
