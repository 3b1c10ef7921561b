"""Ship the default target's drafters from a finished method comparison
(`python/compare_methods.py`): each chosen run is exported into `vsd_ext/assets/` in bf16 with
the target's embedding (`save_pretrained(include_embedding=True)`), with its decode settings
(`decode_settings.json`, fitted by `vsd_ext.calibrate_drafter` during the comparison) and a
`training_info.json` that records how it was made: the base stage, the fine-tune, their
configurations, steps and seconds, and the comparison's τ on the evaluation set.

    python python/ship_drafters.py --protocol runs/protocol --seed 0 \
        --eagle3 eagle3 --vsd vsd_t1
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

import vsd_ext
from vsd_ext.models.checkpoint import DEFAULT_DRAFTERS

NAMES = {"eagle3": "default", "vsd": "default-vsd"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", required=True, help="compare_methods.py --out directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eagle3", default="eagle3", help="arm shipped as 'default'")
    p.add_argument("--vsd", default="vsd_t1", help="arm shipped as 'default-vsd'")
    p.add_argument("--command", default="", help="the comparison's command, recorded")
    return p.parse_args(argv)


def stage(run: Path) -> dict:
    """What one training run was: its summary (steps, seconds) and configuration."""
    summary = json.loads((run / "summary.json").read_text())
    return {"run": str(run), **{k: summary[k] for k in ("steps", "train_seconds")
                                if k in summary},
            "config": summary.get("config")}


def evaluation(run: Path) -> dict:
    """The comparison's τ of this run (mean over the evaluation prompts)."""
    path = run / "eval.json"
    if not path.is_file():
        return {}
    result = json.loads(path.read_text())
    out = {"settings": result["settings"], "ranking_temperature": result["ranking_temperature"]}
    for key, taus in result.items():
        if key.startswith("tau_"):
            out[key + "_mean"] = sum(taus) / len(taus)
    return out


def ship(target, kind: str, arm: str, args) -> Path:
    protocol = Path(args.protocol)
    run = protocol / f"seed{args.seed}" / arm
    drafter = vsd_ext.load_drafter(run, target, dtype=torch.float32)
    info = {"description": f"{kind} drafter for the embedded default target: an EAGLE-3 base "
                           f"trained from scratch, then fine-tuned as arm '{arm}' of the method "
                           f"comparison (python/compare_methods.py, seed {args.seed}; "
                           f"docs/results/). Weights in bf16 with the target's embedding as "
                           f"embed_tokens.weight; decode settings fitted by "
                           f"vsd_ext.calibrate_drafter on the tune prompts.",
            "command": args.command,
            "feature_layers": list(drafter.feature_layers),
            "stages": [stage(protocol / "eagle3_base"), stage(run)],
            "evaluation": evaluation(run)}
    final = DEFAULT_DRAFTERS[NAMES[kind]]
    with tempfile.TemporaryDirectory(dir=final.parent) as scratch:
        out = Path(scratch) / "drafter"
        drafter.save_pretrained(out, dtype=torch.bfloat16, include_embedding=True)
        shutil.copy(run / "decode_settings.json", out / "decode_settings.json")
        (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
        vsd_ext.load_drafter(out, target)  # loads and checks before it replaces anything
        if final.exists():
            shutil.rmtree(final)
        shutil.move(str(out), final)
    return final


def main(argv=None):
    args = parse_args(argv)
    target = vsd_ext.load_target("default")
    for kind, arm in (("eagle3", args.eagle3), ("vsd", args.vsd)):
        print(f"shipped {arm} as {NAMES[kind]}: {ship(target, kind, arm, args)}")


if __name__ == "__main__":
    main()
