"""One table of speed (and memory) ratios from pytest-benchmark JSON files.

Every benchmark in bench/ sets `benchmark.group` (one problem shape) and
`benchmark.extra_info["provider"]` ("vsd_ext" or a PyTorch baseline such as "torch"), optionally
"bytes" (memory traffic of one call), "flops" (arithmetic of one call), "peak_bytes" (peak extra
memory), "device" (else the benchmark's `device` parameter) and, for decoding, "tau" and "tree"
(shown in the rate column). Ratios compare providers measured
in the same run:
    speedup = baseline median time / vsd_ext median time      (> 1: vsd_ext is faster)
    memory  = vsd_ext peak bytes / baseline peak bytes         (< 1: vsd_ext uses less)
On CUDA, achieved bandwidth / FLOP rate is also shown as a % of the H200's (HBM 4.3 TB/s,
bf16 tensor cores 790 TFLOP/s), and "% of floor" is vsd_ext's H200 floor time (the larger of
bytes / 4.3 TB/s and flops / 790 TFLOP/s) over its measured time: 100% = at the floor.

    python bench/summary.py bench/results/latest.json [more.json ...] [--markdown]
        [--merged all.json]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

from conftest import H200_BYTES_PER_S, H200_FLOPS_PER_S


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} GiB"


def _on_gpu(bench: dict) -> bool:
    info = bench.get("extra_info", {})
    device = info.get("device") or (bench.get("params") or {}).get("device") or "cpu"
    return str(device).startswith("cuda")


def _floor(info: dict, seconds: float) -> str:
    """The H200 floor time (bytes at the HBM rate, flops at the tensor-core rate, the larger)
    as a % of the measured time."""
    floor = max(info.get("bytes", 0) / H200_BYTES_PER_S, info.get("flops", 0) / H200_FLOPS_PER_S)
    return f"{100 * floor / seconds:.0f}%" if floor > 0 else ""


def _rate(info: dict, seconds: float, on_gpu: bool) -> str:
    parts = []
    if info.get("bytes"):
        bw = info["bytes"] / seconds
        parts.append(f"{bw / 1e9:.3g} GB/s" + (f" ({100 * bw / H200_BYTES_PER_S:.0f}% of HBM)"
                                               if on_gpu else ""))
    if "tau" in info:  # end-to-end decoding: τ and the tree decoded with
        parts.append(f"tau {info['tau']:.2f}" + (f", {info['tree']}" if info.get("tree") else ""))
    if info.get("flops"):
        fl = info["flops"] / seconds
        parts.append(f"{fl / 1e12:.3g} TFLOP/s" + (f" ({100 * fl / H200_FLOPS_PER_S:.0f}% of TC)"
                                                   if on_gpu else ""))
    return ", ".join(parts)


def summarize(data: dict) -> list[dict]:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        provider = bench.get("extra_info", {}).get("provider")
        if provider is None:
            continue
        groups[bench["group"] or bench["name"]][provider] = bench
    rows = []
    for group, providers in sorted(groups.items()):
        ours = providers.get("vsd_ext")
        if ours is None:
            continue
        t_ours = ours["stats"]["median"]
        for name, base in sorted(providers.items()):
            if name == "vsd_ext":
                continue
            t_base = base["stats"]["median"]
            gpu = _on_gpu(ours)
            row = {"group": group, "baseline": name, "vsd_ext": _fmt_time(t_ours),
                   "baseline_time": _fmt_time(t_base), "speedup": f"{t_base / t_ours:.2f}x",
                   "rate": _rate(ours["extra_info"], t_ours, gpu), "memory": "",
                   "floor": _floor(ours["extra_info"], t_ours) if gpu else ""}
            p_ours = ours["extra_info"].get("peak_bytes")
            p_base = base["extra_info"].get("peak_bytes")
            if p_ours is not None and p_base:
                row["memory"] = (f"{_fmt_bytes(p_ours)} vs {_fmt_bytes(p_base)} "
                                 f"({p_ours / p_base:.3f}x)")
            rows.append(row)
    return rows


def render(rows: list[dict], markdown: bool) -> str:
    cols = ["group", "baseline", "vsd_ext", "baseline_time", "speedup", "floor", "memory", "rate"]
    heads = ["problem", "baseline", "vsd_ext", "baseline time", "speedup", "% of floor",
             "peak memory", "vsd_ext rate"]
    table = [heads] + [[r[c] for c in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_files", nargs="+", help="outputs of pytest --benchmark-json")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--merged", help="also write the benchmarks of all files to this JSON")
    args = parser.parse_args(argv)
    data = None
    for name in args.json_files:
        with open(name) as f:
            part = json.load(f)
        if data is None:
            data = part
        else:
            data["benchmarks"] += part["benchmarks"]
    if args.merged:
        with open(args.merged, "w") as f:
            json.dump(data, f)
    machine = data.get("machine_info", {})
    print(f"# {data.get('datetime', '')}  {machine.get('cpu', {}).get('brand_raw', '')}  "
          f"{machine.get('node', '')}")
    rows = summarize(data)
    print(render(rows, args.markdown) if rows else "no vsd_ext benchmarks with a baseline found")


if __name__ == "__main__":
    main()
