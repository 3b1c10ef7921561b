"""The method comparison of the VSD issue: EAGLE-3 vs VSD on one target, same data, paired.

Protocol (decided before running; docs/results/ has each run's exact command and figures):

1. data      `--rows` corpus rows (`drafter` files) answered by the target at T = 1, plus
             held-out rows and prompts from the `tune` files (`regenerated_corpus_splits`).
2. base      one EAGLE-3 drafter from scratch, `--base-steps` optimizer steps, cosine
             schedule; its τ on tune prompts every `--base-eval-every` steps is the plateau
             check (train_log.jsonl).
3. arms      per seed, fine-tunes of the base for `--fine-steps` equal steps (fresh AdamW,
             warmup then cosine, `--fine-lr`): `eagle3` (more EAGLE-3), `vsd_t0` (VSD with
             its greedy E-step), `vsd_t1` (VSD at T = 1), and ablations (`ARMS`).
4. calibrate per run, its decode settings by the library's procedure
             (`vsd_ext.calibrate_drafter`: per-depth acceptance and the ranking temperature
             of top-k trees by τ at T = 0) on mid-file windows of the `tune` files.
5. evaluate  τ = accepted + 1 per target forward of real decoding (`vsd_ext.generate`, B = 1,
             `--new-tokens` per prompt, tree depth / top-k / nodes as given) on the fixed
             evaluation set (`--eval-set`, mid-file windows of held-out files) at T = 0 and
             T = 1 (sampled trees, verified against q), each run with its own calibrated
             ranking temperature (and at T = 0 with t_r = 1: the "no calibration" ablation).
6. report    per arm and temperature: τ mean and 95% CI; the paired ratio
             τ(arm) / τ(eagle3) per seed, its mean with a t-interval over seeds and a
             paired bootstrap over (seed, prompt) pairs; steps and seconds per step.

Everything is resumable: finished stages are reused (re-run the same command).

    python python/compare_methods.py --out runs/protocol --seeds 0 1 2 3 4
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228}
TEMPERATURES = (0.0, 1.0)
# arm -> (method, TrainConfig overrides). VSD's defaults are docs/design/METHOD.md's.
ARMS = {
    "eagle3": ("eagle3", []),
    "vsd_t0": ("vsd", ["vsd.temperature=0"]),
    "vsd_t1": ("vsd", ["vsd.temperature=1"]),
    "vsd_t0-nofuture": ("vsd", ["vsd.temperature=0", "vsd.future_value=false"]),
    "vsd_t0-notree": ("vsd", ["vsd.temperature=0", "vsd.lambda_tree=0"]),
    "vsd_t1-nofuture": ("vsd", ["vsd.temperature=1", "vsd.future_value=false"]),
    "vsd_t1-nobaseline": ("vsd", ["vsd.temperature=1", "vsd.baseline=none"]),
    "vsd_t1-nokl": ("vsd", ["vsd.temperature=1", "vsd.lambda_kl=0"]),
    "vsd_t1-realized": ("vsd", ["vsd.temperature=1", "vsd.reach=realized"]),
    "vsd_t1-tree1": ("vsd", ["vsd.temperature=1", "vsd.lambda_tree=1"]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--target", default="default")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--arms", nargs="+", default=["eagle3", "vsd_t0", "vsd_t1"],
                   choices=sorted(ARMS))
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--base-steps", type=int, default=2000)
    p.add_argument("--base-lr", type=float, default=2e-3)
    p.add_argument("--base-eval-every", type=int, default=250)
    p.add_argument("--fine-steps", type=int, default=300)
    p.add_argument("--fine-lr", type=float, default=5e-4)
    p.add_argument("--depth", type=int, default=5, help="tree depth = EAGLE-3 unroll")
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--nodes", type=int, default=24)
    p.add_argument("--eval-set", default="heldout_midfile_v1")
    p.add_argument("--tune-prompts", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--eval-seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stage", choices=["train", "eval", "all"], default="all",
                   help="train only, evaluate only (finished runs), or both")
    return p.parse_args(argv)


# ---- training ---------------------------------------------------------------------------
def build_data(args, out: Path) -> Path:
    path = out / "data.pt"
    if not path.is_file():
        from vsd_ext.models import load_target
        from vsd_ext.training.data import regenerated_corpus_splits

        target = load_target(args.target, dtype=torch.bfloat16)
        splits = regenerated_corpus_splits(target, args.seq_len, args.rows, heldout_rows=64,
                                           progress=True)
        splits.save(path)
    return path


def run_train(args, run: Path, method: str, seed: int, steps: int, lr: float, data: Path,
              init: Path | None = None, overrides=(), eval_every: int = 0) -> Path:
    if (run / "summary.json").is_file():
        return run
    cmd = [sys.executable, "-m", "vsd_ext", "train", "--target", args.target,
           "--method", method, "--out", str(run), "--data", str(data), "--seed", str(seed),
           "--max-steps", str(steps), "--schedule", "cosine", "--lr", str(lr),
           "--warmup-steps", "20", "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--precision", "bf16", "--save-every", "25",
           "--eval-every", str(eval_every), "--no-progress",
           "--set", f"eagle3.steps={args.depth}", "--set", f"vsd.depth={args.depth}",
           "--set", f"vsd.tree_topk={args.topk}", "--set", f"vsd.tree_nodes={args.nodes}"]
    for kv in overrides:
        cmd += ["--set", kv]
    if init is not None:
        cmd += ["--init", str(init)]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return run


# ---- calibration and evaluation ---------------------------------------------------------
def prompt_sets(target, args) -> dict:
    """Token ids of the tune prompts (calibration) and of the evaluation set."""
    from vsd_ext import corpus
    from vsd_ext.eval import read_prompts_jsonl
    from vsd_ext.eval.harness import PROMPT_DIR

    path = PROMPT_DIR / f"{args.eval_set}.jsonl"
    encode = target.tokenizer.encode
    return {"tune": [encode(t).ids for t in corpus.tune_prompts(args.tune_prompts)],
            "eval": [encode(t).ids for t in read_prompts_jsonl(path)]}


def decode_taus(target, drafter, prompts, temperature, ranking, args) -> list[float]:
    """τ of each prompt (B = 1), `--new-tokens` each, EOS ignored, the fixed evaluation tree
    (no cost model, no per-step sizing) ranked at `ranking`."""
    from vsd_ext.decoding import TreeConfig, generate

    tree = TreeConfig(args.depth, args.topk, args.nodes, sampled=temperature > 0,
                      ranking_temperature=ranking, adaptive=False)
    taus = []
    for i, ids in enumerate(prompts):
        gen = torch.Generator().manual_seed(args.eval_seed * 100_003 + i)
        out = generate(target, drafter, ids, args.new_tokens, temperature=temperature,
                       tree=tree, generator=gen, ignore_eos=True, decode_settings=None)
        taus.append(out.stats["tau"])
    return taus


def calibrate_run(args, run: Path, prompts: dict, target) -> None:
    """The run's decode settings (`decode_settings.json`) by the library's procedure
    (`vsd_ext.calibrate_drafter`, the one the shipped drafters get) on the tune prompts."""
    from vsd_ext.decoding.calibrate import calibrate_drafter

    if not (run / "decode_settings.json").is_file():
        calibrate_drafter(target, run, prompts["tune"], dtype=torch.bfloat16,
                          max_new_tokens=args.new_tokens,
                          prompts_source=f"vsd_ext.corpus.tune_prompts({args.tune_prompts})")


def evaluate_run(args, run: Path, prompts: dict, target) -> dict:
    path = run / ("eval.json" if args.eval_set == "heldout_midfile_v1"
                  else f"eval_{args.eval_set}.json")
    settings = {"eval_set": args.eval_set, "new_tokens": args.new_tokens,
                "tree": [args.depth, args.topk, args.nodes], "calibration": "calibrate_drafter",
                "eval_seed": args.eval_seed, "tune_prompts": args.tune_prompts}
    if path.is_file() and json.loads(path.read_text()).get("settings") == settings:
        return json.loads(path.read_text())
    from vsd_ext.models import load_drafter

    calibrate_run(args, run, prompts, target)
    drafter = load_drafter(run, target, dtype=torch.bfloat16)  # reads its decode settings
    ranking = drafter.decode_settings.ranking_temperature
    summary = json.loads((run / "summary.json").read_text())
    result = {"settings": settings, "ranking_temperature": ranking,
              "steps": summary["steps"], "train_seconds": summary["train_seconds"]}
    for T in TEMPERATURES:
        result[f"tau_T{T:g}"] = decode_taus(target, drafter, prompts["eval"], T, ranking, args)
        if T == 0 and ranking != 1.0:  # sampled trees (T > 0) do not rank
            result[f"tau_T{T:g}_uncalibrated"] = decode_taus(target, drafter, prompts["eval"],
                                                             T, 1.0, args)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---- report -----------------------------------------------------------------------------
def mean_ci(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T_975.get(n - 1, 1.96) * sd / math.sqrt(n)


def paired_bootstrap(arm: dict, base: dict, resamples: int = 4000) -> tuple[float, float]:
    """95% percentile interval of Σ τ_arm / Σ τ_base over (seed, prompt) pairs, resampling
    prompts within each seed (same prompts for both: paired)."""
    gen = torch.Generator().manual_seed(0)
    ratios = torch.zeros(resamples, dtype=torch.float64)
    num = torch.zeros(resamples, dtype=torch.float64)
    den = torch.zeros(resamples, dtype=torch.float64)
    for seed in arm:
        a = torch.tensor(arm[seed], dtype=torch.float64)
        b = torch.tensor(base[seed], dtype=torch.float64)
        idx = torch.randint(0, len(a), (resamples, len(a)), generator=gen)
        num += a[idx].sum(1)
        den += b[idx].sum(1)
    ratios = num / den
    return float(ratios.quantile(0.025)), float(ratios.quantile(0.975))


def report(args, results: dict, out: Path) -> None:
    lines = [f"τ = accepted + 1 per target forward; eval set `{args.eval_set}`, "
             f"{args.new_tokens} new tokens, B = 1, tree depth {args.depth} / top-k "
             f"{args.topk} / {args.nodes} nodes, each run with its calibrated ranking "
             f"temperature; base {args.base_steps} steps, fine-tunes {args.fine_steps} steps "
             f"(lr {args.fine_lr:g}); seeds {args.seeds}.", "",
             "| arm | T | τ mean ± 95% CI (seeds) | τ / eagle3 per seed | ratio mean ± CI "
             "| paired bootstrap 95% | s/step |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for arm in args.arms:
        for T in TEMPERATURES:
            key = f"tau_T{T:g}"
            taus = {s: results[s][arm][key] for s in args.seeds}
            base = {s: results[s]["eagle3"][key] for s in args.seeds}
            pooled = [sum(v) / len(v) for v in taus.values()]
            ratios = [sum(taus[s]) / sum(base[s]) for s in args.seeds]
            mean, ci = mean_ci(pooled)
            rmean, rci = mean_ci(ratios)
            lo, hi = paired_bootstrap(taus, base)
            sps = sum(results[s][arm]["train_seconds"] / results[s][arm]["steps"]
                      for s in args.seeds) / len(args.seeds)
            summary[f"{arm} {key}"] = {"tau": [mean, ci], "ratio": [rmean, rci],
                                       "ratio_per_seed": ratios, "bootstrap95": [lo, hi],
                                       "seconds_per_step": sps}
            lines.append(f"| {arm} | {T:g} | {mean:.3f} ± {ci:.3f} | "
                         + ", ".join(f"{r:.3f}" for r in ratios)
                         + f" | {rmean:.3f} ± {rci:.3f} | [{lo:.3f}, {hi:.3f}] | {sps:.2f} |")
    lines += ["", "Ranking calibration (T = 0): τ with the run's calibrated t_r against t_r = 1.",
              "", "| arm | t_r per seed | τ calibrated | τ at t_r = 1 | paired bootstrap 95% |",
              "|---|---|---|---|---|"]
    for arm in args.arms:
        runs = [results[s][arm] for s in args.seeds]
        cal = {s: results[s][arm]["tau_T0"] for s in args.seeds}
        raw = {s: results[s][arm].get("tau_T0_uncalibrated", cal[s]) for s in args.seeds}
        lo, hi = paired_bootstrap(cal, raw)
        lines.append(f"| {arm} | {', '.join(str(r['ranking_temperature']) for r in runs)} | "
                     f"{sum(map(sum, cal.values())) / sum(map(len, cal.values())):.3f} | "
                     f"{sum(map(sum, raw.values())) / sum(map(len, raw.values())):.3f} | "
                     f"[{lo:.3f}, {hi:.3f}] |")
    text = "\n".join(lines) + "\n"
    suffix = "" if args.eval_set == "heldout_midfile_v1" else f"_{args.eval_set}"
    (out / f"results{suffix}.md").write_text(text)
    everything = {"settings": vars(args), "summary": summary, "runs": results}
    (out / f"results{suffix}.json").write_text(json.dumps(everything, indent=2) + "\n")
    print(text)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(args, out)
    base = run_train(args, out / "eagle3_base", "eagle3", 0, args.base_steps, args.base_lr,
                     data, eval_every=args.base_eval_every)
    runs = {}
    for seed in args.seeds:
        for arm in args.arms:
            method, overrides = ARMS[arm]
            run = out / f"seed{seed}" / arm
            if args.stage != "eval":
                run_train(args, run, method, seed, args.fine_steps, args.fine_lr, data, base,
                          overrides)
            runs[(seed, arm)] = run
    if args.stage == "train":
        return
    from vsd_ext.models import load_target

    target = load_target(args.target)
    prompts = prompt_sets(target, args)
    results = {s: {} for s in args.seeds}
    for (seed, arm), run in runs.items():
        t0 = time.time()
        results[seed][arm] = evaluate_run(args, run, prompts, target)
        print(f"evaluated {run} in {time.time() - t0:.0f} s", flush=True)
    if "eagle3" in args.arms:
        report(args, results, out)


if __name__ == "__main__":
    main()
