"""End-to-end decoding: speculative (provider "vsd_ext") vs autoregressive decoding of the same
target through the same loop (provider "torch": `generate(target, None, ...)`).

Target: the embedded default (`vsd_ext.load_target("default")`, fp32 on CPU; the environment
variable VSD_TARGET may name another checkpoint directory). Prompts: the held-out mid-file
windows (`vsd_ext/assets/prompts/heldout_midfile_v1.jsonl`), their last PROMPT_TOKENS tokens.
Drafters, each with the library's default tree (`TreeConfig()`: the cost model sizes it on
this machine, per batch size and temperature, or decodes autoregressively when drafting does
not pay):
- "default": the EAGLE-3 drafter shipped for the default target (or the directory named by
  VSD_DRAFTER; with VSD_TARGET set and no VSD_DRAFTER there are no such cases) in bf16 with
  its decode settings — what a user gets; T ∈ {0, 0.7, 1}, B ∈ {1, 4, 16};
- "untrained": a freshly initialized EAGLE-3 head: nothing is accepted, so the defaults must
  fall back to autoregressive steps (its ratio is the cost of finding that out);
- "oracle": the target's own greedy continuation as a depth-4 chain (every draft accepted at
  T = 0): the loop's ceiling at that depth.
Groups: one per (drafter, batch size, temperature). Every case decodes the same
PROMPTS_PER_CASE prompts in calls of B rows (B = 1: one prompt after another), so that a
case's speedup does not hang on one prompt's τ; extra_info holds τ (accepted + 1 per target
forward, over the calls), tokens/s, the time split of the calls and the planned tree (the
last call's). The two providers of a group run back to back; the side-by-side measurement
that interleaves them prompt by prompt is `python/measure_defaults.py`.

CPU threads: VSD_BENCH_THREADS (default 1). The default target's ops are small: on a shared
machine, intra-op threads mostly wait on each other at OpenMP barriers, and one thread gives
stable, comparable timings for both providers.
"""
import os

import pytest
import torch

import vsd_ext
from vsd_ext.decoding import OracleDrafter, TreeConfig, generate
from vsd_ext.eval import read_prompts_jsonl
from vsd_ext.eval.report import tree_text
from vsd_ext.models import Drafter

from conftest import DECODE

MAX_NEW = DECODE["max_new_tokens"]
PROMPTS_PER_CASE = max(DECODE["batch_sizes"])
PROMPT_TOKENS = DECODE["prompt_tokens"]
ORACLE = TreeConfig(depth=4, topk=1, total_tokens=4)
PROMPTS = os.path.join(os.path.dirname(vsd_ext.__file__), "assets", "prompts",
                       "heldout_midfile_v1.jsonl")


@pytest.fixture(scope="module", autouse=True)
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("VSD_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target():
    return vsd_ext.load_target(os.environ.get("VSD_TARGET", "default"))


@pytest.fixture(scope="module")
def prompt_ids(target):
    texts = read_prompts_jsonl(PROMPTS)[:PROMPTS_PER_CASE]
    return [target.tokenizer.encode(t).ids[-PROMPT_TOKENS:] for t in texts]


def make_drafter(kind, target, prompts):
    if kind == "oracle":
        return OracleDrafter.from_target(target, prompts, MAX_NEW, ORACLE.depth)
    if kind == "untrained":
        return Drafter.for_target(target, seed=0)
    return vsd_ext.load_drafter(os.environ.get("VSD_DRAFTER", "default"), target,
                                dtype=torch.bfloat16)


# The shipped drafter belongs to the default target: another target is measured with a
# trained drafter only when VSD_DRAFTER names one (no "default" cases otherwise).
TRAINED = not os.environ.get("VSD_TARGET") or bool(os.environ.get("VSD_DRAFTER"))
CASES = ([("default", B, T) for B in DECODE["batch_sizes"]
          for T in DECODE["temperatures"]] if TRAINED else [])
CASES += [("untrained", B, T) for B in (1, 4) for T in (0.0, 1.0)]
CASES += [("oracle", B, 0.0) for B in (1, 4)]
# Both providers of a case next to each other (the providers' runs stay close in time).
PARAMS = [pytest.param(kind, B, T, provider, id=f"{kind}-B{B}-T{T:g}-{provider}")
          for kind, B, T in CASES for provider in ("vsd_ext", "torch")]


@pytest.mark.parametrize("kind,B,T,provider", PARAMS)
def test_decode(benchmark, target, prompt_ids, provider, kind, B, T):
    batches = [prompt_ids[i:i + B] for i in range(0, len(prompt_ids), B)]
    if provider == "torch":
        drafters = [None] * len(batches)
    elif kind == "oracle":  # the references of its own rows
        drafters = [make_drafter(kind, target, batch) for batch in batches]
    else:
        drafters = [make_drafter(kind, target, None)] * len(batches)
    tree = ORACLE if kind == "oracle" else TreeConfig()

    def call(drafter, batch):  # (an OracleDrafter restarts from its references every call)
        return generate(target, drafter, batch, MAX_NEW, T, tree, ignore_eos=True,
                        generator=torch.Generator().manual_seed(0))

    def run():
        return [call(drafter, batch) for drafter, batch in zip(drafters, batches)]

    outs = run()  # validate once, outside the timed region: greedy output is the target's
    if T == 0:
        for out, batch in zip(outs, batches):
            assert out.tokens == generate(target, None, batch, MAX_NEW, ignore_eos=True).tokens
    benchmark.group = (f"decode {kind} B={B} T={T:g} ({len(prompt_ids)} prompts x {MAX_NEW} "
                       f"new tokens)")
    outs = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    forwards = sum(o.stats["row_forwards"] for o in outs)
    emitted = sum(o.stats["tau"] * o.stats["row_forwards"] for o in outs)
    new_tokens = sum(o.stats["new_tokens"] for o in outs)
    seconds = {k: sum(o.stats["time_s"][k] for o in outs) for k in outs[0].stats["time_s"]}
    plan = outs[-1].stats["plan"]
    benchmark.extra_info.update({
        "provider": provider, "device": "cpu", "tau": emitted / forwards,
        "tokens_per_second": new_tokens / seconds["total"], "new_tokens": new_tokens,
        "target_forwards": sum(o.stats["target_forwards"] for o in outs), "time_s": seconds,
        "tree": tree_text({"plan": plan, "temperature": T}) if plan else
        ("d4 k1 n4 chain" if kind == "oracle" and provider == "vsd_ext" else "-"),
    })
