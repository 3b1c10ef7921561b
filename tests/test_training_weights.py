"""ARW / CAR weights (docs/design/METHOD.md): ESS bound, uniform reduction, reach
probabilities, confidence."""
import math

import pytest
import torch

from vsd_ext.training.weights import (
    arw_path_weights,
    arw_position_weights,
    car_confidence,
    effective_sample_size,
    normalize_mean_one,
    path_utility,
)


def test_expected_utility_is_the_expected_accepted_length():
    alphas = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.0, 1.0, 1.0]])
    assert torch.allclose(path_utility(alphas), torch.tensor([3.0, 0.875, 0.0]))
    realized = path_utility(alphas, "realized", accepted=torch.tensor([3, 1, 0]))
    assert torch.equal(realized, torch.tensor([4.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="accepted"):
        path_utility(alphas, "realized")
    with pytest.raises(ValueError, match="kind"):
        path_utility(alphas, "best")


@pytest.mark.parametrize("rho", [0.25, 0.5, 0.9])
def test_arw_weights_meet_the_ess_bound_and_are_sharpest_such(gen, rho):
    c, s = 64, 16
    utility = torch.rand(c, s, generator=gen, dtype=torch.float64) * 7
    utility[:8] = 0.0
    utility[8:16, 1:] = 1e-9          # one path dominates: needs a high temperature
    w = arw_path_weights(utility, rho=rho)
    assert torch.allclose(w.sum(-1), torch.full((c,), float(s), dtype=w.dtype))
    ess = effective_sample_size(w)
    assert bool((ess >= rho * s * (1 - 1e-6)).all())
    # Higher utility never gets a lower weight.
    order = utility.argsort(-1)
    assert bool((w.gather(-1, order).diff(dim=-1) >= -1e-12).all())
    # Sharpest: where the bound is active (T > 1), the ESS sits on the bound.
    plain = s * utility.clamp_min(1e-6) / utility.clamp_min(1e-6).sum(-1, keepdim=True)
    active = effective_sample_size(plain) < rho * s
    assert bool(active.any())
    assert torch.allclose(ess[active], torch.full_like(ess[active], rho * s), rtol=1e-4)
    # Where proportional-to-utility weights already satisfy it, they are used as they are.
    assert torch.allclose(w[~active], plain[~active], rtol=1e-9)


def test_arw_weights_reduce_to_uniform_for_equal_utilities():
    w = arw_path_weights(torch.full((3, 5), 2.5))
    assert torch.allclose(w, torch.ones(3, 5))


def test_arw_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rho"):
        arw_path_weights(torch.ones(2, 3), rho=0.0)
    with pytest.raises(ValueError, match="non-negative"):
        arw_path_weights(-torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\[C, S\]"):
        arw_path_weights(torch.ones(3))


def test_position_weights_are_clamped_reach_probabilities():
    alphas = torch.tensor([[0.5, 0.5, 0.01, 1.0]])
    r = arw_position_weights(alphas, r_min=0.05)
    assert torch.allclose(r, torch.tensor([[1.0, 0.5, 0.25, 0.05]]))


def test_normalize_mean_one_ignores_masked_tokens():
    w = torch.tensor([1.0, 3.0, 100.0])
    out = normalize_mean_one(w, torch.tensor([True, True, False]))
    assert torch.allclose(out, torch.tensor([0.5, 1.5, 0.0]))
    assert torch.equal(normalize_mean_one(w, torch.zeros(3, dtype=torch.bool)), torch.zeros(3))


def test_car_confidence():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    c = car_confidence(logits)
    assert c[0] > 0.99 and math.isclose(float(c[1]), 0.25, rel_tol=1e-6)
    e = car_confidence(logits, kind="neg_entropy")
    assert e[0] > 0.99 and abs(float(e[1])) < 1e-6
    assert torch.allclose(car_confidence(logits, beta=2.0), c.square())
