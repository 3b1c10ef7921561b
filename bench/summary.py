"""One table of speed (and memory) ratios from a pytest-benchmark JSON file.

Every benchmark in bench/ sets `benchmark.group` (one problem shape) and
`benchmark.extra_info["provider"]` ("vsd_ext" or a PyTorch baseline such as "torch"), optionally
"bytes" (memory traffic of one call), "flops" (arithmetic of one call), "peak_bytes" (peak extra
memory) and "device". Ratios compare providers measured in the same run:
    speedup = baseline median time / vsd_ext median time      (> 1: vsd_ext is faster)
    memory  = vsd_ext peak bytes / baseline peak bytes         (< 1: vsd_ext uses less)
On CUDA, achieved bandwidth / FLOP rate is also shown as a % of the H200 floor.

    python bench/summary.py bench/results/latest.json [--markdown]
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


def _rate(info: dict, seconds: float) -> str:
    parts = []
    on_gpu = info.get("device", "cpu").startswith("cuda")
    if info.get("bytes"):
        bw = info["bytes"] / seconds
        parts.append(f"{bw / 1e9:.3g} GB/s" + (f" ({100 * bw / H200_BYTES_PER_S:.0f}% floor)"
                                               if on_gpu else ""))
    if info.get("flops"):
        fl = info["flops"] / seconds
        parts.append(f"{fl / 1e12:.3g} TFLOP/s" + (f" ({100 * fl / H200_FLOPS_PER_S:.0f}% floor)"
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
            row = {"group": group, "baseline": name, "vsd_ext": _fmt_time(t_ours),
                   "baseline_time": _fmt_time(t_base), "speedup": f"{t_base / t_ours:.2f}x",
                   "rate": _rate(ours["extra_info"], t_ours), "memory": ""}
            p_ours = ours["extra_info"].get("peak_bytes")
            p_base = base["extra_info"].get("peak_bytes")
            if p_ours is not None and p_base:
                row["memory"] = (f"{_fmt_bytes(p_ours)} vs {_fmt_bytes(p_base)} "
                                 f"({p_ours / p_base:.3f}x)")
            rows.append(row)
    return rows


def render(rows: list[dict], markdown: bool) -> str:
    cols = ["group", "baseline", "vsd_ext", "baseline_time", "speedup", "memory", "rate"]
    heads = ["problem", "baseline", "vsd_ext", "baseline time", "speedup", "peak memory",
             "vsd_ext rate"]
    table = [heads] + [[r[c] for c in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file", help="output of pytest --benchmark-json")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    with open(args.json_file) as f:
        data = json.load(f)
    machine = data.get("machine_info", {})
    print(f"# {data.get('datetime', '')}  {machine.get('cpu', {}).get('brand_raw', '')}  "
          f"{machine.get('node', '')}")
    rows = summarize(data)
    print(render(rows, args.markdown) if rows else "no vsd_ext benchmarks with a baseline found")


if __name__ == "__main__":
    main()
