"""Reports of `vsd_ext.eval.evaluate` results: a terminal table, report.json and a plot.

report.json: ``{"results": [{"method", "temperature", "tau", "tokens_per_second", "speedup",
"lossless", ...more keys}, ...], "tau_convention": ..., **extra}``.
report.png: τ and speedup per method and temperature (grouped bars, 95% CI whiskers), and the
acceptance-length histograms (fraction of target forwards that emitted 1, 2, ... tokens).
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["TAU_CONVENTION", "format_table", "write_report", "plot_results"]

TAU_CONVENTION = ("tau = tokens emitted per target forward = accepted draft tokens + 1 "
                  "(EAGLE's convention; prefill not counted)")


def _lossless_text(r: dict) -> str:
    d = r.get("lossless_detail") or {}
    if r["lossless"] is None:
        return "not checked"
    verdict = "yes" if r["lossless"] else "NO"
    if d.get("check") == "reference":
        return f"{verdict} (reference)"
    if d.get("check") == "exact_match":
        return f"{verdict} ({d['identical']}/{d['compared']} identical)"
    if d.get("check") == "pit_chi_square":
        return f"{verdict} (PIT chi2 p={d['p_value']:.2g}, {d['samples']}x{d['tokens']} tokens)"
    return verdict


def tree_text(result: dict) -> str:
    """The tree a result decoded with: "d5 k1 n5 top-k" (depth, topk, nodes; sampled or
    top-k children), "autoregressive" when the cost model chose no drafting, "-" for the
    baseline."""
    plan = result.get("plan")
    tree = plan["tree"] if plan else (result.get("tree") if result.get("kind") == "drafter"
                                      else None)
    if plan and tree is None:
        return "autoregressive"
    if not tree:
        return "-"
    kind = "sampled" if tree.get("sampled") and result["temperature"] > 0 else "top-k"
    return f"d{tree['depth']} k{tree['topk']} n{tree['total_tokens']} {kind}"


def format_table(results: list[dict]) -> str:
    """A plain-text table: method, T, τ [95% CI], tokens/s, speedup [95% CI], lossless."""
    rows = [("method", "T", "tau [95% CI]", "tok/s", "speedup [95% CI]", "tree", "lossless")]
    for r in results:
        tau_ci = r.get("tau_ci95") or [r["tau"], r["tau"]]
        sp_ci = r.get("speedup_ci95") or [r["speedup"], r["speedup"]]
        rows.append((r["method"], f"{r['temperature']:g}",
                     f"{r['tau']:.2f} [{tau_ci[0]:.2f}, {tau_ci[1]:.2f}]",
                     f"{r['tokens_per_second']:.1f}",
                     f"{r['speedup']:.2f}x [{sp_ci[0]:.2f}, {sp_ci[1]:.2f}]",
                     tree_text(r), _lossless_text(r)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {1, 3}
    lines = ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    first = results[0] if results else {}
    notes = [TAU_CONVENTION]
    if "ci_method" in first:
        notes.append(f"CI: {first['ci_method']}")
    if "num_prompts" in first:
        notes.append(f"{first['num_prompts']} prompts x {first['max_new_tokens']} new tokens, "
                     f"batch 1; speedup = tokens/s over autoregressive at the same T, same run")
    if any(r.get("kind") == "oracle" and r["temperature"] > 0 for r in results):
        notes.append("oracle at T > 0: its drafts are the greedy continuation, accepted only "
                     "while the sampled text follows it (a ceiling at T = 0 only)")
    return "\n".join(lines + [""] + notes)


def plot_results(results: list[dict], path: str | Path) -> Path:
    """Write the PNG described in the module docstring (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    methods = list(dict.fromkeys(r["method"] for r in results))
    temps = list(dict.fromkeys(r["temperature"] for r in results))
    by = {(r["method"], r["temperature"]): r for r in results}
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig = plt.figure(figsize=(max(10, 4 * len(temps)), 8), layout="constrained")
    top, bottom = fig.subfigures(2, 1)
    width = 0.8 / len(methods)
    for ax, key, label in zip(top.subplots(1, 2), ("tau", "speedup"),
                              ("τ (accepted + 1 per target forward)",
                               "speedup over autoregressive (tokens/s ratio)")):
        for j, m in enumerate(methods):
            xs, ys, lo, hi = [], [], [], []
            for i, t in enumerate(temps):
                r = by.get((m, t))
                if r is None:
                    continue
                ci = r.get(f"{key}_ci95") or [r[key], r[key]]
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(r[key])
                lo.append(r[key] - ci[0])
                hi.append(ci[1] - r[key])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=colors[m], label=m)
        ax.set_xticks(range(len(temps)), [f"T = {t:g}" for t in temps])
        ax.set_ylabel(label)
        if key == "speedup":
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.legend(fontsize="small")
    top.suptitle("τ and speedup, 95% CI (bootstrap over prompts)")
    axes = bottom.subplots(1, len(temps), squeeze=False)[0]
    for ax, t in zip(axes, temps):
        spec = [m for m in methods if (m, t) in by and len(by[(m, t)]["acceptance_histogram"]) > 1]
        bw = 0.8 / max(len(spec), 1)
        longest = 1
        for j, m in enumerate(spec):
            hist = by[(m, t)]["acceptance_histogram"]
            total = max(sum(hist), 1)
            xs = [k + 1 + (j - (len(spec) - 1) / 2) * bw for k in range(len(hist))]
            ax.bar(xs, [h / total for h in hist], bw, color=colors[m], label=m)
            longest = max([longest] + [k + 1 for k, h in enumerate(hist) if h])
        ax.set_xlim(0.4, longest + 0.6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"T = {t:g}")
        ax.set_xlabel("tokens emitted per target forward (accepted + 1)")
        ax.set_ylabel("fraction of target forwards")
        if spec:
            ax.legend(fontsize="small")
    bottom.suptitle("acceptance-length histograms")
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: list[dict], out_dir: str | Path, extra: dict | None = None) -> dict:
    """Write ``out_dir/report.json`` (``{"results": results, "tau_convention": ...,
    **extra}``) and ``out_dir/report.png``; returns ``{"json": path, "plot": path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"results": results, "tau_convention": TAU_CONVENTION, **(extra or {})}
    json_path = out / "report.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    return {"json": json_path, "plot": plot_results(results, out / "report.png")}
