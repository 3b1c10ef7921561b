"""Train drafters for the default target in Python: EAGLE-3 first, then VSD fine-tuned from it.

    python python/train_drafter.py --out runs/example --minutes 3

1. The data: rows of the built-in corpus answered by the target itself (what makes a drafter
   match its target), saved once as OUT/data.pt for both runs.
2. `vsd_ext.train_drafter(target, OUT/eagle3, method="eagle3", data=...)`: an EAGLE-3 drafter
   from scratch.
3. `vsd_ext.train_drafter(target, OUT/vsd, method="vsd", init=OUT/eagle3)`: the EM objective
   of docs/design/METHOD.md, starting from that drafter (every constant there is a `vsd`
   option).
4. τ of both at T = 0 and T = 1 (speculative decoding on held-out prompts).

Both runs save an EAGLE-3 checkpoint (`vsd_ext.load_drafter(dir, target)`) and resume exactly
when re-run after an interruption. The same from the shell: `vsd train --method eagle3 ...`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import vsd_ext
from vsd_ext.training.data import regenerated_corpus_splits


def tau(target, drafter, temperature: float, prompts) -> float:
    tree = vsd_ext.TreeConfig(depth=5, topk=1, total_tokens=5, sampled=temperature > 0)
    out = vsd_ext.generate(target, drafter, prompts, 48, temperature, tree, ignore_eos=True,
                           generator=torch.Generator().manual_seed(0))
    return out.stats["tau"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/example")
    parser.add_argument("--minutes", type=float, default=3.0, help="budget of each run")
    parser.add_argument("--rows", type=int, default=256, help="training rows regenerated")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)

    target = vsd_ext.load_target("default")
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data.pt"
    if not data.is_file():
        regenerated_corpus_splits(target, 128, args.rows, heldout_rows=8,
                                  progress=not args.no_progress).save(data)
    common = dict(data=str(data), seq_len=128, batch_size=8, lr=2e-3, max_minutes=args.minutes,
                  progress=not args.no_progress)
    eagle3 = vsd_ext.train_drafter(target, out / "eagle3", method="eagle3", **common)
    vsd = vsd_ext.train_drafter(target, out / "vsd", method="vsd", init=out / "eagle3",
                                **common)

    texts = vsd_ext.corpus.prompts("heldout", limit=4)
    prompts = [target.tokenizer.encode(t).ids[-64:] for t in texts]
    for name, drafter in (("eagle3", eagle3), ("vsd", vsd)):
        taus = {t: tau(target, drafter, t, prompts) for t in (0.0, 1.0)}
        print(f"{name:7s} tau T=0 {taus[0.0]:.2f}  T=1 {taus[1.0]:.2f}  "
              f"(saved in {out / name})")


if __name__ == "__main__":
    main()
