"""Turn one harness run into the plot of ratios and the whole of ``docs/benchmarks.md``."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

__all__ = ["plot", "target_lines", "write_docs"]

_SECTION = re.compile(r"<!-- bench:([\w-]+) -->\n?(.*?)\n?<!-- /bench:\1 -->", re.S)
_HEADINGS = {
    "store": "Store round trip",
    "producer": "Producer put vs raw writev",
    "mooncake": "Mooncake store",
    "ledger": "Ledger life cycle",
    "e2e": "End to end: can the loader keep a trainer fed?",
    "scaling": "Scaling",
    "length": "Length-aware batching",
    "fields": "Field selection",
    "metrics": "Metrics cost",
    "peers": "Peers and floors: the consumer path side by side",
}


def target_lines(results: dict[str, Any]) -> list[str]:
    """Markdown table rows, one per target: MET or MISSED, plainly."""
    rows = []
    for name, res in results["scenarios"].items():
        for t in res.get("targets", []):
            unit = " samples/s" if t["unit"] == "samples/s" else "x" if t["unit"] == "x" else f" {t['unit']}"
            fmt = (lambda v: f"{v:,.0f}") if t["unit"] == "samples/s" else (lambda v: f"{v:.2f}")
            verdict = "met" if t["met"] else "**MISSED**"
            lines = f"| {name} | {t['what']} | {fmt(t['value'])}{unit} | >= {fmt(t['goal'])}{unit} | {verdict} |"
            rows.append(lines)
    return rows


def plot(results: dict[str, Any], path: str | Path) -> Path:
    """Draw every scenario's ratios (to same-run baselines) as horizontal bars; return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(n, r["ratios"]) for n, r in results["scenarios"].items() if r.get("ratios")]
    if not panels:
        raise ValueError("no scenario produced ratios to plot")
    heights = [max(1.2, 0.26 * len(rs) + 0.6) for _, rs in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(10, sum(heights) + 0.8), gridspec_kw={"height_ratios": heights}, squeeze=False
    )
    for ax, (name, ratios) in zip(axes[:, 0], panels, strict=True):
        labels = [r["label"] for r in ratios]
        values = [r["value"] if r["value"] > 0 and math.isfinite(r["value"]) else float("nan") for r in ratios]
        colors = []
        for r in ratios:
            goal = r.get("target")
            colors.append("#999999" if goal is None else "#2b8a3e" if r["value"] >= goal else "#c92a2a")
        ys = range(len(ratios))
        # Bars grow from parity (1) towards the ratio, so left of the line is worse than the baseline.
        ax.barh(list(ys), [v - 1 for v in values], left=1, color=colors)
        for y, r in zip(ys, ratios, strict=True):
            if r.get("target") is not None:
                ax.plot([r["target"]] * 2, [y - 0.4, y + 0.4], color="black", lw=1.5)
            ax.annotate(
                f"{r['value']:.2g}", (r["value"], y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7
            )
        ax.axvline(1.0, color="black", lw=0.6, ls=":")
        ax.set_xscale("log")
        span = [v for v in values if v == v] + [r["target"] for r in ratios if r.get("target")] + [1.0]
        ax.set_xlim(min(span) / 1.6, max(span) * 1.6)
        ax.set_yticks(list(ys), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(_HEADINGS.get(name, name), fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    quick = " (quick setting)" if results.get("quick") else ""
    fig.suptitle(
        f"torch_dataflow bench{quick}: ratios to same-run baselines (log scale; black tick = target; "
        "green met, red missed, grey no target)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _machine_md(m: dict[str, Any], end: dict[str, Any] | None) -> list[str]:
    load_end = f", {end['loadavg_1m']} at the end" if end else ""
    return [
        f"- CPU: {m['cpu']} ({m['arch']}), {m['cores']} cores ({m['affinity']} usable by this process), "
        f"{m['mem_gib']} GiB memory (from /proc), Linux {m['kernel']}",
        f"- Python {m['python']}, torch {m['torch']} (CPU) with {m['torch_threads']} intra-op thread(s) in the "
        "benchmark process",
        f"- 1-minute load average {m['loadavg_1m']} at the start{load_end}: the machine is shared with other "
        "jobs, so figures are noisy. Every figure is a median over repeats and every ratio compares figures "
        "measured in the same run, which cancels part of the noise; absolute numbers move more than ratios.",
    ]


def write_docs(results: dict[str, Any], doc: str | Path, png: str | Path | None, renders: dict[str, str]) -> Path:
    """Write the whole of ``doc`` from this run; keep earlier sections this run did not cover."""
    doc = Path(doc)
    old = doc.read_text() if doc.exists() else ""
    kept = {name: body for name, body in _SECTION.findall(old) if name not in renders}
    cmd = results["command"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{cmd}` on {results['machine']['date']} from one run of the harness in "
        "`torch_dataflow/bench/` (total "
        f"{results['seconds']:.0f} s). Do not edit by hand: rerun the command. Numbers are not pass/fail tests.",
        "",
        "## Machine",
        "",
        *_machine_md(results["machine"], results.get("machine_end")),
        "",
        "## How to run",
        "",
        "```",
        "torch-dataflow bench --write-docs --json benchmarks/results/bench.json   # full setting (4-7 min here)",
        "torch-dataflow bench --quick --scenarios store,ledger                   # the CI setting (seconds)",
        "python -m benchmarks.bench_store | bench_ledger | bench_mooncake          # one scenario each",
        "```",
        "",
        "Options: `--scenarios store,mooncake,ledger,e2e,scaling,length,fields,peers`, `--repeats N`, `--json FILE`, `--plot FILE`, "
        "`--write-docs`. `tests/test_bench.py` runs `--quick` on every scenario in CI so the harness cannot rot.",
        "",
        "## Targets",
        "",
    ]
    tl = target_lines(results)
    if tl:
        lines += ["| scenario | target | measured | goal | result |", "|---|---|---|---|---|", *tl, ""]
        missed = sum("MISSED" in t for t in tl)
        lines += [f"{missed} of {len(tl)} targets MISSED in this run." if missed else "Every target met.", ""]
    else:
        lines += ["This run covered no scenario with a target.", ""]
    if png is not None:
        rel = Path(png).name if Path(png).parent == doc.parent else str(png)
        lines += [
            "## Plot",
            "",
            f"![Ratios to same-run baselines]({rel})",
            "",
            "Each bar is a ratio of one figure to its baseline from the same run (log scale; 1 = parity). "
            "Black ticks mark targets: green bars met them, red bars missed them.",
            "",
        ]
    for name, body in renders.items():
        lines += [
            f"## {_HEADINGS.get(name, name)}",
            "",
            f"<!-- bench:{name} -->",
            body.rstrip("\n"),
            f"<!-- /bench:{name} -->",
            "",
        ]
    if kept:
        lines += ["## Earlier runs (not covered by this run, kept as they were)", ""]
        for name, body in kept.items():
            lines += [f"<!-- bench:{name} -->", body.rstrip("\n"), f"<!-- /bench:{name} -->", ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines).rstrip("\n") + "\n")
    return doc
