"""τ regression floors: what the shipped drafters reach on a fixed prompt set, and the floors
tests/test_tau_floors.py holds them to.

Each case decodes the same prompts (`PROMPTS`: the first few of a fixed prompt asset, cut to
their last tokens) with the default target and a shipped drafter (or the oracle, the loop's
ceiling) at one tree shape and temperature, one thread, a fixed generator seed: every case is
deterministic on one machine (T = 0 is greedy; T > 0 draws everything from the seeded
generator). The floors live in `tau_floors.json`, keyed by the SHA-256 of the target and
drafter weights they were measured with (the tokenizer's and the prompt file's are checked
too), so a test fails clearly — not with a τ drop — when an asset changes without
re-recording.

Re-record after replacing the default target or the shipped drafters (or changing `CASES`):

    python tests/tau_floors.py --record          # measure, write tau_floors.json, print
    python tests/tau_floors.py                   # measure and compare, write nothing
    python tests/tau_floors.py --seeds           # ... T > 0 cases also over several seeds

Floor = measured − margin, margin = max(MARGIN · τ, 3 × the spread of repeated runs): a
change that costs 5% of τ falls below it. Recording also measures T > 0 cases over several
seeds and stores the spread (`seed_spread`): how far τ moves when only the random stream
changes, so a failure after a change that merely draws random numbers in another order can
be told from a regression.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import vsd_ext
from vsd_ext.decoding import OracleDrafter, TreeConfig, generate
from vsd_ext.eval import read_prompts_jsonl
from vsd_ext.models.checkpoint import DEFAULT_DRAFTERS, DEFAULT_TARGET_DIR

FLOORS_FILE = Path(__file__).with_name("tau_floors.json")
PROMPT_FILE = DEFAULT_TARGET_DIR.parent / "prompts" / "heldout_midfile_v1.jsonl"
PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 8, 64, 48
MARGIN = 0.02      # relative: a 5% loss of τ is well below the floor
RERUNS = 2         # runs per case when recording (the spread of identical runs)
SPREAD_SEEDS = 4   # seeds per T > 0 case when recording (the spread of the random stream)
RECORD_COMMAND = "python tests/tau_floors.py --record"


@dataclass(frozen=True)
class Case:
    """One measurement: drafter ("default", "default-vsd" or "oracle"), tree shape
    (depth, topk, total_tokens, sampled), temperature, generator seed."""

    drafter: str
    depth: int
    topk: int
    total_tokens: int
    sampled: bool
    temperature: float
    seed: int = 0

    @property
    def tree(self) -> TreeConfig:
        return TreeConfig(self.depth, self.topk, self.total_tokens, self.sampled)


CASES = {
    # chains: the drafter's feature alignment and the target's feature layers
    "eagle3-chain-T0": Case("default", 5, 1, 5, False, 0.0),
    "vsd-chain-T0": Case("default-vsd", 5, 1, 5, False, 0.0),
    # top-4 trees: tree growth, and the accepted path's features fed back to the drafter
    "eagle3-tree-T0": Case("default", 5, 4, 24, False, 0.0),
    # sampled trees (drawn from q at the decoding temperature, verified against it)
    "eagle3-sampled-T0.6": Case("default", 5, 4, 24, True, 0.6),
    "eagle3-sampled-T1": Case("default", 5, 4, 24, True, 1.0),
    # the oracle (the target's greedy continuation): the loop's ceiling, every draft accepted
    "oracle-T0": Case("oracle", 4, 1, 4, False, 0.0),
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def asset_hashes(case: Case) -> dict:
    """SHA-256 of everything a case's τ depends on besides the code."""
    hashes = {"target": sha256(DEFAULT_TARGET_DIR / "model.safetensors"),
              "tokenizer": sha256(DEFAULT_TARGET_DIR / "tokenizer.json"),
              "prompts": sha256(PROMPT_FILE)}
    if case.drafter != "oracle":
        hashes["drafter"] = sha256(DEFAULT_DRAFTERS[case.drafter] / "model.safetensors")
    return hashes


def weights_key(case: Case) -> str:
    """The key of a case's floor in the JSON file: the hashes of its target and drafter."""
    hashes = asset_hashes(case)
    return f"target={hashes['target'][:16]} drafter={hashes.get('drafter', 'oracle')[:16]}"


class Decoder:
    """The default target, the shipped drafters and the prompt set, loaded once."""

    def __init__(self):
        self.target = vsd_ext.load_target("default")
        texts = read_prompts_jsonl(PROMPT_FILE)[:PROMPTS]
        self.prompts = [self.target.tokenizer.encode(t).ids[-PROMPT_TOKENS:] for t in texts]
        self._drafters = {}

    def drafter(self, case: Case):
        if case.drafter == "oracle":
            return OracleDrafter.from_target(self.target, self.prompts, NEW_TOKENS, case.depth)
        if case.drafter not in self._drafters:
            self._drafters[case.drafter] = vsd_ext.load_drafter(case.drafter, self.target)
        return self._drafters[case.drafter]

    def tau(self, case: Case, seed: int | None = None) -> float:
        """τ of one case (one thread, the case's seed unless ``seed`` is given)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            gen = torch.Generator().manual_seed(case.seed if seed is None else seed)
            out = generate(self.target, self.drafter(case), self.prompts, NEW_TOKENS,
                           temperature=case.temperature, tree=case.tree, generator=gen,
                           ignore_eos=True)
        finally:
            torch.set_num_threads(threads)
        return out.stats["tau"]


def record_case(decoder: Decoder, case: Case) -> dict:
    """Measure a case ``RERUNS`` times (and over ``SPREAD_SEEDS`` seeds at T > 0)."""
    runs = [decoder.tau(case) for _ in range(RERUNS)]
    measured = min(runs)
    margin = max(MARGIN * measured, 3 * (max(runs) - min(runs)))
    if case.drafter == "oracle" and case.temperature == 0:
        margin = 1e-9  # every draft is accepted: the ceiling itself
    entry = {"case": asdict(case), "settings": settings(), "assets": asset_hashes(case),
             "measured": round(measured, 4),
             "reruns": [round(r, 4) for r in runs], "margin": round(margin, 4),
             "floor": round(measured - margin, 4)}
    if case.temperature > 0:
        seeds = [decoder.tau(case, seed) for seed in range(SPREAD_SEEDS)]
        entry["seed_spread"] = {"seeds": SPREAD_SEEDS, "min": round(min(seeds), 4),
                                "max": round(max(seeds), 4),
                                "mean": round(sum(seeds) / len(seeds), 4)}
    return entry


def settings() -> dict:
    """What every case shares (a change invalidates the floors)."""
    return {"prompt_file": PROMPT_FILE.name, "prompts": PROMPTS, "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": NEW_TOKENS, "threads": 1}


def load_floors(path: Path = FLOORS_FILE) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"floors": {}}


def floor_of(floors: dict, name: str) -> dict:
    """The recorded entry of case ``name``; fails with the re-record command when the case
    or the weights it was measured with changed."""
    case = CASES[name]
    key = weights_key(case)
    entry = floors["floors"].get(key, {}).get(name)
    if entry is None:
        known = sorted(floors["floors"])
        raise LookupError(
            f"no τ floor recorded for case {name!r} with the current weights ({key}); recorded "
            f"keys: {known}. The shipped target/drafter changed (or the case is new): "
            f"re-record with `{RECORD_COMMAND}` and commit tests/tau_floors.json")
    now = {"case": asdict(case), "settings": settings(), "assets": asset_hashes(case)}
    changed = [field for field, value in now.items() if entry.get(field) != value]
    if changed:
        raise LookupError(
            f"the τ floor of {name!r} was recorded with other {' and '.join(changed)} "
            f"({ {f: entry.get(f) for f in changed} } now { {f: now[f] for f in changed} }); "
            f"re-record with `{RECORD_COMMAND}`")
    return entry


def seed_mean(decoder: Decoder, name: str, entry: dict) -> str:
    """T > 0: τ over the recording's seeds, against the recorded mean over them (tells a
    regression from a change that only draws random numbers in another order)."""
    spread = entry["seed_spread"]
    taus = [decoder.tau(CASES[name], seed) for seed in range(spread["seeds"])]
    mean = sum(taus) / len(taus)
    return (f"\n{'':22s} mean over {spread['seeds']} seeds {mean:.4f}, recorded "
            f"{spread['mean']:.4f} ({100 * (mean / spread['mean'] - 1):+.1f}%)")


def compare(decoder: Decoder, names, seeds: bool = False) -> int:
    """Measure each case once and print it against its floor (``seeds``: T > 0 cases also
    over the recording's seeds); 1 if any is below."""
    floors, below = load_floors(), 0
    for name in names:
        start = time.perf_counter()
        tau = decoder.tau(CASES[name])
        try:
            entry = floor_of(floors, name)
        except LookupError as err:
            print(f"{name:22s} tau {tau:.4f}  {err}")
            below += 1
            continue
        verdict = "ok" if tau >= entry["floor"] else "BELOW FLOOR"
        below += tau < entry["floor"]
        extra = seed_mean(decoder, name, entry) if seeds and "seed_spread" in entry else ""
        print(f"{name:22s} tau {tau:.4f}  floor {entry['floor']:.4f}  recorded "
              f"{entry['measured']:.4f}  ({100 * (tau / entry['measured'] - 1):+.1f}%)  {verdict}"
              f"  ({time.perf_counter() - start:.1f} s){extra}", flush=True)
    return int(below > 0)


def record(decoder: Decoder, names) -> None:
    """Measure the cases (`record_case`) and rewrite tau_floors.json: the other cases' entries
    for the current weights are kept, entries of other weights dropped."""
    floors = load_floors()
    keys = {weights_key(case) for case in CASES.values()}
    recorded = {key: {n: e for n, e in floors["floors"].get(key, {}).items() if n in CASES}
                for key in keys}
    for name in names:
        start = time.perf_counter()
        entry = record_case(decoder, CASES[name])
        print(f"{name:22s} tau {entry['measured']:.4f}  reruns {entry['reruns']}  floor "
              f"{entry['floor']:.4f}  {entry.get('seed_spread', '')}  "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
        recorded[weights_key(CASES[name])][name] = entry
    FLOORS_FILE.write_text(json.dumps({
        "about": f"τ floors of tests/test_tau_floors.py; written by `{RECORD_COMMAND}` (see "
                 "tests/tau_floors.py)",
        "floors": {key: cases for key, cases in recorded.items() if cases}}, indent=1) + "\n")
    print(f"wrote {FLOORS_FILE}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true",
                        help="re-measure (repeated runs, seed spread) and rewrite tau_floors.json")
    parser.add_argument("--seeds", action="store_true",
                        help="T > 0 cases: also the mean over the recording's seeds")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    decoder = Decoder()
    if args.record:
        record(decoder, args.cases)
        return 0
    return compare(decoder, args.cases, args.seeds)


if __name__ == "__main__":
    sys.exit(main())
