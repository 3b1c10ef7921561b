"""Mutation check: does the test suite catch realistic bugs?

Each mutation below is one small, realistic bug (a changed index, comparison, constant or sign,
a skipped step, swapped arguments) in the Python or C++ sources. The script copies the
repository into a scratch directory, builds the extension there (CPU only, MAX_JOBS=1,
incremental: the scratch directory and its build objects are kept between runs), then for
each mutation: applies it, rebuilds if it touched C++, runs the test files that should catch
it, and restores the file. A mutation is caught when those tests fail. Prints a table and the
score (caught / mutations).

    python python/mutation_check.py                 # all mutations
    python python/mutation_check.py --list          # the mutations and their tests
    python python/mutation_check.py -k tree_attn    # only those whose name contains a word
    python python/mutation_check.py -k dv_sum --tests tests/test_x.py::test_y   # other tests

Run it before resolving changes to the decoding loop, the kernels or the objectives, and add
a mutation when a bug slipped through the tests. A mutation whose text no longer matches the
source (the code moved on) is reported as "stale": update it.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SCRATCH = Path("/tmp") / f"vsd_mutation_{hashlib.sha256(bytes(ROOT)).hexdigest()[:8]}"

DECODING_TESTS = ("tests/test_tau_floors.py", "tests/test_decoding.py")
VSD_TESTS = ("tests/test_training.py", "tests/test_vsd_trained.py")


@dataclass(frozen=True)
class Mutation:
    """Replace ``old`` (which must occur exactly once in ``path``) by ``new``; ``tests``: the
    test files that must catch it; ``what``: the bug, as a user would meet it."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str

    @property
    def cpp(self) -> bool:
        return self.path.startswith("csrc/")


MUTATIONS = [
    # ---- the three bugs of issue #19: exact output, slower decoding ----------------------
    Mutation("loop_features_tree_order", "vsd_ext/decoding/loop.py",
             "features = scored.features.gather(1, accepted.clamp(min=0)[..., None].expand(\n"
             "            -1, -1, scored.features.shape[-1]))",
             "features = scored.features",
             DECODING_TESTS, "the drafter gets target features in tree order, not along the "
             "accepted path"),
    Mutation("target_feature_layer_L-2", "vsd_ext/models/target.py",
             "high = max(num_layers - 3, low + 2)", "high = max(num_layers - 2, low + 2)",
             ("tests/test_feature_layers.py", "tests/test_tau_floors.py"),
             "EAGLE-3's high feature layer L-2 instead of L-3"),
    Mutation("sampled_trees_at_T1", "vsd_ext/decoding/proposer.py",
             "self.temperature = self.draft_temperature if self.sampled else 1.0",
             "self.temperature = 1.0", ("tests/test_tau_floors.py", "tests/test_draft_tree.py"),
             "sampled trees drawn at T = 1 whatever the decoding temperature"),
    # ---- decoding loop, draft trees, KV cache --------------------------------------------
    Mutation("tree_frontier_worst_first", "vsd_ext/decoding/draft_tree.py",
             "order = torch.sort(-score, dim=1, stable=True).indices[:, :k]",
             "order = torch.sort(score, dim=1, stable=True).indices[:, :k]",
             ("tests/test_draft_tree.py", "tests/test_tau_floors.py"),
             "EAGLE-2 growth expands the level's worst slots"),
    Mutation("tree_parent_off_by_one", "vsd_ext/decoding/draft_tree.py",
             "rank.gather(1, parent_cand.clamp(min=0)) + 1)",
             "rank.gather(1, parent_cand.clamp(min=0)))",
             ("tests/test_draft_tree.py", "tests/test_decoding.py"),
             "a kept node's parent index off by one (rank, not node index)"),
    Mutation("gumbel_sign", "vsd_ext/decoding/draft_tree.py",
             "return (-torch.log(-torch.log(u.clamp_min(1e-300)))).to(device)",
             "return (torch.log(-torch.log(u.clamp_min(1e-300)))).to(device)",
             ("tests/test_draft_tree.py", "tests/test_decoding.py"),
             "sampled slots are not draws from q (sign of the Gumbel noise)"),
    Mutation("pending_root_features", "vsd_ext/decoding/proposer.py",
             "self.pending = (emitted[:, :m], features[:, :m], num_accepted + 1)",
             "self.pending = (emitted[:, :m], features[:, :1].expand(-1, m, -1), num_accepted + 1)",
             DECODING_TESTS, "the drafter pairs every emitted token with the root's features"),
    Mutation("chain_one_level_short", "vsd_ext/decoding/proposer.py",
             "levels = min(self.config.depth, self.config.total_tokens)",
             "levels = min(self.config.depth, self.config.total_tokens) - 1",
             DECODING_TESTS, "chains drafted one level short of the configured depth"),
    Mutation("tau_counts_accepted_only", "vsd_ext/decoding/loop.py",
             "emitted = (state.hist * torch.arange(1, state.num_nodes + 1)).sum()\n    return {",
             "emitted = (state.hist * torch.arange(0, state.num_nodes)).sum()\n    return {",
             DECODING_TESTS, "τ reported as accepted tokens, without the bonus token"),
    Mutation("kv_compaction_swapped", "vsd_ext/models/kv_cache.py",
             "self.v[:, rows, dst] = self.v[:, rows, src]",
             "self.v[:, rows, src] = self.v[:, rows, dst]",
             ("tests/test_models.py", "tests/test_decoding.py"),
             "KV compaction copies values the wrong way"),
    # ---- objectives ------------------------------------------------------------------------
    Mutation("eagle3_decay_off_by_one", "vsd_ext/training/eagle3.py",
             "cfg.step_decay ** j / max(n, 1)", "cfg.step_decay ** (j + 1) / max(n, 1)",
             ("tests/test_training.py",), "EAGLE-3 step weights 0.8^(j+1) instead of 0.8^j"),
    Mutation("eagle3_soft_temperature_dropped", "vsd_ext/training/eagle3.py",
             "loss_rows = head(hidden, targets, torch.cat(weights), soft, cfg.soft_temperature)",
             "loss_rows = head(hidden, targets, torch.cat(weights), soft)",
             ("tests/test_training.py",), "EAGLE-3's soft targets ignore eagle3.soft_temperature"),
    Mutation("auf_trains_past_mismatch", "vsd_ext/training/auf.py",
             "        alive = match\n", "        alive = keep\n", ("tests/test_training.py",),
             "Accept-Until-Fail keeps training after the first mismatch"),
    Mutation("vsd_reach_squared", "vsd_ext/training/vsd_sampled.py",
             "beta_w = reach * value", "beta_w = reach * reach * value", VSD_TESTS,
             "VSD T > 0: the acceptance term weighted by r² (reach counted twice), not r"),
    Mutation("vsd_reach_off_by_one", "vsd_ext/training/weights.py",
             "torch.cat((ones, alphas[..., :-1]), -1)", "torch.cat((ones, alphas[..., 1:]), -1)",
             ("tests/test_training_weights.py",) + VSD_TESTS,
             "VSD reach r_k built from the wrong positions' acceptance"),
    Mutation("vsd_future_value_off_by_one", "vsd_ext/training/weights.py",
             "return expected_lengths(alphas)[..., 1:]",
             "return expected_lengths(alphas)[..., :-1]",
             ("tests/test_training_weights.py",) + VSD_TESTS,
             "VSD future value Ŵ_k = L_{k+1} (counts z_{k+1} itself), not L_{k+2}"),
    # (α, reach and future value without stop-gradient is no mutant: the fused ops take their
    # row weights as constants — their backward returns no weight gradient.)
    Mutation("vsd_baseline_not_subtracted", "vsd_ext/training/vsd_sampled.py",
             "(value - base[..., None]) / cfg.paths", "value / cfg.paths", VSD_TESTS,
             "VSD score-function term without its per-context baseline"),
    Mutation("vsd_soft_targets_at_T1", "vsd_ext/training/vsd_sampled.py",
             "beta_w[keep], kl_w[keep],\n                                     cfg.temperature)",
             "beta_w[keep], kl_w[keep],\n                                     1.0)", VSD_TESTS,
             "VSD T > 0 M-step: q and the target's soft targets at T = 1, not the run's T"),
    Mutation("vsd_alpha_at_T1", "vsd_ext/training/vsd_sampled.py",
             "logp = torch.log_softmax(logits[:, :, :K].float() / T, -1)",
             "logp = torch.log_softmax(logits[:, :, :K].float(), -1)", VSD_TESTS,
             "VSD E-step: acceptance α uses the target at T = 1, not the run's T"),
    Mutation("vsd_greedy_tree_ranking", "vsd_ext/training/vsd_greedy.py",
             "return draft_logits(drafter, h) / self.t_r", "return draft_logits(drafter, h)",
             ("tests/test_training.py",),
             "VSD T = 0: the E-step's tree ranked differently (no ranking temperature below "
             "level 1) from the decoder's"),
    Mutation("vsd_greedy_future_value_off_by_one", "vsd_ext/training/weights.py",
             "(n - k[None] - 1).double()", "(n - k[None]).double()",
             ("tests/test_training_weights.py",) + VSD_TESTS,
             "VSD T = 0 rows weighted 1 + (n − k) instead of 1 + (n − k − 1)"),
    Mutation("kl_direction_flipped", "csrc/weighted_ce_div_math.h",
             "-neg_inf<A>() : q * (lq - lp);", "-neg_inf<A>() : exp(lp) * (lp - lq);",
             ("tests/test_weighted_divergence.py",),
             "the fused divergence computes KL(p ‖ q) instead of KL(q ‖ p)"),
    # ---- ops (C++) -------------------------------------------------------------------------
    Mutation("tree_attn_query_tile_offset", "csrc/tree_attention_cpu.cpp",
             "cpu::mask_tree_scores(s.data(), n, R, G, n0, mask",
             "cpu::mask_tree_scores(s.data(), n, R, G, 0, mask",
             ("tests/test_tree_attention.py",), "tree mask read from the first query tile's rows"),
    Mutation("tree_attn_prefix_last_key", "csrc/tree_attention_cpu.cpp",
             "std::min(cpu::kKeyTile, lens[b] - j0), false);",
             "std::min(cpu::kKeyTile, lens[b] - j0 - 1), false);",
             ("tests/test_tree_attention.py",), "each prefix tile drops its last cached key"),
    Mutation("tree_attn_shared_dv_sum", "csrc/tree_attention_backward_cpu.cpp",
             "cpu::gemm(n, D, R, s.data(), 1, n, dos.data(), D, dv.data(), D, true);",
             "cpu::gemm(n, D, R, s.data(), 1, n, dos.data(), D, dv.data(), D, false);",
             ("tests/test_tree_attention.py",),
             "shared-cache dV keeps only the last row instead of the sum over rows"),
    Mutation("wce_soft_grad_sign", "csrc/weighted_ce_rows_cpu.cpp",
             "out[i] = a * fast_exp(z[i] - lse) - c * fast_exp(u[i] - lse_u);",
             "out[i] = a * fast_exp(z[i] - lse) + c * fast_exp(u[i] - lse_u);",
             ("tests/test_weighted_ce.py",), "soft-target gradient with the wrong sign (fp32 / "
             "fp16 / bf16 logits)"),
    Mutation("wce_lse_grad_dropped", "csrc/weighted_ce_math.h",
             "return {c + gl, c};", "return {c, c};", ("tests/test_weighted_ce.py",),
             "the gradient through lse (z-loss) is dropped"),
    Mutation("verify_residual_not_renormalized", "csrc/verify_tree_math.h",
             "return e_c > 0.0 && u * (total - rejected) < e_c;",
             "return e_c > 0.0 && u * total < e_c;", ("tests/test_verify_tree.py",),
             "target_only: siblings after a rejection accepted against p, not the residual"),
    Mutation("verify_residual_swapped", "csrc/verify_tree_rows_cpu.h",
             "_mm256_max_pd(_mm256_sub_pd(rn, qn), zero)",
             "_mm256_max_pd(_mm256_sub_pd(qn, rn), zero)", ("tests/test_verify_tree.py",),
             "sampled: residual max(q - r, 0) instead of max(r - q, 0) (AVX2 path)"),
]


def run(cmd, cwd, env=None, timeout=None, log=None) -> tuple[int, str]:
    """(returncode, output) of a command; 124 on timeout."""
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
        out = done.stdout + done.stderr
        code = done.returncode
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) \
            else (err.stdout or "")
        code = 124
    if log is not None:
        log.write_text(out)
    return code, out


def sync_scratch(scratch: Path) -> None:
    """Copy the working tree's tracked and untracked (not ignored) files into ``scratch``,
    only those whose contents differ (unchanged files keep their times: incremental builds)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src, dst = ROOT / rel, scratch / rel
        if not src.is_file():
            continue
        if dst.is_file() and dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def build_env() -> dict:
    env = dict(os.environ, VSD_EXT_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "1"))
    env.pop("PYTHONPATH", None)
    return env


def build(scratch: Path, log: Path) -> bool:
    """Incremental CPU-only in-place build of vsd_ext._C in the scratch copy."""
    code, _ = run([sys.executable, "setup.py", "build_ext", "--inplace"], scratch, build_env(),
                  log=log)
    return code == 0


def run_tests(scratch: Path, tests, timeout: int, log: Path, deselect=()) -> tuple[int, str]:
    """pytest on ``tests`` in the scratch copy (stop at the first failure), without the node
    ids in ``deselect``; returns (returncode, first failing test or '')."""
    env = dict(build_env(), PYTHONPATH=str(scratch))
    skip = [arg for node in deselect for arg in ("--deselect", node)]
    code, out = run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                     *tests, *skip], scratch, env, timeout, log)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    return code, failed[0] if failed else ("timeout" if code == 124 else "")


def check(mutation: Mutation, scratch: Path, args, logs: Path) -> dict:
    """Apply one mutation in the scratch copy, rebuild if needed, run its tests, restore."""
    path = scratch / mutation.path
    source = path.read_text()
    start = time.perf_counter()
    if source.count(mutation.old) != 1:
        return {"result": "stale", "detail": f"text found {source.count(mutation.old)} times",
                "seconds": 0.0}
    path.write_text(source.replace(mutation.old, mutation.new))
    try:
        if mutation.cpp and not build(scratch, logs / f"{mutation.name}.build.log"):
            return {"result": "no-build", "detail": "the mutant does not compile",
                    "seconds": time.perf_counter() - start}
        code, first = run_tests(scratch, mutation.tests, args.timeout,
                                logs / f"{mutation.name}.pytest.log", args.deselect)
    finally:
        path.write_text(source)
    result = "caught" if code != 0 else "MISSED"
    return {"result": result, "detail": first, "seconds": time.perf_counter() - start}


def print_table(rows) -> None:
    width = max(len(m.name) for m, _ in rows)
    print(f"\n{'mutation':{width}}  {'file':38}  {'result':8}  {'s':>5}  first failing test")
    print(f"{'-' * width}  {'-' * 38}  {'-' * 8}  {'-' * 5}  {'-' * 40}")
    for m, r in rows:
        print(f"{m.name:{width}}  {m.path:38}  {r['result']:8}  {r['seconds']:5.0f}  "
              f"{r['detail']}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="only", default="", help="mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH,
                        help=f"scratch copy, kept between runs (default {DEFAULT_SCRATCH})")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per test run")
    parser.add_argument("--tests", nargs="+", metavar="TEST",
                        help="run these tests (files or node ids) instead of each mutation's own")
    parser.add_argument("--deselect", nargs="+", default=[], metavar="NODEID",
                        help="leave out these tests (ones that fail unmutated for a known reason, "
                        "e.g. tests/test_tau_floors.py::test_floors_are_recorded_for_the_shipped_"
                        "weights between shipping new drafters and re-recording); reported")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the check that the selected tests pass unmutated")
    return parser.parse_args(argv)


def prepare(args) -> Path:
    """Sync and build the scratch copy; optionally check the unmutated tests pass."""
    args.scratch.mkdir(parents=True, exist_ok=True)
    logs = args.scratch / "mutation_logs"
    logs.mkdir(exist_ok=True)
    sync_scratch(args.scratch)
    t0 = time.perf_counter()
    if not build(args.scratch, logs / "baseline.build.log"):
        sys.exit(f"the unmutated scratch copy does not build: {logs / 'baseline.build.log'}")
    print(f"scratch copy {args.scratch} built ({time.perf_counter() - t0:.0f} s)", flush=True)
    return logs


def main(argv=None) -> int:
    args = parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only in m.name]
    if args.tests:
        chosen = [replace(m, tests=tuple(args.tests)) for m in chosen]
    if args.list:
        for m in chosen:
            print(f"{m.name:32s} {m.path:38s} {' '.join(m.tests)}\n{'':32s} {m.what}")
        return 0
    if not chosen:
        sys.exit(f"no mutation name contains {args.only!r} (see --list)")
    start = time.perf_counter()
    logs = prepare(args)
    if not args.no_baseline:
        tests = sorted({t for m in chosen for t in m.tests})
        code, first = run_tests(args.scratch, tests, args.timeout, logs / "baseline.pytest.log",
                                args.deselect)
        print(f"unmutated tests: {'pass' if code == 0 else 'FAIL ' + first} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        if code != 0:
            sys.exit(f"fix the unmutated tests first: {logs / 'baseline.pytest.log'}")
    rows = []
    for m in sorted(chosen, key=lambda m: (m.cpp, m.path)):  # Python first: one .so rebuild
        result = check(m, args.scratch, args, logs)
        rows.append((m, result))
        print(f"{m.name:32s} {result['result']:8s} {result['seconds']:5.0f} s  {result['detail']}",
              flush=True)
    if any(m.cpp for m in chosen):
        build(args.scratch, logs / "restore.build.log")  # leave the scratch .so unmutated
    print_table(rows)
    caught = sum(r["result"] == "caught" for _, r in rows)
    if args.deselect:
        print(f"\ndeselected (not run): {' '.join(args.deselect)}")
    print(f"\nscore: {caught}/{len(rows)} caught = {100 * caught / max(len(rows), 1):.0f}%  "
          f"(total {(time.perf_counter() - start) / 60:.1f} min; logs in {logs})")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
