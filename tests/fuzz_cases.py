"""The hostile-input campaign of issue #17 as data: every case is a call a hostile but fair
user could make, with what must happen — a correct result, or a clean error (a ValueError
or OSError whose one-line message names the argument or file).

`build_cases(world)` returns the cases (seeded: the same list every run); `outcome(case)`
classifies what one did: "correct", "clean error", "unclear error" (another exception
type, or a message that does not name the argument or file), "silently wrong" (a result
where an error was due, or a wrong result), "traceback" (a `vsd` command that let an
exception escape). tests/test_fuzz.py asserts that every case is correct or a clean error;
`python tests/fuzz_cases.py` prints the counts per class (the measurement of the issue).

Op cases cover the classes of hostile input the ops already handle (wrong ranks, shapes,
dtypes, devices, strides, out-of-range indices, empty batches forward); the cases of
issue #17 items 2, 6 (tree_attention) and 8 (owned elsewhere) are left to their fixes.
The machinery (`Case`, `outcome`, `World`, `run_cli`) is in tests/fuzz_core.py; the cases
of `weighted_linear_divergence` in tests/fuzz_divergence.py, those of decode settings,
`TreeConfig`, `vsd calibrate` / `vsd generate` tree flags and `--set vsd.*` in
tests/fuzz_decoding.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vsd_ext.decoding import generate
from vsd_ext.models import load_drafter, load_target
from vsd_ext.ops import tree_attention, verify_tree, weighted_cross_entropy
from vsd_ext.reference import cross_entropy as ref_ce
from vsd_ext.reference import tree_attention as ref_attention
from vsd_ext.reference import verify_tree as ref_verify
from vsd_ext.training.config import TrainConfig
from vsd_ext.training.data import DataSplits, load_splits
from vsd_ext.tree import build_tree_mask, random_parents, tree_depths, tree_paths

import fuzz_decoding
import fuzz_divergence
from fuzz_core import INF, NAN, SEED, Case, World, corrupt_bytes, outcome, run_cli, write_json

__all__ = ["BUILDERS", "Case", "SEED", "World", "build_cases", "outcome", "run_cli"]

# Values each field must refuse (a value it accepts is not hostile: e.g. rms_norm_eps 1.5).
TARGET_CONFIG_INVALID = {
    "vocab_size": [None, 0, -1, 1.5, "x", True],
    "hidden_size": [None, 0, -3, "x", [], 10 ** 12],
    "intermediate_size": [0, 2.5, "x", {}],
    "num_hidden_layers": [0, -1, "x", 1.5],
    "num_attention_heads": [0, "x", 3],
    "num_key_value_heads": [0, -1, 3, "x", 1.5],
    "head_dim": [0, 3, -2, "x", 10 ** 6],
    "rms_norm_eps": [0, -1, "x", NAN, [], True],
    "rope_theta": [0, -1, "x", NAN, INF, True],
    "max_position_embeddings": [0, -1, 1.5, "x", True],
    "rope_scaling": ["x", 5, [], {"rope_type": "yarn"}, {"rope_type": "linear"},
                     {"rope_type": "linear", "factor": "x"}],
    "architectures": ["LlamaForCausalLM", [1], ["GPT2LMHeadModel"], {}],
    "eos_token_id": ["x", 1.5, [1, "a"], True],
    "tie_word_embeddings": ["yes", 1, []],
    "hidden_act": ["gelu", 5, None],
}
TRAIN_CONFIG_INVALID = {
    "method": [None, "eagle2", 1, []],
    "seq_len": [None, 0, 2, -1, 1.5, "x", True],
    "batch_size": [0, -1, 1.5, "x", None, True],
    "lr": [0, -1, "x", NAN, INF, None, True],
    "betas": [5, [0.9], [1.5, 0.9], "x", None],
    "max_minutes": [0, -1, "x", NAN],
    "precision": ["fp8", 1, None],
    "regenerate": ["yes", 1, None],
    "save_every": [0, -1, 1.5, None],
    "eagle3": [5, "x", [], None],
    "vsd": [5, "x", None],
    "draft_vocab_size": [0, -1, 1.5, "x"],
}



# ---- loader cases ----------------------------------------------------------------------
def target_file_cases(world: World) -> list[Case]:

    cases = []
    for how in ("truncate", "garbage", "empty", "header"):
        for k in range(3 if how in ("truncate", "garbage") else 1):
            d = world.copy("target")
            corrupt_bytes(d / "model.safetensors", world.rng, how)
            cases.append(Case(f"target-safetensors-{how}-{k}", lambda d=d: load_target(d),
                              (str(d / "model.safetensors"),)))
    for name, text in (("garbage", "{not json"), ("binary", "\x00\xff"), ("empty", "")):
        d = world.copy("target")
        write_json(d / "tokenizer.json", text)
        cases.append(Case(f"tokenizer-{name}", lambda d=d: load_target(d),
                          (str(d / "tokenizer.json"),)))
    for name, value in (("garbage", "{not json"), ("list", [1, 2]), ("string", '"x"'),
                        ("empty", "")):
        d = world.copy("target")
        write_json(d / "config.json", value)
        cases.append(Case(f"target-config-{name}", lambda d=d: load_target(d),
                          (str(d / "config.json"),)))
    for field, values in TARGET_CONFIG_INVALID.items():
        for value in values:
            d = world.copy("target")
            config = json.loads((d / "config.json").read_text())
            config[field] = value
            write_json(d / "config.json", config)
            cases.append(Case(f"target-config-{field}={value!r}", lambda d=d: load_target(d),
                              (field, str(d))))
    for name, make in _weight_corruptions():
        d = world.copy("target")
        state = _read(d / "model.safetensors")
        make(state)
        save_file(state, str(d / "model.safetensors"))
        cases.append(Case(f"target-weights-{name}", lambda d=d: load_target(d), (str(d),)))
    return cases + shard_cases(world)


def _read(path: Path) -> dict:

    return dict(load_file(str(path)))


def _weight_corruptions():
    def int64(s):
        s["model.norm.weight"] = s["model.norm.weight"].long()

    def shape(s):
        s["model.norm.weight"] = s["model.norm.weight"][:-1].clone()

    def missing(s):
        del s["model.norm.weight"]

    def extra(s):
        s["model.extra.weight"] = torch.zeros(2)

    def boolean(s):
        s["model.layers.0.mlp.up_proj.weight"] = s["model.layers.0.mlp.up_proj.weight"] > 0

    return [("int64", int64), ("shape", shape), ("missing", missing), ("extra", extra),
            ("bool", boolean)]


def shard_cases(world: World) -> list[Case]:

    cases = []
    for name in ("index-garbage", "index-list", "index-no-map", "shard-truncated",
                 "shard-missing"):
        d = world.copy("target")
        state = _read(d / "model.safetensors")
        (d / "model.safetensors").unlink()
        keys = sorted(state)
        save_file({k: state[k] for k in keys[:3]}, str(d / "a.safetensors"))
        save_file({k: state[k] for k in keys[3:]}, str(d / "b.safetensors"))
        index = {"weight_map": {k: ("a.safetensors" if i < 3 else "b.safetensors")
                                for i, k in enumerate(keys)}}
        path = d / "model.safetensors.index.json"
        write_json(path, {"index-garbage": "{", "index-list": [1],
                           "index-no-map": {"metadata": {}}}.get(name, index))
        expect = str(path)
        if name == "shard-truncated":
            corrupt_bytes(d / "b.safetensors", world.rng, "truncate")
            expect = str(d / "b.safetensors")
        if name == "shard-missing":
            (d / "b.safetensors").unlink()
            expect = "b.safetensors"
        cases.append(Case(f"target-{name}", lambda d=d: load_target(d), (expect,)))
    return cases


def drafter_cases(world: World) -> list[Case]:

    target, cases = world.target, []
    for how in ("truncate", "garbage", "empty", "header"):
        d = world.copy("drafter")
        corrupt_bytes(d / "model.safetensors", world.rng, how)
        cases.append(Case(f"drafter-safetensors-{how}", lambda d=d: load_drafter(d, target),
                          (str(d / "model.safetensors"),)))
    for name, value in (("garbage", "{"), ("list", [1]), ("arch", {"architectures": ["X"]}),
                        ("layers-repeat", {"eagle_aux_hidden_state_layer_ids": [9, 9, 9]}),
                        ("layers-type", {"eagle_aux_hidden_state_layer_ids": "0,1,2"}),
                        ("vocab", {"vocab_size": 5}), ("draft-vocab", {"draft_vocab_size": -3}),
                        ("hidden", {"hidden_size": "wide"}), ("heads", {"num_key_value_heads": 0}),
                        ("layers-mismatch", {"eagle_aux_hidden_state_layer_ids": [0, 1, 2]})):
        d = world.copy("drafter")
        if isinstance(value, dict):
            value = {**json.loads((d / "config.json").read_text()), **value}
        write_json(d / "config.json", value)
        cases.append(Case(f"drafter-config-{name}", lambda d=d: load_drafter(d, target),
                          (str(d),)))
    for name, make in _drafter_weight_corruptions(target):
        d = world.copy("drafter")
        state = _read(d / "model.safetensors")
        make(state)
        save_file(state, str(d / "model.safetensors"))
        cases.append(Case(f"drafter-weights-{name}", lambda d=d: load_drafter(d, target),
                          (str(d),)))
    return cases


def _drafter_weight_corruptions(target):
    V = target.vocab_size

    def d2t_range(s):
        s["d2t"] = s["d2t"] + V

    def d2t_negative(s):
        s["d2t"][3] = -10

    def d2t_repeat(s):
        s["d2t"][1] = -1  # draft ids 0 and 1 both map to target id 0

    def t2d(s):
        s["t2d"] = torch.zeros_like(s["t2d"])

    def d2t_float(s):
        s["d2t"] = s["d2t"].float()

    def int_weight(s):
        s["fc.weight"] = s["fc.weight"].long()

    def foreign_embedding(s):
        s["embed_tokens.weight"] = torch.randn(V, target.hidden_size)

    def embedding_shape(s):
        s["embed_tokens.weight"] = torch.randn(V, 3)

    return [("d2t-range", d2t_range), ("d2t-negative", d2t_negative),
            ("d2t-repeat", d2t_repeat), ("t2d-empty", t2d), ("d2t-float", d2t_float),
            ("int-weight", int_weight), ("foreign-embedding", foreign_embedding),
            ("embedding-shape", embedding_shape)]


def data_cases(world: World) -> list[Case]:

    cases = []
    for name, content in (("garbage", b"\x80\x04garbage"), ("empty", b""),
                          ("text", b"hello"), ("zip", b"PK\x03\x04" + bytes(40))):
        path = world.root / f"bad_{name}.pt"
        path.write_bytes(content)
        cases.append(Case(f"data-pt-{name}", lambda p=path: DataSplits.load(p), (str(path),)))
    for name, value in (("list", [1, 2]), ("keys", {"train": 1}),
                        ("dtype", {"train": (torch.zeros(2, 3), torch.zeros(2, 3)),
                                   "heldout": (torch.zeros(2, 3), torch.zeros(2, 3)),
                                   "prompts": [[1]], "source": "x"})):
        path = world.root / f"wrong_{name}.pt"
        torch.save(value, str(path))
        cases.append(Case(f"data-pt-{name}", lambda p=path: DataSplits.load(p), (str(path),)))
    path = world.root / "ids.pt"
    good = DataSplits.load(world.data)
    bad_ids = good.train.input_ids.clone()
    bad_ids[0, 0] = -7
    DataSplits(type(good.train)(bad_ids, torch.zeros_like(bad_ids, dtype=torch.bool)),
               good.heldout, good.prompts, "x").save(path)
    cases.append(Case("data-pt-negative-id", lambda p=path: load_splits(
        world.target, str(p), good.train.seq_len), ("token id -7",)))
    for name, text in (("utf8", b"\xff\xfe{"), ("json", b'{"text": 1'), ("record", b"[1]\n")):
        path = world.root / f"bad_{name}.jsonl"
        path.write_bytes(text)
        cases.append(Case(f"data-jsonl-{name}", lambda p=path: load_splits(
            world.target, str(p), 8), (str(path),)))
    return cases


# ---- API cases -------------------------------------------------------------------------
def generate_cases(world: World) -> list[Case]:

    target = world.target
    V = target.vocab_size
    cases = []
    prompts = {"negative": [[3, -1, 4]], "negative2": [[-5]], "vocab": [[V]],
               "float": [[1.5, 2]], "string": [["a"]], "empty": [[]], "none": None,
               "int": 7, "nested": [[[1]]], "float-tensor": torch.ones(1, 3),
               "bool": [[True]]}
    for name, p in prompts.items():
        cases.append(Case(f"generate-prompts-{name}",
                          lambda p=p: generate(target, None, p, 4), ("prompts",)))
    for value in (0, -1, 1.5, "10", None, 10 ** 8, True):
        cases.append(Case(f"generate-max_new_tokens={value!r}",
                          lambda v=value: generate(target, None, [1, 2], v), ("max_new_tokens",)))
    for value in ("hot", float("nan"), float("inf"), -1.0, None, [1.0]):
        cases.append(Case(f"generate-temperature={value!r}",
                          lambda v=value: generate(target, None, [1, 2], 4, v), ("temperature",)))
    for value in ("ab", [1.5], [None]):
        cases.append(Case(f"generate-stop={value!r}",
                          lambda v=value: generate(target, None, [1, 2], 4, stop=v), ("stop",)))
    greedy = generate(target, None, [[1, 2, 3]], 5).tokens[0]
    cases.append(Case("generate-tensor-prompt", lambda: generate(
        target, None, torch.tensor([1, 2, 3]), 5).tokens[0], check=lambda t: t == greedy))
    return cases


def target_call_cases(world: World) -> list[Case]:
    target = world.target
    V, limit = target.vocab_size, target.config["max_position_embeddings"]
    cases = [Case(f"target-ids-{name}", lambda ids=ids: target(ids), ("input_ids",))
             for name, ids in (("negative", torch.tensor([[1, -3]])),
                               ("vocab", torch.tensor([[V]])),
                               ("int32", torch.zeros(1, 2, dtype=torch.int32)),
                               ("float", torch.zeros(1, 2)),
                               ("rank1", torch.zeros(3, dtype=torch.int64)),
                               ("too-long", torch.zeros(1, limit + 1, dtype=torch.int64)))]
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(SEED))
    full = target(ids)
    cases.append(Case("target-ids-strided", lambda: target(ids.t().contiguous().t()),
                      check=lambda out: torch.allclose(out, full, atol=1e-5)))
    cases.append(Case("target-ids-padding", lambda: target(torch.tensor([[1, 2, -1]])),
                      check=lambda out: torch.allclose(out[:, :2], target(
                          torch.tensor([[1, 2]])), atol=1e-5)))
    return cases


def config_cases(world: World) -> list[Case]:

    cases = []
    for field, values in TRAIN_CONFIG_INVALID.items():
        for value in values:
            cases.append(Case(f"trainconfig-{field}={value!r}", lambda f=field, v=value:
                              TrainConfig.from_dict({f: v}).validate(), (field,)))
    cases.append(Case("trainconfig-nested-unknown", lambda: TrainConfig.from_dict(
        {"vsd": {"depht": 3}}).validate(), ("vsd.depht",)))
    return cases


# ---- op cases (classes the ops already handle) -----------------------------------------
def op_cases(world: World) -> list[Case]:
    return _attention_cases() + _verify_cases() + _ce_cases() + _tree_cases()


def _tree_cases() -> list[Case]:
    """`vsd_ext.tree` (masks, depths, paths): empty batches work, bad parents are named."""
    cases = []
    for fn in (tree_depths, tree_paths, build_tree_mask):
        for n in (1, 70):
            cases.append(Case(f"tree-{fn.__name__}-empty-batch-N{n}", lambda f=fn, n=n: f(
                torch.zeros(0, n, dtype=torch.int64)), check=lambda out: out.shape[0] == 0))
        for name, parents in (("rank", torch.tensor([-1, 0])),
                              ("dtype", torch.tensor([[-1, 0]], dtype=torch.int32)),
                              ("order", torch.tensor([[-1, 2, 0]])),
                              ("root", torch.tensor([[0, 0]])),
                              ("float", torch.tensor([[-1.0, 0.0]]))):
            cases.append(Case(f"tree-{fn.__name__}-{name}", lambda f=fn, p=parents: f(p),
                              ("parents",)))
    return cases


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=1e-5)


def _attention_inputs(B=2, N=5, L=7, Hq=4, Hkv=2, D=16):

    g = torch.Generator().manual_seed(SEED)
    return dict(q=torch.randn(B, N, Hq, D, generator=g),
                k_cache=torch.randn(B, L, Hkv, D, generator=g),
                v_cache=torch.randn(B, L, Hkv, D, generator=g),
                prefix_lens=torch.tensor([L, 3][:B], dtype=torch.int64),
                k_tree=torch.randn(B, N, Hkv, D, generator=g),
                v_tree=torch.randn(B, N, Hkv, D, generator=g),
                tree_mask=build_tree_mask(random_parents(B, N, g)) if B else
                torch.zeros(0, N, (N + 63) // 64, dtype=torch.int64))


def _attention_cases() -> list[Case]:

    base = _attention_inputs()
    bad = {"q-rank": ("q", base["q"][0]), "q-int": ("q", base["q"].long()),
           "k_cache-dtype": ("k_cache", base["k_cache"].double()),
           "k_cache-heads": ("k_cache", torch.randn(2, 7, 3, 16)),
           "v_cache-shape": ("v_cache", torch.randn(2, 6, 2, 16)),
           "k_tree-shape": ("k_tree", torch.randn(2, 4, 2, 16)),
           "prefix_lens-range": ("prefix_lens", torch.tensor([8, 3])),
           "prefix_lens-negative": ("prefix_lens", torch.tensor([-1, 3])),
           "prefix_lens-float": ("prefix_lens", torch.tensor([1.0, 3.0])),
           "tree_mask-words": ("tree_mask", torch.zeros(2, 5, 2, dtype=torch.int64)),
           "tree_mask-dtype": ("tree_mask", base["tree_mask"].int()),
           "q-stride": ("q", torch.randn(2, 5, 4, 32)[..., ::2])}
    cases = []
    for name, (arg, value) in bad.items():
        args = {**base, arg: value}
        cases.append(Case(f"tree_attention-{name}", lambda a=args: tree_attention(**a), (arg,)))
    expected = ref_attention.tree_attention(**base)
    strided = {**base, "q": base["q"].transpose(1, 2).contiguous().transpose(1, 2)}
    cases.append(Case("tree_attention-strided-q", lambda: tree_attention(**strided),
                      check=lambda out: _close(out[0], expected[0])))
    for B, N in ((0, 5), (2, 0)):  # empty batches, forward (backward: issue #17 item 6)
        empty = _attention_inputs(B=B, N=N) if N else {
            **_attention_inputs(), "q": torch.randn(2, 0, 4, 16),
            "k_tree": torch.randn(2, 0, 2, 16), "v_tree": torch.randn(2, 0, 2, 16),
            "tree_mask": torch.zeros(2, 0, 0, dtype=torch.int64)}
        cases.append(Case(f"tree_attention-empty-B{B}-N{N}", lambda e=empty: tree_attention(**e),
                          check=lambda out, B=B, N=N: out[0].shape == (B, N, 4, 16)
                          and out[1].shape == (B, N, 4)))
    shared = {**base, "k_cache": base["k_cache"][:1], "v_cache": base["v_cache"][:1],
              "prefix_lens": torch.tensor([7, 2])}
    cases.append(Case("tree_attention-shared-cache", lambda: tree_attention(**shared),
                      check=lambda out: _close(out[0], ref_attention.tree_attention(**shared)[0])))
    return cases


def _verify_cases() -> list[Case]:

    g = torch.Generator().manual_seed(SEED)
    B, N, V = 3, 6, 11
    base = dict(target_logits=torch.randn(B, N, V, generator=g),
                draft_tokens=torch.randint(0, V, (B, N), generator=g),
                parents=random_parents(B, N, g),
                uniforms=torch.rand(B, N + 1, generator=g, dtype=torch.float64))
    bad = {"logits-rank": ("target_logits", base["target_logits"][0]),
           "logits-int": ("target_logits", base["target_logits"].long()),
           "tokens-range": ("draft_tokens", base["draft_tokens"] + V),
           "tokens-dtype": ("draft_tokens", base["draft_tokens"].int()),
           "parents-order": ("parents", torch.tensor([[-1, 2, 0, 1, 1, 1]] * B)),
           "parents-shape": ("parents", base["parents"][:, :4]),
           "uniforms-shape": ("uniforms", base["uniforms"][:, :3]),
           "uniforms-range": ("uniforms", base["uniforms"] + 2)}
    cases = []
    for name, (arg, value) in bad.items():
        args = {**base, arg: value}
        cases.append(Case(f"verify_tree-{name}", lambda a=args: verify_tree(
            **a, mode="target_only"), (arg,)))
    cases.append(Case("verify_tree-mode", lambda: verify_tree(**base, mode="fast"), ("mode",)))
    cases.append(Case("verify_tree-temperature", lambda: verify_tree(
        **base, mode="target_only", temperature=-1.0), ("temperature",)))
    cases.append(Case("verify_tree-sampled-no-q", lambda: verify_tree(
        **base, mode="sampled"), ("draft_probs",)))
    cases.append(Case("verify_tree-empty-batch", lambda: verify_tree(
        **{k: v[:0] for k, v in base.items()}, mode="target_only"),
        check=lambda out: [tuple(t.shape) for t in out] == [(0, N), (0, N), (0,)]))
    expected = ref_verify.verify_tree(**base, mode="target_only")
    cases.append(Case("verify_tree-strided-logits", lambda: verify_tree(
        **{**base, "target_logits": base["target_logits"].transpose(0, 1).contiguous()
           .transpose(0, 1)}, mode="target_only"),
        check=lambda out: all(torch.equal(a, b) for a, b in zip(out, expected))))
    return cases


def _ce_cases() -> list[Case]:

    g = torch.Generator().manual_seed(SEED)
    M, V = 6, 13
    base = dict(logits=torch.randn(M, V, generator=g),
                targets=torch.randint(0, V, (M,), generator=g),
                row_weights=torch.rand(M, generator=g))
    bad = {"logits-rank": ("logits", base["logits"][0]),
           "logits-int": ("logits", base["logits"].long()),
           "targets-range": ("targets", base["targets"] + V),
           "targets-negative": ("targets", base["targets"] - V - 200),
           "targets-dtype": ("targets", base["targets"].float()),
           "targets-shape": ("targets", base["targets"][:4]),
           "row_weights-shape": ("row_weights", base["row_weights"][:4]),
           "soft_targets-shape": ("soft_targets", torch.randn(M, V + 1))}
    cases = []
    for name, (arg, value) in bad.items():
        args = {**base, arg: value}
        cases.append(Case(f"weighted_ce-{name}", lambda a=args: weighted_cross_entropy(**a),
                          (arg,)))
    cases.append(Case("weighted_ce-empty", lambda: weighted_cross_entropy(
        torch.randn(0, V), torch.zeros(0, dtype=torch.int64), torch.zeros(0)),
        check=lambda out: out[0].shape == (0,) and out[1].shape == (0,)))
    expected = ref_ce.weighted_cross_entropy(**base)
    strided = {**base, "logits": torch.randn(V, M, generator=g).t()}
    cases.append(Case("weighted_ce-strided-logits", lambda: weighted_cross_entropy(**strided),
                      check=lambda out: _close(out[0],
                                               ref_ce.weighted_cross_entropy(**strided)[0])))
    cases.append(Case("weighted_ce-ignore", lambda: weighted_cross_entropy(
        **{**base, "targets": torch.full((M,), -100)}),
        check=lambda out: bool((out[0] == 0).all()) and expected is not None))
    return cases


# ---- CLI cases -------------------------------------------------------------------------

def cli_cases(world: World) -> list[Case]:
    t, data = str(world.target_dir), str(world.data)
    occupied = world.copy("drafter")
    garbage = world.root / "garbage.pt"
    garbage.write_bytes(b"\x80\x02garbage")
    config_list = world.root / "config_list.json"
    config_list.write_text("[1]")
    gen = ["generate", "--target", t, "--prompt", "w1 w2"]
    train = ["train", "--target", t, "--max-steps", "1", "--seq-len", "12", "--batch-size",
             "2", "--no-progress", "--data", data]
    argvs = {
        "gen-max-new-tokens-huge": (gen + ["--max-new-tokens", "100000000"], "--max-new-tokens"),
        "gen-max-new-tokens-zero": (gen + ["--max-new-tokens", "0"], "--max-new-tokens"),
        "gen-max-new-tokens-text": (gen + ["--max-new-tokens", "many"], "--max-new-tokens"),
        "gen-temperature-text": (gen + ["--temperature", "hot"], "--temperature"),
        "gen-temperature-nan": (gen + ["--temperature", "nan"], "--temperature"),
        "gen-temperature-negative": (gen + ["--temperature", "-1"], "--temperature"),
        "gen-depth-zero": (gen + ["--depth", "0"], "--depth"),
        "gen-topk-negative": (gen + ["--topk", "-2"], "--topk"),
        "gen-threads-negative": (gen + ["--threads", "-1"], "--threads"),
        "gen-target-missing": (["generate", "--target", "/nonexistent/t", "--prompt", "a"],
                               "/nonexistent/t"),
        "gen-target-file": (["generate", "--target", data, "--prompt", "a"], data),
        "gen-draft-missing": (gen + ["--draft", "/nonexistent/d"], "/nonexistent/d"),
        "gen-draft-garbage": (gen + ["--draft", str(world.root / "drafter_garbage")],
                              "drafter_garbage"),
        "gen-prompts-file-missing": (["generate", "--target", t, "--prompts-file",
                                      "/nonexistent/p.txt"], "/nonexistent/p.txt"),
        "gen-no-prompt": (["generate", "--target", t], "--prompt"),
        "train-data-garbage": (["train", "--target", t, "--out", str(world.root / "r1"),
                                "--data", str(garbage), "--no-progress"], str(garbage)),
        "train-data-missing": (train + ["--out", str(world.root / "r2"), "--data",
                                        "/nonexistent/x.pt"], "/nonexistent/x.pt"),
        "train-out-occupied": (train + ["--out", str(occupied)], str(occupied)),
        "train-method": (train + ["--out", str(world.root / "r3"), "--method", "eagle2"],
                         "method"),
        "train-lr-text": (train + ["--out", str(world.root / "r4"), "--lr", "fast"], "--lr"),
        "train-set-lr": (train + ["--out", str(world.root / "r5"), "--set", 'lr="x"'], "lr"),
        "train-set-unknown": (train + ["--out", str(world.root / "r6"), "--set", "vsd.x=1"],
                              "vsd.x"),
        "train-config-list": (train + ["--out", str(world.root / "r7"), "--config",
                                       str(config_list)], str(config_list)),
        "train-init-missing": (train + ["--out", str(world.root / "r8"), "--init",
                                        "/nonexistent/i"], "/nonexistent/i"),
        "eval-num-prompts": (["eval", "--target", t, "--num-prompts", "0"], "--num-prompts"),
        "eval-temperature": (["eval", "--target", t, "--temperature", "inf"], "--temperature"),
        "eval-draft-spec": (["eval", "--target", t, "--draft", "name="], "--draft"),
        "eval-prompts-missing": (["eval", "--target", t, "--prompts", "/nonexistent/p.jsonl"],
                                 "/nonexistent/p.jsonl"),
        "demo-minutes": (["demo", "--minutes", "-2"], "--minutes"),
        "demo-max-new-tokens": (["demo", "--out", str(world.root / "demo"), "--max-new-tokens",
                                 "100000000"], "--max-new-tokens"),
        "eval-max-new-tokens": (["eval", "--target", t, "--max-new-tokens", "100000000",
                                 "--out", str(world.root / "eval")], "--max-new-tokens"),
        "demo-rows": (["demo", "--rows", "0"], "--rows"),
        "verify-demo-trials": (["verify-demo", "--trials", "0"], "--trials"),
        "verify-demo-vocab": (["verify-demo", "--vocab", "2", "--trials", "10"], "--vocab"),
        "unknown-command": (["frobnicate"], "frobnicate"),
    }
    (world.root / "drafter_garbage").mkdir()
    (world.root / "drafter_garbage" / "config.json").write_text("{")
    return [Case(f"cli-{name}", lambda a=argv: run_cli(a), (flag,), cli=True)
            for name, (argv, flag) in argvs.items()]


BUILDERS = (target_file_cases, drafter_cases, data_cases, generate_cases, target_call_cases,
            config_cases, op_cases, cli_cases, *fuzz_divergence.BUILDERS,
            *fuzz_decoding.BUILDERS)


def build_cases(world: World) -> list[Case]:
    cases = [c for build in BUILDERS for c in build(world)]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


OUTCOMES = ("correct", "clean error", "silently wrong", "unclear error", "traceback")


def main(argv: list[str]) -> None:
    """Run every case and print the counts per outcome, one markdown row per builder (the
    class of hostile input) and the total, then the cases that are not correct or a clean
    error. `--skip PREFIX ...`: leave out the cases whose names start so (e.g. on an older
    version of vsd_ext, where `cli-demo` cases would run the whole demo)."""
    import tempfile

    skip = tuple(argv[argv.index("--skip") + 1:]) if "--skip" in argv else ()
    torch.manual_seed(SEED)
    rows, bad = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        world = World(Path(tmp))
        for build in BUILDERS:
            counts = rows.setdefault(build.__name__, dict.fromkeys(OUTCOMES, 0))
            for case in build(world):
                if skip and case.name.startswith(skip):
                    continue
                result = outcome(case)
                counts[result] += 1
                if result not in ("correct", "clean error"):
                    bad.append(f"  {result}: {case.name}")
    rows["total"] = {k: sum(r[k] for r in rows.values()) for k in OUTCOMES}
    print("| builder | cases | " + " | ".join(OUTCOMES) + " |")
    print("|---" * (len(OUTCOMES) + 2) + "|")
    for name, counts in rows.items():
        print(f"| {name} | {sum(counts.values())} | " +
              " | ".join(str(counts[k]) for k in OUTCOMES) + " |")
    print("\n".join(bad))


if __name__ == "__main__":
    main(sys.argv[1:])
