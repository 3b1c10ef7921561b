"""VSD starting from a trained EAGLE-3 drafter, as it is used: its paths get tokens accepted,
so the weights (acceptance α, reach, future value, the baseline) vary and the greedy paths
run deep — with a near-random drafter almost nothing is accepted and every weight is the
same. Checked: both tree losses against the slow references, the fine-tune against the
drafter it starts from (held-out KL and τ), bf16 against fp32 values."""
import pytest
import torch
from test_training import check_greedy_loss, check_sampled_loss, vsd_setup

import vsd_ext
from vsd_ext.training import vsd_sampled
from vsd_ext.training.config import TrainConfig
from vsd_ext.training.data import DataSplits
from vsd_ext.training.evaluate import decode_tau, heldout_kl
from vsd_ext.training.objective import LossHead, TrainStep

from helpers import random_dataset, write_tiny_target

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN, HELD = torch.arange(32), torch.arange(32, 48)
SETTINGS = dict(seq_len=20, batch_size=8, warmup_steps=2, schedule="constant", seed=3,
                eval_prompts=8, eval_new_tokens=16, heldout_sequences=16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run directory, target, data, EAGLE-3 drafter trained for 80 steps on the target's own
    samples: it accepts about half a token of a depth-3 path at T = 1)."""
    root = tmp_path_factory.mktemp("vsd_trained")
    target = write_tiny_target(root / "target")
    data = random_dataset(target, rows=48, seq_len=20, seed=1)
    prompts = [row[:4] for row in data.input_ids[HELD].tolist()]
    DataSplits(data.rows(TRAIN), data.rows(HELD), prompts, "test").save(root / "data.pt")
    cfg = TrainConfig(method="eagle3", max_steps=80, lr=1e-2, data=str(root / "data.pt"),
                      **SETTINGS).validate()
    cfg.eagle3.steps = 3
    drafter = vsd_ext.train_drafter(target, root / "eagle3", cfg, progress=False)
    return root, target, data, drafter


def sampled_setup(trained, seed, **settings):
    return vsd_setup(trained, seed, [3, 4], drafter=trained[3],
                     **{"anchors": 4, "paths": 4, "depth": 3, "temperature": 1.0, **settings})


def test_paths_get_accepted_so_the_weights_vary(trained):
    """The premise of this module: the tree terms have something to weigh."""
    step, batch, h0, kv, anchors, ok = sampled_setup(trained, 0)
    gen = torch.Generator().manual_seed(0)
    z, q, _ = vsd_sampled.sample_paths(step, h0, kv, anchors, step.config.vsd, gen)
    scored = [vsd_sampled.score_and_verify(step, batch, b, anchors[b], z[b], q[b], 1.0, gen)
              for b in range(2)]
    alphas, num, _ = (torch.stack(t) for t in zip(*scored))
    assert float(num[ok].float().mean()) > 0.25, num
    beta_w, _, _ = vsd_sampled.node_weights(alphas, num, ok, step.config.vsd)
    assert float(beta_w[ok][..., 1:].std()) > 0.1, beta_w


@pytest.mark.parametrize("reach,future_value,baseline", [
    ("expected", True, "mean"), ("realized", True, "mean"), ("expected", False, "none")])
def test_sampled_loss_matches_reference(trained, seed, reach, future_value, baseline):
    num = check_sampled_loss(sampled_setup(trained, seed, reach=reach, baseline=baseline,
                                           future_value=future_value, lambda_kl=0.3), seed)
    assert int(num.max()) >= 1  # some path accepted a token: the weights are not all equal


def test_greedy_loss_matches_reference(trained, seed):
    num = check_greedy_loss(vsd_setup(trained, seed, [5, 6], drafter=trained[3], anchors=4,
                                      temperature=0.0, depth=3, tree_topk=3, tree_nodes=8))
    assert int(num.max()) >= 2  # the greedy path runs below the first level


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_vsd_finetune_keeps_the_eagle3_drafter_it_starts_from(trained, temperature):
    """A short VSD fine-tune (a fine-tuning learning rate) must not leave the drafter worse
    than the EAGLE-3 drafter it started from: held-out KL(p‖q) no more than 1% higher, τ at
    the fine-tune's temperature within 5%."""
    root, target, data, drafter = trained
    cfg = TrainConfig(method="vsd", max_steps=8, lr=2e-3, data=str(root / "data.pt"),
                      **SETTINGS).validate()
    cfg.vsd.anchors, cfg.vsd.paths, cfg.vsd.depth = 4, 4, 3
    cfg.vsd.temperature = temperature
    tuned = vsd_ext.train_drafter(target, root / f"vsd_t{temperature:g}", cfg,
                                  init=root / "eagle3", progress=False)
    held = data.rows(HELD)
    prompts = data.input_ids[HELD, :4].tolist()
    kl = {name: heldout_kl(TrainStep(d, target, cfg), held)
          for name, d in (("eagle3", drafter), ("vsd", tuned))}
    tau = {name: decode_tau(target, d, prompts, temperature, 16, seed=0)["tau"]
           for name, d in (("eagle3", drafter), ("vsd", tuned))}
    assert kl["vsd"] <= kl["eagle3"] * 1.01, (kl, tau)
    assert tau["vsd"] >= 0.95 * tau["eagle3"], (kl, tau)


def test_bf16_vsd_loss_is_close_to_fp32(trained):
    """bf16 against fp32, on the same sampled paths: the tree loss (acceptance mass, KL and
    the score term through the fused op with bf16 rows and head) agrees to 1%; whole steps
    under the same seeds agree to 3% in the mean (the E-step samples from q, which bf16
    perturbs)."""
    step, batch, h0, kv, anchors, ok = sampled_setup(trained, 0, lambda_kl=0.3)
    values = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):  # the head casts its rows to dtype
            loss, _ = vsd_sampled.sampled_tree_loss(step, batch, LossHead(step.drafter, dtype),
                                                    h0, kv, anchors, ok,
                                                    torch.Generator().manual_seed(1))
            values[dtype] = float(loss)
    assert values[torch.bfloat16] == pytest.approx(values[torch.float32], rel=0.01), values
    _, target, data, drafter = trained
    ids, mask = data.input_ids[TRAIN[:4]], data.loss_mask[TRAIN[:4]]
    means = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(method="vsd", seq_len=20, precision=precision).validate()
        cfg.vsd.anchors, cfg.vsd.paths, cfg.vsd.depth = 4, 4, 3
        with torch.no_grad():
            means[precision] = sum(float(TrainStep(drafter, target, cfg)(ids, mask, s)[0])
                                   for s in range(6)) / 6
    assert means["bf16"] == pytest.approx(means["fp32"], rel=0.03), means
