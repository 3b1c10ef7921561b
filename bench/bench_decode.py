"""End-to-end decoding: speculative (provider "vsd_ext") vs autoregressive decoding of the same
target through the same loop (provider "torch": `generate(target, None, ...)`).

Target: the embedded default (`vsd_ext.load_target("default")`, fp32 on CPU; the environment
variable VSD_TARGET may name another checkpoint directory). Prompts: the
first lines of held-out standard-library files (`vsd_ext.corpus.prompts`), cut to PROMPT_TOKENS.
Drafters: "oracle" (the target's own greedy continuation: every draft accepted, so the ratio is
the loop's ceiling at this depth), "untrained" (a freshly initialized EAGLE-3 head: nearly
nothing accepted, so the ratio is the drafting + tree-verification overhead) and "trained":
the EAGLE-3 drafter shipped for the default target, or the drafter directory named by the
environment variable VSD_DRAFTER (with VSD_TARGET set and no VSD_DRAFTER there are no
"trained" cases), run in bf16 (the target stays fp32; decoding stays lossless). Trees: the
default `TreeConfig` for the oracle and the untrained head, a depth-5 chain (`CHAIN`, sampled
from the drafter at T > 0) for the trained drafter — on a CPU, where each verified node costs
real compute, chains are the fastest.
Groups: one per (drafter, batch size, temperature); extra_info holds τ (accepted + 1 per target
forward), tokens/s and the time split of the measured call.

CPU threads: VSD_BENCH_THREADS (default 1). The default target's ops are small: on a shared
machine, intra-op threads mostly wait on each other at OpenMP barriers, and one thread gives
stable, comparable timings for both providers.
"""
import os

import pytest
import torch

import vsd_ext
from vsd_ext import corpus
from vsd_ext.decoding import OracleDrafter, TreeConfig, generate
from vsd_ext.models import Drafter

from conftest import DECODE

MAX_NEW = DECODE["max_new_tokens"]
PROMPT_TOKENS = DECODE["prompt_tokens"]
TREE = TreeConfig()  # depth 4, topk 4, total_tokens 12
CHAIN = TreeConfig(depth=5, topk=1, total_tokens=5)


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
    texts = corpus.prompts("heldout", num_lines=12, limit=4)
    return [target.tokenizer.encode(t).ids[-PROMPT_TOKENS:] for t in texts]


def make_drafter(kind, target, prompts):
    if kind == "oracle":
        return OracleDrafter.from_target(target, prompts, MAX_NEW, TREE.depth)
    if kind == "untrained":
        return Drafter.for_target(target, seed=0)
    return vsd_ext.load_drafter(os.environ.get("VSD_DRAFTER", "default"), target,
                                dtype=torch.bfloat16)


# The shipped drafter belongs to the default target: another target is measured with a
# trained drafter only when VSD_DRAFTER names one (no "trained" cases otherwise).
TRAINED = not os.environ.get("VSD_TARGET") or bool(os.environ.get("VSD_DRAFTER"))
KINDS = ("oracle", "untrained", "trained") if TRAINED else ("oracle", "untrained")
CASES = [(kind, B, T) for kind in KINDS for B in DECODE["batch_sizes"] for T in (0.0,)]
CASES += [("untrained", 4, 1.0)] + ([("trained", 1, 1.0), ("trained", 4, 1.0)] if TRAINED
                                    else [])


@pytest.mark.parametrize("kind,B,T", CASES, ids=[f"{k}-B{B}-T{T:g}" for k, B, T in CASES])
@pytest.mark.parametrize("provider", ["vsd_ext", "torch"])
def test_decode(benchmark, target, prompt_ids, provider, kind, B, T):
    prompts = prompt_ids[:B]
    drafter = make_drafter(kind, target, prompts)
    shape = CHAIN if kind == "trained" else TREE
    tree = TreeConfig(shape.depth, shape.topk, shape.total_tokens, sampled=T > 0)
    if provider == "torch":
        def run():
            return generate(target, None, prompts, MAX_NEW, T, ignore_eos=True,
                            generator=torch.Generator().manual_seed(0))
    else:
        def run():  # (an OracleDrafter restarts from its references on every call)
            return generate(target, drafter, prompts, MAX_NEW, T, tree, ignore_eos=True,
                            generator=torch.Generator().manual_seed(0))
    out = run()  # validate once, outside the timed region: greedy output is the target's
    if T == 0:
        base = generate(target, None, prompts, MAX_NEW, ignore_eos=True)
        assert out.tokens == base.tokens
    benchmark.group = f"decode {kind} B={B} T={T:g} ({MAX_NEW} new tokens per row)"
    result = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    stats = result.stats
    benchmark.extra_info.update({
        "provider": provider, "device": "cpu", "tau": stats["tau"],
        "tokens_per_second": stats["tokens_per_second"], "new_tokens": stats["new_tokens"],
        "target_forwards": stats["target_forwards"], "time_s": stats["time_s"],
        "tree": f"depth {tree.depth}, topk {tree.topk}, total_tokens {tree.total_tokens}, "
                f"{'sampled' if tree.sampled else 'top-k'}",
    })
