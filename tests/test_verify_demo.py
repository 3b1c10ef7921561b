"""The verification demo's lossless check must accept the target distribution and reject others."""
import torch

from vsd_ext.app import verify_demo


def test_chi_square_p_value_separates_right_from_wrong(gen):
    probs = torch.softmax(torch.randn(50, generator=gen, dtype=torch.float64), -1)
    right = torch.bincount(torch.multinomial(probs, 20000, True, generator=gen), minlength=50)
    wrong_probs = torch.softmax(probs.log() + 0.3 * torch.randn(50, generator=gen,
                                                                 dtype=torch.float64), -1)
    wrong = torch.bincount(torch.multinomial(wrong_probs, 20000, True, generator=gen), minlength=50)
    assert verify_demo.chi_square_p_value(right, probs) > 1e-4
    assert verify_demo.chi_square_p_value(wrong, probs) < 1e-6
    impossible = right.clone()
    impossible[probs.argmin()] += 1
    probs_with_zero = probs.clone()
    probs_with_zero[probs.argmin()] = 0
    assert verify_demo.chi_square_p_value(impossible, probs_with_zero / probs_with_zero.sum()) == 0


def test_demo_runs_and_is_lossless():
    rows = verify_demo.run(trials=4000, vocab=64, seed=3, print_fn=lambda *_: None)
    assert [r["mode"] for r in rows] == ["greedy", "target_only", "sampled"]
    assert all(r["matches_reference"] and r["lossless"] for r in rows)
    assert all(1.0 <= r["tau"] <= 5.0 for r in rows)
