"""Compare drafter training methods on one target: eagle3, auf and vsd, same data, same budget.

Per seed, with budgets in minutes of training time (evaluation excluded; `--clock process`
counts the trainer's CPU time, which is fair when the machine is shared, and `--threads 1`
keeps idle threads from spin-waiting on that clock):

    eagle3_base   eagle3 from scratch for B minutes
    eagle3        eagle3_base fine-tuned for E more minutes (--init, fresh optimizer)
    vsd           eagle3_base fine-tuned with VSD for the same E minutes (--init)
    auf           auf from scratch for B + E minutes

then τ (accepted + 1 per target forward) of real speculative decoding (`vsd_ext.generate`,
EAGLE-2 dynamic trees: depth 5, top-k 4, 24 nodes) on held-out prompts at T = 0 (top-k
tree, greedy verification) and T = 1 (trees sampled from the drafter, verified against its
q). Everyone trains on the same dataset: the built-in corpus's prompts answered by the
target itself (regenerated once, `data.pt`). Runs resume after interruption (re-run the
same command); finished runs and evaluations are reused.

Writes `<out>/results.json` and `<out>/results.md` (mean ± 95% t-interval over seeds, and
the per-seed paired ratio vsd / eagle3).

    nice python python/compare_methods.py --out runs/compare --seeds 0 1 2 \\
        --base-minutes 4 --extra-minutes 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228}
TEMPERATURES = (0.0, 1.0)
EVAL_TREE = dict(depth=5, topk=4, total_tokens=24)


def build_data(args, out: Path) -> Path:
    """The shared dataset: corpus rows' first tokens, answered by the target (T = 1)."""
    path = out / "data.pt"
    if path.is_file():
        return path
    from vsd_ext.models import load_target
    from vsd_ext.training.data import regenerated_corpus_splits

    target = load_target(args.target)
    regenerated_corpus_splits(target, args.seq_len, args.rows, eval_prompts=args.eval_prompts,
                              progress=True).save(path)
    return path


def train(args, name: str, seed: int, method: str, minutes: float, data: Path, out: Path,
          init: Path | None = None, extra: list[str] = (), lr: float | None = None) -> Path:
    run = out / f"seed{seed}" / name
    if (run / "summary.json").is_file():
        return run
    cmd = [sys.executable, "-m", "vsd_ext", "train", "--target", args.target,
           "--method", method, "--out", str(run), "--data", str(data), "--seed", str(seed),
           "--max-minutes", str(minutes), "--budget-clock", args.clock,
           "--max-steps", "1000000", "--schedule", "constant", "--lr", str(lr or args.lr),
           "--warmup-steps", "10", "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--save-every", "5", "--no-progress",
           "--set", f"eagle3.steps={args.steps}", "--set", f"auf.steps={args.steps}",
           "--set", f"vsd.depth={args.steps}", *extra]
    if init is not None:
        cmd += ["--init", str(init)]
    elif args.draft_vocab:
        cmd += ["--draft-vocab-size", str(args.draft_vocab)]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return run


def eval_prompts(target, count: int) -> list[list[int]]:
    """The first `count` held-out prompts of the corpus (first lines of held-out files, at
    most 96 tokens; the same list `data.pt` starts with)."""
    from vsd_ext import corpus

    texts = corpus.prompts("heldout", limit=count)
    return [p[:96] for p in corpus.encode_texts(target.tokenizer, texts)]


def evaluate(args, run: Path) -> dict:
    from vsd_ext.decoding import TreeConfig
    from vsd_ext.models import load_drafter, load_target
    from vsd_ext.training.config import TrainConfig
    from vsd_ext.training.data import DataSplits
    from vsd_ext.training.evaluate import decode_tau, heldout_kl
    from vsd_ext.training.objective import TrainStep

    settings = {"eval_prompts": args.eval_prompts, "eval_new_tokens": args.eval_new_tokens,
                "eval_seed": args.eval_seed, "tree": EVAL_TREE}
    path = run / "eval.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("settings") == settings:
            return cached
    target = load_target(args.target)
    drafter = load_drafter(run, target)
    splits = DataSplits.load(Path(args.out) / "data.pt")
    prompts = eval_prompts(target, args.eval_prompts)
    step = TrainStep(drafter, target, TrainConfig())
    result = {"settings": settings,
              "steps": json.loads((run / "summary.json").read_text())["steps"],
              "heldout_kl": heldout_kl(step, splits.heldout)}
    for t in TEMPERATURES:
        stats = decode_tau(target, drafter, prompts, t, args.eval_new_tokens,
                           TreeConfig(**EVAL_TREE), seed=args.eval_seed)
        result[f"tau_T{t:g}"] = stats["tau"]
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def mean_ci(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T_975.get(n - 1, 1.96) * sd / math.sqrt(n)


def report(args, results: dict, out: Path) -> None:
    methods = ["eagle3_base", *[m for m in ("eagle3", "auf", "vsd") if m in args.methods]]
    rows, summary = [], {}
    for m in methods:
        for t in TEMPERATURES:
            key = f"tau_T{t:g}"
            vals = [results[s][m][key] for s in args.seeds]
            mean, ci = mean_ci(vals)
            summary[f"{m} {key}"] = {"mean": mean, "ci95": ci, "per_seed": vals}
            rows.append(f"| {m} | {t:g} | {mean:.3f} ± {ci:.3f} | "
                        + ", ".join(f"{v:.3f}" for v in vals) + " |")
    for t in TEMPERATURES:
        key = f"tau_T{t:g}"
        ratios = [results[s]["vsd"][key] / results[s]["eagle3"][key] for s in args.seeds]
        mean, ci = mean_ci(ratios)
        summary[f"vsd/eagle3 {key}"] = {"mean": mean, "ci95": ci, "per_seed": ratios}
        rows.append(f"| vsd / eagle3 (paired) | {t:g} | {mean:.3f} ± {ci:.3f} | "
                    + ", ".join(f"{v:.3f}" for v in ratios) + " |")
    extra = ["", "| method | optimizer steps (mean) | held-out step-0 KL mean ± 95% CI |",
             "|---|---|---|"]
    for m in methods:
        steps = [results[s][m]["steps"] for s in args.seeds]
        mean, ci = mean_ci([results[s][m]["heldout_kl"] for s in args.seeds])
        summary[f"{m} heldout_kl"] = {"mean": mean, "ci95": ci}
        extra.append(f"| {m} | {sum(steps) / len(steps):.0f} | {mean:.4f} ± {ci:.4f} |")
    (out / f"results{args.tag}.json").write_text(json.dumps(
        {"settings": vars(args), "summary": summary, "runs": results}, indent=2) + "\n")
    table = ["| method | T | τ mean ± 95% CI | per seed |", "|---|---|---|---|", *rows]
    text = (f"τ = accepted + 1 per target forward, {args.eval_prompts} held-out prompts, "
            f"{args.eval_new_tokens} new tokens, tree depth 5 / top-k 4 / 24 nodes; "
            f"budgets {args.base_minutes} + {args.extra_minutes} min ({args.clock} clock), "
            f"lr {args.lr:g} (fine-tunes {args.extra_lr or args.lr:g}), "
            f"seeds {args.seeds}.\n\n" + "\n".join(table + extra) + "\n")
    (out / f"results{args.tag}.md").write_text(text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--target", default="default")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--base-minutes", type=float, default=4.0)
    p.add_argument("--extra-minutes", type=float, default=2.0)
    p.add_argument("--clock", default="process", choices=["wall", "process"])
    p.add_argument("--rows", type=int, default=512, help="regenerated training rows")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=5, help="unroll steps / VSD depth")
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="reduced draft vocabulary of fresh drafters (0: the target's)")
    p.add_argument("--eval-prompts", type=int, default=24)
    p.add_argument("--eval-new-tokens", type=int, default=64)
    p.add_argument("--eval-seed", type=int, default=7)
    p.add_argument("--vsd-set", action="append", default=None, metavar="KEY=VALUE",
                   help="TrainConfig overrides of the vsd runs (default: the settings of "
                        "vsd_ext.app.demo.VSD_SETTINGS except depth: 4 anchors x 4 paths, "
                        "lambda_tok 1, soft ARW targets; give 'none' for the defaults of "
                        "docs/design/METHOD.md)")
    p.add_argument("--methods", nargs="+", default=["eagle3", "auf", "vsd"],
                   choices=["eagle3", "auf", "vsd"], help="runs besides eagle3_base")
    p.add_argument("--vsd-name", default="vsd", help="run directory of the vsd runs (variants)")
    p.add_argument("--extra-lr", type=float, default=None,
                   help="learning rate of the eagle3 and vsd fine-tunes (default: --lr)")
    p.add_argument("--tag", default="",
                   help="suffix of the fine-tunes' run directories and of results.{json,md} "
                        "(variants next to the main runs)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per run (1: CPU time is compute, not spin-waiting)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(args, out)
    if args.vsd_set is None:
        args.vsd_set = ["vsd.anchors=4", "vsd.paths=4", "vsd.lambda_tok=1.0",
                        "vsd.arw_target=soft"]
    vsd_extra = [x for kv in args.vsd_set if kv != "none" for x in ("--set", kv)]
    results = {}
    for seed in args.seeds:
        base = train(args, "eagle3_base", seed, "eagle3", args.base_minutes, data, out)
        plan = {
            "eagle3": lambda: train(args, "eagle3" + args.tag, seed, "eagle3",
                                    args.extra_minutes, data, out, base, lr=args.extra_lr),
            "auf": lambda: train(args, "auf", seed, "auf", args.base_minutes + args.extra_minutes,
                                 data, out),
            "vsd": lambda: train(args, args.vsd_name + args.tag, seed, "vsd",
                                 args.extra_minutes, data, out, base, vsd_extra,
                                 lr=args.extra_lr),
        }
        runs = {"eagle3_base": base, **{m: plan[m]() for m in args.methods}}
        results[seed] = {name: evaluate(args, run) for name, run in runs.items()}
        print(json.dumps({seed: results[seed]}), flush=True)
    if {"eagle3", "vsd"} <= set(args.methods):
        report(args, results, out)


if __name__ == "__main__":
    main()
