"""What a decode step of the target costs against a drafter step: the ratio that caps the
end-to-end speedup any drafter can give (issue #13 asks for at least 8 on the default target).

Both pieces are timed the way the decoding cost model times them (`vsd_ext.decoding.costs`),
on a scratch cache behind 128 cached positions, batch 1, CPU threads VSD_BENCH_THREADS
(default 1):
- provider "torch": one autoregressive step of the target (a one-node verify forward,
  `verify_tree`, the cache commit) — the baseline;
- provider "vsd_ext": one drafter step — `DrafterProposer.propose` of a one-level chain with
  one pending token: one drafter forward of one token and the pick of its draft (within a
  decoding step the first forward also covers the other accepted tokens, ~1.4x this).

`python bench/summary.py` shows the ratio as the group's "speedup" (target step time /
drafter step time). Target: VSD_TARGET or the embedded default; drafter: VSD_DRAFTER or the
shipped EAGLE-3 drafter, in bf16 as decoding uses it.
"""
import os

import pytest
import torch

import vsd_ext
from vsd_ext.decoding import costs

GROUP = "step cost: target decode step vs drafter step (B=1)"


@pytest.fixture(scope="module")
def pieces():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("VSD_BENCH_THREADS", "1")))
    target = vsd_ext.load_target(os.environ.get("VSD_TARGET", "default"))
    drafter = vsd_ext.load_drafter(os.environ.get("VSD_DRAFTER", "default"), target,
                                   dtype=torch.bfloat16)
    ids = torch.randint(0, target.vocab_size, (1, costs.PREFIX),
                        generator=torch.Generator().manual_seed(0))
    capacity = costs.PREFIX + 2 * costs.VERIFY_NODES + 16
    with torch.inference_mode():
        cache = target.new_cache(1, capacity)
        out = target.prefill(ids, cache)
        fns = {"torch": costs._verify_fns(target, cache, ids, 1, "greedy", 0.0)["verify1"],
               "vsd_ext": costs._draft_fns(drafter, ids, out.features, capacity, "greedy", 0.0,
                                           pending_tokens=1)["chain1"]}
    yield fns
    torch.set_num_threads(before)


@pytest.mark.parametrize("provider", ["torch", "vsd_ext"])
def test_step_cost(benchmark, pieces, provider):
    fn = pieces[provider]

    def run():
        with torch.inference_mode():
            fn()

    benchmark.group = GROUP
    benchmark.extra_info.update({"provider": provider, "device": "cpu",
                                 "threads": torch.get_num_threads()})
    benchmark.pedantic(run, rounds=200, iterations=1, warmup_rounds=10)
