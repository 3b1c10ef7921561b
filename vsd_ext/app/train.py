"""`vsd train`: train a drafter for a target (eagle3 | auf | vsd), resumable, torchrun-ready.

    vsd train --target DIR|default --method vsd --out runs/vsd --init runs/eagle3 \\
              --max-steps 2000 [--data FILE] [--seed N] [--regenerate] [--max-minutes M]
    torchrun --nproc-per-node 2 -m vsd_ext train ...      (data parallel; --fsdp-target)

Every `TrainConfig` field is reachable: common ones have flags, any other (nested ones too)
with `--set vsd.lambda_kl=0.2 --set eagle3.steps=5` (values parsed as JSON, else strings),
or a JSON file of fields with `--config FILE` (flags and --set override it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..training.config import TrainConfig
from ..training.trainer import train_drafter

FLAGS = {  # flag -> (TrainConfig field, type, help)
    "--method": ("method", str, "eagle3 | auf | vsd"),
    "--max-steps": ("max_steps", int, "optimizer steps (the schedule's horizon)"),
    "--data": ("data", str, "JSONL of texts/chats, or a .pt dataset (default: built-in corpus)"),
    "--seed": ("seed", int, "seed of the drafter init, batch order and sampling"),
    "--max-minutes": ("max_minutes", float, "training-time budget (evaluation excluded)"),
    "--budget-clock": ("budget_clock", str, "wall | process (CPU time: fair on a shared machine)"),
    "--stop-after-steps": ("stop_after_steps", int, "end this run early (resumable)"),
    "--batch-size": ("batch_size", int, "sequences per optimizer step, all processes"),
    "--micro-batch-size": ("micro_batch_size", int, "sequences per forward per process"),
    "--seq-len": ("seq_len", int, "tokens per training row"),
    "--lr": ("lr", float, "peak learning rate (AdamW)"),
    "--warmup-steps": ("warmup_steps", int, "linear warmup steps"),
    "--schedule": ("schedule", str, "cosine | constant"),
    "--precision": ("precision", str, "auto | fp32 | bf16"),
    "--draft-vocab-size": ("draft_vocab_size", int, "reduced draft vocabulary (fresh drafters)"),
    "--regenerate-rows": ("regenerate_rows", int, "rows to regenerate (default: all)"),
    "--eval-every": ("eval_every", int, "steps between evaluations (0: never)"),
    "--save-every": ("save_every", int, "steps between checkpoints"),
}


def add_train_command(sub) -> None:
    train = sub.add_parser("train", help="train a drafter (eagle3 | auf | vsd)",
                           description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--target", default="default",
                       help="Hugging Face checkpoint directory, or 'default' (embedded target)")
    train.add_argument("--out", required=True, help="output directory (resumed if it holds a "
                                                    "checkpoint of the same run)")
    train.add_argument("--init", help="drafter directory to start from (e.g. an eagle3 run)")
    train.add_argument("--regenerate", action="store_true",
                       help="train on the target's own responses to the data's prompts")
    train.add_argument("--fsdp-target", action="store_true",
                       help="shard the frozen target's layers over the torchrun processes")
    train.add_argument("--config", help="JSON file of TrainConfig fields")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any TrainConfig field, dotted for nested ones (repeatable)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    for flag, (_, kind, text) in FLAGS.items():
        train.add_argument(flag, type=kind, help=text)
    train.set_defaults(func=run_train)


def _assign(values: dict, key: str, raw: str) -> None:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    *path, last = key.split(".")
    node = values
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {part} is not a nested config")
    node[last] = value


def config_from_args(args):
    values = TrainConfig().to_dict()
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ValueError(f"--config {path}: no such file")
        for key, value in json.loads(path.read_text()).items():
            _assign(values, key, json.dumps(value))
    for flag, (field, _, _) in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            values[field] = value
    if args.regenerate:
        values["regenerate"] = True
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        _assign(values, key, raw)
    return TrainConfig.from_dict(values).validate()


def run_train(args) -> int:
    config = config_from_args(args)
    train_drafter(args.target, args.out, config, init=args.init,
                  fsdp_target=args.fsdp_target, progress=not args.no_progress)
    return 0
