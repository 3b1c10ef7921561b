"""`vsd demo`: the main job, end to end, offline, on the embedded default target.

    1. data      256 rows of the built-in corpus answered by the target itself (T = 1, the
                 target in bf16): the data that makes a drafter match its target
                 (`regenerated_corpus_splits`)
    2. train     the two shipped drafters — an EAGLE-3 base, then EAGLE-3
                 (`assets/default_drafter`) or VSD (`assets/default_drafter_vsd`) fine-tuning,
                 see their training_info.json — each trained further with its own method for
                 the same wall-clock budget on the same data: `eagle3` and `vsd` (the objective
                 of docs/design/METHOD.md)
    3. evaluate  autoregressive, eagle3 and vsd decoding at T = 0 and T = 1 on the fixed
                 held-out evaluation set (mid-file windows; `vsd_ext.eval.evaluate`: τ,
                 tokens/s, speedup, lossless check) with the library's default tree and each
                 drafter's decode settings
    4. report    the table on stdout, ``<out>/report.json`` and ``<out>/report.png``

`--minutes` per fine-tune, `--rows`, `--num-prompts` and `--max-new-tokens` scale it (the
README gives the time on the 2-core development machine). Every stage shows a progress bar.
Re-running with the same ``--out`` reuses finished stages (the dataset and finished
drafters), so an interrupted demo picks up where it stopped; ``--fresh`` starts over.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._version import __version__
from ..decoding import TreeConfig
from ..eval import evaluate, format_table, heldout_prompts, write_report
from ..models import load_drafter, load_target
from ..models.checkpoint import DEFAULT_DRAFTERS
from ..training.data import regenerated_corpus_splits
from ..training.trainer import train_drafter
from .arguments import check_length, count, positive_float, positive_int

# Training settings of the fine-tunes (those of the shipped drafter's own training, see
# vsd_ext/assets/default_drafter/training_info.json): short rows, a constant learning rate.
# The learning rate is a quarter of that training's: a fresh AdamW's first steps move every
# weight by about lr, which at 2e-3 costs a trained drafter more τ than a short fine-tune wins
# back.
FINE_TUNE = dict(seq_len=128, batch_size=8, lr=5e-4, schedule="constant", warmup_steps=5,
                 max_steps=1_000_000, budget_clock="wall", save_every=5)
SHIPPED = {"eagle3": "default", "vsd": "default-vsd"}  # the drafter each fine-tune starts from
UNROLL = 5  # eagle3 training-time-test steps = VSD path depth = the decoding chain's depth
# VSD settings of the shipped VSD drafter's fine-tune (docs/design/METHOD.md; its
# training_info.json): the E-step at T = 1, trees of the evaluation's shape.
VSD_SETTINGS = dict(depth=UNROLL, temperature=1.0, tree_topk=4, tree_nodes=24)


@dataclass
class DemoConfig:
    """out: output directory. minutes: wall-clock training budget of each fine-tune.
    rows: regenerated training rows. num_prompts / max_new_tokens: the evaluation.
    depth / topk / total_tokens: the draft tree; unset ones are left to the library's cost
    model (`TreeConfig()`: sized from measured step costs and each drafter's decode settings,
    what `vsd generate` does by default).
    threads: CPU threads of data and training (0: torch's default); eval_threads: of the
    timed decoding (1: fastest for the small default target, whose batch-1 steps are too
    short to share among threads). draft_dtype: the drafters' dtype while decoding
    ("bfloat16": faster drafting on CPUs with bf16 GEMMs; the target stays fp32 and decoding
    stays lossless). seed: training and sampling seed."""

    out: str = "runs/demo"
    minutes: float = 1.5
    rows: int = 256
    num_prompts: int = 24
    max_new_tokens: int = 64
    depth: int | None = None
    topk: int | None = None
    total_tokens: int | None = None
    threads: int = 0
    eval_threads: int = 1
    draft_dtype: str = "bfloat16"
    seed: int = 0
    fresh: bool = False
    progress: bool = True


def add_demo_command(sub) -> None:
    dflt = DemoConfig()
    demo = sub.add_parser("demo", help="the main job: fine-tune eagle3 and vsd drafters for the "
                                       "default target, evaluate them against autoregressive "
                                       "decoding at T = 0 and 1 (report.json + plot)")
    demo.add_argument("--out", default=dflt.out, help="output directory (reused when re-run)")
    demo.add_argument("--minutes", type=positive_float, default=dflt.minutes,
                      help="wall-clock training budget of each fine-tune")
    demo.add_argument("--rows", type=positive_int, default=dflt.rows,
                      help="regenerated training rows")
    demo.add_argument("--num-prompts", type=positive_int, default=dflt.num_prompts,
                      help="held-out prompts of the evaluation")
    demo.add_argument("--max-new-tokens", type=positive_int, default=dflt.max_new_tokens)
    demo.add_argument("--depth", type=positive_int, default=dflt.depth,
                      help="draft tree depth (default: the cost model's)")
    demo.add_argument("--topk", type=positive_int, default=dflt.topk,
                      help="children per expanded node (1: a chain; default: the cost model's)")
    demo.add_argument("--total-tokens", type=positive_int, default=dflt.total_tokens,
                      help="draft nodes verified per step (default: the cost model's)")
    demo.add_argument("--threads", type=count, default=dflt.threads,
                      help="CPU threads of data and training (0: torch's default)")
    demo.add_argument("--eval-threads", type=count, default=dflt.eval_threads,
                      help="CPU threads of the timed decoding (0: torch's default; 1 is "
                           "fastest for the small default target)")
    demo.add_argument("--draft-dtype", default=dflt.draft_dtype,
                      choices=["float32", "bfloat16", "float16"],
                      help="the drafters' dtype while decoding (the target stays fp32)")
    demo.add_argument("--seed", type=int, default=dflt.seed)
    demo.add_argument("--fresh", action="store_true",
                      help="start over (default: reuse the data and drafters in --out)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """`vsd demo`: exit status 0 when every method passed its lossless check."""
    fields = DemoConfig.__dataclass_fields__
    cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in fields},
                     progress=not args.no_progress)
    report = run(cfg)
    return 0 if all(r["lossless"] is not False for r in report["results"]) else 1


def _stage(number: int, text: str) -> None:
    print(f"\n[{number}/4] {text}", flush=True)


def build_data(target, cfg: DemoConfig, path: Path) -> Path:
    if path.is_file():
        print(f"reusing {path}")
        return path
    # The target answers in bf16 (about 3x faster on a CPU with bf16 GEMMs; the rows are
    # samples of the target at T = 1, up to bf16 rounding of its logits).
    fast = load_target("default", dtype=torch.bfloat16)
    splits = regenerated_corpus_splits(fast, FINE_TUNE["seq_len"], cfg.rows,
                                       progress=cfg.progress)
    splits.save(path)
    print(f"{len(splits.train)} training rows, {len(splits.heldout)} held-out rows -> {path}")
    return path


def fine_tune(target, method: str, data: Path, out: Path, cfg: DemoConfig):
    """Train the shipped `method` drafter further with `method` for `cfg.minutes` (wall)."""
    if (out / "summary.json").is_file():
        print(f"reusing {out}")
    else:
        train_drafter(target, out, method=method, data=str(data), seed=cfg.seed,
                      max_minutes=cfg.minutes, init=DEFAULT_DRAFTERS[SHIPPED[method]],
                      progress=cfg.progress, **FINE_TUNE,
                      eagle3={"steps": UNROLL}, vsd=VSD_SETTINGS)
        summary = json.loads((out / "summary.json").read_text())
        print(f"{method}: {summary['steps']} steps in {summary['train_seconds']:.0f} s -> {out}")
    return load_drafter(out, target, dtype=getattr(torch, cfg.draft_dtype))


def run(cfg: DemoConfig) -> dict:
    """The whole demo; returns the report dict (also written to ``<out>/report.json``)."""
    if cfg.draft_dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"draft_dtype: expected float32, bfloat16 or float16, got "
                         f"{cfg.draft_dtype!r}")
    start = time.perf_counter()
    out = Path(cfg.out)
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    target = load_target("default")
    prompts = heldout_prompts(cfg.num_prompts)
    check_length(target, [target.tokenizer.encode(t).ids for t in prompts], cfg.max_new_tokens)
    print(f"vsd demo: default target ({sum(p.numel() for p in target.parameters()) / 1e6:.2f} M "
          f"parameters), {torch.get_num_threads()} CPU threads, output in {out}")

    _stage(1, f"data: {cfg.rows} corpus rows answered by the target (T = 1)")
    data = build_data(target, cfg, out / "data.pt")

    drafters = {}
    for i, method in enumerate(("eagle3", "vsd"), 1):
        _stage(2, f"train ({i}/2): the shipped {method} drafter, {cfg.minutes:g} min more of "
                       f"{method}")
        drafters[method] = fine_tune(target, method, data, out / f"drafter_{method}", cfg)

    tree = TreeConfig(depth=cfg.depth, topk=cfg.topk, total_tokens=cfg.total_tokens)
    sizes = ("the default tree (the cost model's, each drafter's decode settings)"
             if not tree.is_sized else
             f"tree depth {tree.depth} / topk {tree.topk} / {tree.total_tokens} nodes")
    _stage(3, f"evaluate: {cfg.num_prompts} held-out prompts (mid-file windows) x "
              f"{cfg.max_new_tokens} tokens, T = 0 and T = 1, {sizes}, {cfg.draft_dtype} "
              f"drafters")
    results = evaluate(target, drafters, prompts,
                       temperatures=(0.0, 1.0), max_new_tokens=cfg.max_new_tokens, tree=tree,
                       seeds=(cfg.seed,), threads=cfg.eval_threads or None,
                       progress=cfg.progress)

    _stage(4, "report")
    print(format_table(results), flush=True)
    by = {(r["method"], r["temperature"]): r for r in results}
    for t in (0.0, 1.0):
        ratio = by[("vsd", t)]["tau"] / by[("eagle3", t)]["tau"]
        print(f"T = {t:g}: tau vsd / eagle3 = {ratio:.3f}; speedup over autoregressive: "
              f"eagle3 {by[('eagle3', t)]['speedup']:.2f}x, vsd {by[('vsd', t)]['speedup']:.2f}x")
    extra = {"command": "vsd demo", "config": asdict(cfg),
             "threads": torch.get_num_threads(), "torch": torch.__version__,
             "vsd_ext": __version__, "seconds": time.perf_counter() - start}
    paths = write_report(results, out, extra)
    minutes = (time.perf_counter() - start) / 60
    print(f"\nwrote {paths['json']} and {paths['plot']} ({minutes:.1f} min in all)")
    return json.loads(paths["json"].read_text())
