"""Integration with a real third-party loader: vLLM's `speculators` library (issue #17).

`speculators convert --algorithm eagle3 <drafter> --verifier <target>` converts our export,
`Eagle3DraftModel.from_pretrained(<converted>)` loads it with no extra arguments, and its
draft logits equal ours (fp32, max |diff| < 1e-3) on the same target features — for the
shipped drafter on the default target, for a freshly initialized drafter of the default
target exported in a temporary directory (no dependence on the shipped weights: it holds
whatever the default target is), and for a freshly built tiny drafter with a reduced draft
vocabulary. speculators reads the feature layers from the verifier's depth
([2, L // 2, L − 3]) unless `--algorithm-kwargs` names them; our config.json records them
(`eagle_aux_hidden_state_layer_ids`), and they are passed only where they differ from that
default.

Optional: skipped unless speculators is installed (`pip install speculators`; see the
README's development section). Runs on CPU in about 30 s.
"""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vsd_ext.models import Drafter, load_drafter, load_target
from vsd_ext.models.checkpoint import DEFAULT_DRAFTERS, DEFAULT_TARGET_DIR

from helpers import save_checkpoint, tiny_target, word_tokenizer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("speculators") is None,
                                reason="speculators is not installed (optional third-party "
                                       "integration test: pip install speculators)")


def convert(drafter_dir, target_dir, out) -> None:
    """`speculators convert` (the command line), passing the feature layers only where our
    record differs from speculators' default for the verifier's depth."""
    layers = json.loads((drafter_dir / "config.json").read_text())[
        "eagle_aux_hidden_state_layer_ids"]
    depth = json.loads((target_dir / "config.json").read_text())["num_hidden_layers"]
    cmd = [sys.executable, "-m", "speculators", "convert", str(drafter_dir), "--algorithm",
           "eagle3", "--verifier", str(target_dir), "--output-path", str(out)]
    if layers != [2, depth // 2, depth - 3]:
        cmd += ["--algorithm-kwargs", json.dumps({"eagle_aux_hidden_state_layer_ids": layers})]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def their_logits(converted, ids, features) -> torch.Tensor:
    """Step-0 draft logits of speculators' own model class (its LM head's output)."""
    from speculators.models.eagle3 import Eagle3DraftModel

    model = Eagle3DraftModel.from_pretrained(str(converted)).float().eval()
    got = {}
    hook = model.lm_head.register_forward_hook(lambda m, i, o: got.setdefault("logits", o))
    with torch.no_grad():
        model(features.float(), ids, torch.zeros_like(ids),
              position_ids=torch.arange(ids.shape[1])[None], ttt_steps=1)
    hook.remove()
    return got["logits"], model


def compare(drafter_dir, target_dir, tmp_path, ids=None):
    target = load_target(target_dir, dtype=torch.float32)
    ours = load_drafter(drafter_dir, target, dtype=torch.float32)
    convert(drafter_dir, target_dir, tmp_path / "converted")
    if ids is None:
        ids = torch.tensor([target.tokenizer.encode("def main(argv):\n    return 0\n").ids])
    features = target.run(ids).features
    with torch.no_grad():
        mine = ours(ids, features).logits
    theirs, model = their_logits(tmp_path / "converted", ids, features)
    assert list(model.config.eagle_aux_hidden_state_layer_ids) == list(ours.feature_layers)
    if model.d2t is None:  # speculators keeps no map for a full draft vocabulary
        assert ours.draft_vocab_size == target.vocab_size and not bool(ours.d2t.any())
    else:
        assert torch.equal(model.d2t, ours.d2t)
    return (theirs - mine).abs().max().item(), (theirs.argmax(-1) == mine.argmax(-1))


def test_shipped_drafter_converts_and_matches(tmp_path):
    """Whichever drafter is shipped for whichever default target (nothing here is specific
    to one set of weights or one target depth)."""
    diff, agree = compare(DEFAULT_DRAFTERS["default"], DEFAULT_TARGET_DIR, tmp_path)
    assert diff < 1e-3 and bool(agree.all()), diff


def test_fresh_default_target_drafter_converts_and_matches(tmp_path):
    """A freshly initialized drafter of the default target, exported with its embedding as
    `vsd train` exports the shipped ones (the LM head starts from the target's, so the
    logits are the target's kind, not noise)."""
    drafter = Drafter.for_target(load_target("default", dtype=torch.float32), seed=7)
    drafter.save_pretrained(tmp_path / "drafter", include_embedding=True)
    diff, agree = compare(tmp_path / "drafter", DEFAULT_TARGET_DIR, tmp_path)
    print(f"[speculators] fresh default-target drafter: max |diff| {diff:.2e}, argmax "
          f"{int(agree.sum())}/{agree.numel()}")
    assert diff < 1e-3 and bool(agree.all()), diff


def test_fresh_tiny_drafter_converts_and_matches(tmp_path):
    """Any drafter: a tiny 8-layer target (speculators' default layers are ours, so no
    extra argument at all) and a reduced draft vocabulary (d2t / t2d)."""
    target = tiny_target(0, vocab=97, layers=8, hidden=64)
    words = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(96)}}
    save_checkpoint(target, tmp_path / "target", word_tokenizer(words, "<unk>"))
    target = load_target(tmp_path / "target")
    drafter = Drafter.for_target(target, 50, torch.arange(97).float(), seed=3)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.05)
    drafter.save_pretrained(tmp_path / "drafter", include_embedding=True)
    ids = torch.randint(0, 97, (1, 17), generator=torch.Generator().manual_seed(5))
    diff, agree = compare(tmp_path / "drafter", tmp_path / "target", tmp_path, ids)
    assert diff < 1e-3 and bool(agree.all()), diff
    # The converted checkpoint carries our embedding only when the export does: without it
    # speculators leaves the embedding uninitialized (issue #17: wrong logits).
    assert "embed_tokens.weight" in converted_tensors(tmp_path / "converted")
    drafter.save_pretrained(tmp_path / "bare")
    convert(tmp_path / "bare", tmp_path / "target", tmp_path / "bare_converted")
    assert "embed_tokens.weight" not in converted_tensors(tmp_path / "bare_converted")


def converted_tensors(directory) -> set:
    return {name for path in directory.glob("*.safetensors")
            for name in load_file(str(path)).keys()}
