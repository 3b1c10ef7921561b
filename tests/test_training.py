"""Training objectives against slow references, gradient flow, training progress, resume,
bad configurations (vsd_ext.training)."""
import json

import pytest
import torch

import vsd_ext
from vsd_ext.decoding import DrafterProposer, TreeConfig
from vsd_ext.models import Drafter, load_target, token_counts
from vsd_ext.training import vsd as vsd_mod
from vsd_ext.training import vsd_greedy, vsd_sampled
from vsd_ext.training.checkpoints import CheckpointStore, read_state
from vsd_ext.training.config import TrainConfig, VSDConfig
from vsd_ext.training.data import DataSplits
from vsd_ext.training.drafting import causal_pass
from vsd_ext.training.evaluate import decode_tau, heldout_kl
from vsd_ext.training.objective import LossHead, TrainStep, target_pass
from vsd_ext.training.trainer import Trainer

import reference_objectives as ref
from helpers import random_dataset, write_tiny_target


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_target")
    target = write_tiny_target(directory)
    data = random_dataset(target, rows=40, seq_len=20, seed=1)
    return directory, target, data


def make_drafter(target, data, seed, draft_vocab=48):
    counts = token_counts(data.input_ids, target.vocab_size)
    drafter = Drafter.for_target(target, draft_vocab, counts, seed=seed).float()
    with torch.no_grad():  # a drafter that is not the initial one: O(1) logits, varied
        for p in drafter.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return drafter.attach(target)


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def check_against(step, reference_loss, fast_loss, rtol=1e-4):
    drafter = step.drafter
    drafter.zero_grad()
    fast_loss.backward()
    fast = grads(drafter)
    drafter.zero_grad()
    reference_loss.backward()
    slow = grads(drafter)
    assert torch.allclose(fast_loss.double(), reference_loss, rtol=rtol), (fast_loss,
                                                                         reference_loss)
    for name in fast:
        scale = slow[name].abs().max().clamp_min(1e-6)
        assert (fast[name] - slow[name]).abs().max() / scale < 1e-3, name


def batch_of(data, rows, mask_prefix=0):
    ids, mask = data.input_ids[rows].clone(), data.loss_mask[rows].clone()
    mask[:, :mask_prefix] = False
    ids[1, -3:] = -1  # a ragged (right-padded) row
    mask[1, -3:] = False
    return ids, mask


@pytest.mark.parametrize("method", ["eagle3", "auf"])
def test_unrolled_objectives_match_reference(tiny, seed, method):
    _, target, data = tiny
    cfg = TrainConfig(method=method, seq_len=20).validate()
    cfg.eagle3.steps = cfg.auf.steps = 3
    cfg.eagle3.soft_temperature = 1.5
    drafter = make_drafter(target, data, seed)
    step = TrainStep(drafter, target, cfg)
    ids, mask = batch_of(data, [0, 1, 2], mask_prefix=5)
    loss, metrics = step(ids, mask, seed, want_metrics=True)
    assert 1.0 <= metrics["tau_est"] <= 4.0
    if method == "eagle3":
        slow = ref.eagle3_loss(drafter, target, ids, mask, 3, 0.8, 1.5)
    else:
        slow = ref.auf_loss(drafter, target, ids, mask, 3)
    check_against(step, slow, loss)


def vsd_setup(tiny, seed, rows, drafter=None, **settings):
    """(step, batch, h0, kv, anchors, ok) of a VSD step on rows `rows` (two) of the tiny
    data; `drafter`: a given drafter, else a random one; settings: VSDConfig fields."""
    _, target, data = tiny[:3]
    cfg = TrainConfig(method="vsd", seq_len=20).validate()
    for name, value in settings.items():
        setattr(cfg.vsd, name, value)
    cfg.validate()
    drafter = drafter if drafter is not None else make_drafter(target, data, seed)
    step = TrainStep(drafter, target, cfg)
    ids, mask = batch_of(data, rows, mask_prefix=3)
    batch = target_pass(target, ids, mask, with_cache=True)
    h0, kv = causal_pass(drafter, ids[:, 1:], batch.features[:, :-1])
    picks = [vsd_mod.sample_anchors(ids[b], mask[b], cfg.vsd.anchors,
                                    torch.Generator().manual_seed(seed + b)) for b in range(2)]
    anchors = torch.stack([a for a, _ in picks])
    ok = torch.stack([o for _, o in picks])
    return step, batch, h0, kv, anchors, ok


def test_vsd_sampled_e_step_matches_explicit_sequences(tiny, seed):
    """q, α and the soft targets at the run's temperature (T = 1.3 here), from explicit
    sequences; accepted counts within the chain."""
    step, batch, h0, kv, anchors, ok = vsd_setup(tiny, seed, [3, 4], anchors=2, paths=3,
                                                  depth=3, temperature=1.3)
    drafter, target = step.drafter, step.target
    gen = torch.Generator().manual_seed(seed)
    z, q, _ = vsd_sampled.sample_paths(step, h0, kv, anchors, step.config.vsd, gen)
    ids_d = drafter.to_target_ids(torch.arange(drafter.draft_vocab_size))
    for b in range(2):
        alphas, num, teacher = vsd_sampled.score_and_verify(step, batch, b, anchors[b], z[b],
                                                            q[b], 1.3, gen)
        for c in range(2):
            for s in range(3):
                path = ids_d[z[b, c, s]].tolist()
                q_ref, a_ref = ref.vsd_alphas(drafter, target, batch.input_ids[b],
                                              batch.features[b], int(anchors[b, c]), path, 1.3)
                assert torch.allclose(q[b, c, s].double(), q_ref, atol=1e-5)
                assert torch.allclose(alphas[c, s].double(), a_ref, atol=1e-4)
                assert 0 <= int(num[c, s]) <= 3
                seq = batch.input_ids[b, :int(anchors[b, c]) + 1].tolist() + path[:1]
                logits = target.run(torch.tensor([seq])).logits[0, -1]
                p_ref = torch.softmax(logits[ids_d] / 1.3, -1)
                p_fast = torch.softmax(teacher[c, s, 1].double() / 1.3, -1)
                assert torch.allclose(p_fast, p_ref.double(), atol=1e-5)


@pytest.mark.parametrize("reach,future_value,baseline", [
    ("expected", True, "mean"), ("realized", True, "mean"), ("expected", False, "none")])
def test_vsd_sampled_tree_loss_matches_reference(tiny, seed, reach, future_value, baseline):
    check_sampled_loss(vsd_setup(
        tiny, seed, [5, 6], anchors=3, paths=3, depth=3, temperature=1.3, reach=reach,
        future_value=future_value, baseline=baseline, lambda_kl=0.3, lambda_accept=1.5), seed)


def check_sampled_loss(setup, seed):
    """The T > 0 tree loss of a `vsd_setup` against the slow reference (value, gradients)."""
    step, batch, h0, kv, anchors, ok = setup
    T = step.config.vsd.temperature
    head = LossHead(step.drafter, torch.float32)
    loss, metrics = vsd_sampled.sampled_tree_loss(step, batch, head, h0, kv, anchors, ok,
                                                  torch.Generator().manual_seed(seed))
    assert 1.0 <= metrics["tau_est"] <= 1.0 + step.config.vsd.depth
    gen = torch.Generator().manual_seed(seed)  # the same draws: samples, then verification
    z, q, _ = vsd_sampled.sample_paths(step, h0, kv, anchors, step.config.vsd, gen)
    num = torch.stack([vsd_sampled.score_and_verify(step, batch, b, anchors[b], z[b], q[b],
                                                    T, gen)[1] for b in range(2)])
    slow = ref.vsd_sampled_tree_loss(step.drafter, step.target, batch.input_ids, anchors, ok,
                                     z, num, step.config.vsd)
    check_against(step, slow, loss)
    return num


@pytest.mark.parametrize("ranking", [1.0, 0.25])
def test_vsd_greedy_tree_is_the_decoders_tree(tiny, seed, ranking):
    """The T = 0 E-step builds below each anchor exactly the tree `DrafterProposer` drafts
    when decoding the same context, with the same ranking temperature (at t_r ≠ 1 the
    cumulative scores of different levels only rank alike when every level uses it)."""
    step, batch, h0, kv, anchors, ok = vsd_setup(tiny, seed, [3, 4], anchors=2, temperature=0.0,
                                                  depth=3, tree_topk=2, tree_nodes=5,
                                                  ranking_temperature=ranking)
    tree = vsd_greedy.draft_trees(step, h0, kv, anchors, step.config.vsd)
    tokens, parents = tree.tokens.view(2, 2, -1), tree.parents.view(2, 2, -1)
    for b in range(2):
        for c in range(2):
            a = int(anchors[b, c])
            prompt = batch.input_ids[b:b + 1, :a]
            proposer = DrafterProposer(step.drafter,
                                       TreeConfig(3, 2, 5, ranking_temperature=ranking))
            features = step.target.run(prompt).features
            proposer.start(prompt, torch.tensor([a]), features, batch.input_ids[b, a:a + 1],
                           a + 16)
            draft = proposer.propose(batch.input_ids[b, a:a + 1])
            assert tokens[b, c, 1:].tolist() == draft.tokens[0, 1:].tolist()
            assert parents[b, c].tolist() == draft.parents[0].tolist()


def test_vsd_greedy_paths_and_loss_match_reference(tiny, seed):
    check_greedy_loss(vsd_setup(tiny, seed, [5, 6], anchors=3, temperature=0.0, depth=3,
                                tree_topk=3, tree_nodes=8))


def check_greedy_loss(setup):
    """The T = 0 greedy paths (against the target's own greedy continuation) and tree loss
    of a `vsd_setup` against the slow reference; returns the accepted counts [B, C]."""
    step, batch, h0, kv, anchors, ok = setup
    tree = vsd_greedy.draft_trees(step, h0, kv, anchors, step.config.vsd)
    num, emitted = vsd_greedy.greedy_paths(step, batch, anchors, tree)
    for b in range(2):
        for c in range(anchors.shape[1]):
            n, a = int(num[b, c]), int(anchors[b, c])
            y = ref.greedy_continuation(step.target, batch.input_ids[b, :a + 1].tolist(), n + 1)
            assert emitted[b, c, :n + 1].tolist() == y
    head = LossHead(step.drafter, torch.float32)
    loss, metrics = vsd_greedy.greedy_tree_loss(step, batch, head, h0, kv, anchors, ok, None)
    assert metrics["tau_est"] == pytest.approx(1.0 + float(num[ok].float().mean()))
    slow = ref.vsd_greedy_tree_loss(step.drafter, step.target, batch.input_ids, anchors, ok,
                                    num, emitted, step.config.vsd)
    check_against(step, slow, loss)
    return num


def test_vsd_unroll_is_the_tree_depth_unless_set():
    cfg = TrainConfig(method="vsd").validate()
    assert cfg.vsd.unroll_steps == cfg.vsd.depth == cfg.eagle3.steps == 5
    cfg.vsd.depth = 3
    assert cfg.vsd.unroll_steps == 3
    cfg.vsd.anchor_steps = 4
    assert cfg.vsd.unroll_steps == 4


def test_vsd_loss_is_anchor_plus_tree_terms(tiny, seed):
    for temperature in (0.0, 1.0):
        step, batch, h0, kv, anchors, ok = vsd_setup(tiny, seed, [5, 6], anchors=2, paths=2,
                                                      depth=2, temperature=temperature,
                                                      lambda_tok=0.7, lambda_tree=0.4)
        loss, metrics = step(batch.input_ids, batch.loss_mask, seed, True)
        assert metrics["loss"] == pytest.approx(0.7 * metrics["tok"] + 0.4 * metrics["tree"],
                                                rel=1e-5)
        again, _ = step(batch.input_ids, batch.loss_mask, seed, False)
        assert torch.equal(again, step(batch.input_ids, batch.loss_mask, seed, False)[0])


def test_gradients_reach_only_the_drafter(tiny, seed):
    _, target, data = tiny
    for method in ("eagle3", "auf", "vsd"):
        cfg = TrainConfig(method=method, seq_len=20).validate()
        cfg.eagle3.steps = cfg.auf.steps = 2
        cfg.vsd.anchors, cfg.vsd.paths, cfg.vsd.depth = 2, 2, 2
        drafter = make_drafter(target, data, seed)
        embed_before = target.embed_tokens.weight.clone()
        loss, _ = TrainStep(drafter, target, cfg)(data.input_ids[:2], data.loss_mask[:2], seed)
        loss.backward()
        assert all(p.grad is None and not p.requires_grad for p in target.parameters())
        for name, p in drafter.named_parameters():
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), (method, name)
        assert not any(n.startswith("_embed") for n, _ in drafter.named_parameters())
        assert torch.equal(target.embed_tokens.weight, embed_before)


def splits_file(tmp_path, target, data):
    path = tmp_path / "data.pt"
    prompts = [row[:4] for row in data.input_ids[30:].tolist()]
    DataSplits(data.rows(torch.arange(30)), data.rows(torch.arange(30, 40)), prompts,
               "test").save(path)
    return str(path)


def test_short_training_lowers_heldout_kl_and_raises_tau(tiny, tmp_path):
    directory, target, data = tiny
    kw = dict(seq_len=20, batch_size=6, warmup_steps=2, lr=1e-2, schedule="constant",
              data=splits_file(tmp_path, target, data), eval_prompts=8, eval_new_tokens=16,
              heldout_sequences=10, seed=3)
    cfg = TrainConfig(method="eagle3", max_steps=40, **kw).validate()
    cfg.eagle3.steps = 3
    trainer = Trainer(target, tmp_path / "run", cfg, progress=False)
    before = trainer.evaluate()
    trainer.run()
    after = trainer.evaluate()
    assert after["heldout_kl"] < 0.7 * before["heldout_kl"], (before, after)
    assert after["tau_T0"] > before["tau_T0"] + 0.2, (before, after)
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and "tau_est" in log[0] and "tokens_per_s" in log[0]
    # VSD fine-tunes the result (--init) and keeps it at least as good on held-out KL.
    vsd = TrainConfig(method="vsd", max_steps=6, **kw).validate()
    vsd.vsd.anchors, vsd.vsd.paths, vsd.vsd.depth = 4, 4, 3
    tuned = vsd_ext.train_drafter(target, tmp_path / "vsd", vsd, init=tmp_path / "run",
                                  progress=False)
    step = TrainStep(tuned, target, vsd)
    assert heldout_kl(step, data.rows(torch.arange(30, 40))) < before["heldout_kl"]
    stats = decode_tau(target, tuned, data.input_ids[30:, :4].tolist(), 1.0, 12)
    assert stats["tau"] >= 1.0


@pytest.mark.parametrize("method", ["eagle3", "vsd"])
def test_resume_is_exact(tiny, tmp_path, method):
    _, target, data = tiny
    kw = dict(method=method, seq_len=20, batch_size=4, micro_batch_size=2, max_steps=5,
              warmup_steps=2, lr=5e-3, data=splits_file(tmp_path, target, data), save_every=100)
    cfg = TrainConfig(**kw).validate()
    cfg.eagle3.steps = 2
    cfg.vsd.anchors, cfg.vsd.paths, cfg.vsd.depth = 2, 2, 2
    full = vsd_ext.train_drafter(target, tmp_path / "full", cfg, progress=False)
    part = TrainConfig.from_dict({**cfg.to_dict(), "stop_after_steps": 2})
    vsd_ext.train_drafter(target, tmp_path / "part", part, progress=False)
    latest = CheckpointStore(tmp_path / "part").latest()
    assert latest.name == "checkpoint-00000002"
    assert read_state(latest / "trainer_state.pt")["step"] == 2
    resumed = vsd_ext.train_drafter(target, tmp_path / "part", cfg, progress=False)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_bad_configs_raise_clear_errors(tiny, tmp_path):
    _, target, data = tiny
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="eagle2").validate()
    with pytest.raises(ValueError, match="vsd.reach"):
        TrainConfig(vsd=vsd_mod_config(reach="both")).validate()
    with pytest.raises(ValueError, match="vsd.baseline"):
        TrainConfig(vsd=vsd_mod_config(baseline="ema")).validate()
    with pytest.raises(ValueError, match="vsd.temperature"):
        TrainConfig(vsd=vsd_mod_config(temperature=-1.0)).validate()
    with pytest.raises(ValueError, match="vsd.ranking_temperature"):
        TrainConfig(vsd=vsd_mod_config(ranking_temperature=0.0)).validate()
    with pytest.raises(ValueError, match="eagle3.steps"):
        TrainConfig.from_dict({"eagle3": {"steps": 0}}).validate()
    with pytest.raises(ValueError, match="unknown fields"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    path = splits_file(tmp_path, target, data)
    with pytest.raises(ValueError, match="batch_size 5"):
        vsd_ext.train_drafter(target, tmp_path / "a", seq_len=20, batch_size=5,
                              micro_batch_size=2, data=path, progress=False)
    with pytest.raises(ValueError, match="seq_len is 16"):
        vsd_ext.train_drafter(target, tmp_path / "b", seq_len=16, data=path, progress=False)
    vsd_ext.train_drafter(target, tmp_path / "c", seq_len=20, batch_size=2, max_steps=1,
                          data=path, progress=False)
    with pytest.raises(ValueError, match="different run.*lr"):
        vsd_ext.train_drafter(target, tmp_path / "c", seq_len=20, batch_size=2, max_steps=1,
                              lr=0.5, data=path, progress=False)


def vsd_mod_config(**kw):
    return VSDConfig(**kw)


@pytest.mark.parametrize("method", ["eagle3", "vsd"])
def test_bf16_autocast_step_is_close_to_fp32(tiny, seed, method):
    _, target, data = tiny
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(method=method, seq_len=20, precision=precision).validate()
        cfg.eagle3.steps = 2
        cfg.vsd.anchors, cfg.vsd.paths, cfg.vsd.depth = 2, 2, 2
        drafter = make_drafter(target, data, seed)
        step = TrainStep(drafter, target, cfg)
        loss, _ = step(data.input_ids[:2], data.loss_mask[:2], seed)
        loss.backward()
        assert all(bool(torch.isfinite(p.grad).all()) for p in drafter.parameters())
        assert all(p.dtype == torch.float32 for p in drafter.parameters())  # fp32 master
        losses[precision] = float(loss.detach())
    if method == "eagle3":  # deterministic; vsd's E-step samples from the (perturbed) q
        assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * abs(losses["fp32"]) + 0.05


def test_bf16_target_trains_and_decodes_with_fp32_master_drafter(tiny, tmp_path):
    directory, _, data = tiny
    cfg = TrainConfig(method="vsd", seq_len=20, batch_size=2, max_steps=2, precision="bf16",
                      data=splits_file(tmp_path, load_target(directory), data), eval_every=2,
                      eval_prompts=2, eval_new_tokens=6).validate()
    cfg.vsd.anchors, cfg.vsd.paths, cfg.vsd.depth = 2, 2, 2
    drafter = vsd_ext.train_drafter(str(directory), tmp_path / "bf16", cfg, progress=False)
    assert drafter.fc.weight.dtype == torch.float32
    log = (tmp_path / "bf16" / "train_log.jsonl").read_text()
    assert '"tau_T0"' in log
