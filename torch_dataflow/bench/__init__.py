"""``torch-dataflow bench``: one benchmark harness for stores, ledgers and the loader.

Scenarios (one module each): ``store`` (round trip per store vs memcpy, raw file
I/O and the torch.save path), ``producer`` (``FeatureWriter.put`` vs a raw
``os.writev`` of the same bytes), ``mooncake`` (our Mooncake store vs raw
``put_from``/``get_into``), ``ledger`` (life cycle per ledger at batch 1, 64,
1024), ``e2e`` (a producer process feeding a DataLoader, the EAGLE3 collator
and a no-op step) and ``scaling`` (1-4 consumer processes; ledger cost at
growing pool sizes) and ``length`` (random vs length-aware batching: padding, tokens/s,
per-rank balance, ordering cost) and ``fields`` (field selection: bytes read and samples/s,
all tensors vs a subset; checksum cost per format) and ``metrics`` (loader throughput, Prometheus metrics on vs off) and ``peers`` (our
consumer path vs the floors, SpecForge's loaders and litdata, 0 and 2 workers, peak RSS).
Every figure is a median over repeats, next to its
baseline measured in the same run as a ratio. Missed targets are reported as
MISSED; nothing here is a pass/fail timing test.

Example:
    $ torch-dataflow bench --quick --scenarios store,ledger --json out.json
    $ torch-dataflow bench --write-docs          # the full setting -> docs/benchmarks.md + .png

    >>> from torch_dataflow.bench import main
    >>> main(["--quick", "--scenarios", "store", "--json", "/tmp/b.json"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ._util import Settings, forkserver_pid, machine, stop_forkserver

__all__ = ["SCENARIOS", "main", "run"]

SCENARIOS = ("store", "producer", "mooncake", "ledger", "e2e", "scaling", "length", "fields", "peers", "metrics")
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "benchmarks.md"
PNG = ROOT / "docs" / "benchmarks.png"


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0].replace("``", ""))
    p.add_argument("--quick", action="store_true", help="the CI setting: small H and S, few repeats (seconds)")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    p.add_argument("--repeats", type=int, default=None, help="repeats per figure (default: per scenario)")
    p.add_argument("--json", metavar="FILE", help="write every result as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw the ratios with matplotlib")
    p.add_argument(
        "--write-docs",
        action="store_true",
        help=f"regenerate {DOC.relative_to(ROOT)} (and {PNG.relative_to(ROOT)} when every scenario ran)",
    )
    return p


def _scenarios(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown or not names:
        raise SystemExit(f"unknown scenario(s) {unknown or text!r}; choose from {', '.join(SCENARIOS)}")
    return list(dict.fromkeys(names))


def run(names: list[str], cfg: Settings, *, echo: bool = True) -> tuple[dict[str, Any], dict[str, str]]:
    """Run ``names`` in order; return the JSON-able results and each scenario's markdown."""
    import torch

    threads = torch.get_num_threads()
    # One intra-op thread: on small shared machines torch's parallel copy waits on busy
    # cores and turns a 0.3 ms memcpy into 10 ms; every method and baseline gets the same.
    torch.set_num_threads(1)
    results: dict[str, Any] = {"quick": cfg.quick, "machine": machine(), "scenarios": {}, "errors": {}}
    renders: dict[str, str] = {}
    t_all = time.perf_counter()
    had_forkserver = forkserver_pid() is not None
    try:
        for name in names:
            mod = importlib.import_module(f"{__name__}.{name}")
            t0 = time.perf_counter()
            try:
                res = mod.run(cfg)
            except Exception as e:  # one broken scenario must not hide the others' numbers
                results["errors"][name] = f"{type(e).__name__}: {e}"
                if echo:
                    traceback.print_exc()
                continue
            res["seconds"] = time.perf_counter() - t0
            results["scenarios"][name] = res
            renders[name] = mod.render(res)
            if echo:
                print(renders[name] + f"\n\n({name}: {res['seconds']:.1f} s)\n", flush=True)
    finally:
        torch.set_num_threads(threads)
        stop_forkserver(started_by_us=not had_forkserver)
    results["seconds"] = time.perf_counter() - t_all
    results["machine_end"] = machine()
    return results, renders


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def main(argv: list[str] | None = None, *, prog: str = "torch-dataflow bench") -> int:
    """Entry point of ``torch-dataflow bench``; returns the exit status (1 if a scenario failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(prog).parse_args(argv)
    names = _scenarios(args.scenarios)
    cfg = Settings(quick=args.quick, repeats=args.repeats)
    results, renders = run(names, cfg)
    results["command"] = " ".join([prog, *map(shlex.quote, argv)])

    from .report import plot, target_lines, write_docs

    summary = target_lines(results)
    if summary:
        print("Targets" + (" (quick setting: not representative)" if cfg.quick else "") + ":")
        print("\n".join(summary))
    for name, err in results["errors"].items():
        print(f"scenario {name} FAILED: {err}", file=sys.stderr)
    if args.plot and results["scenarios"]:
        print(f"plot: {plot(results, args.plot)}")
    if args.write_docs and results["scenarios"]:
        png = None
        if set(names) == set(SCENARIOS) and not results["errors"]:
            png = plot(results, PNG)
        write_docs(results, DOC, png, renders)
        print(f"docs: {DOC}" + (f", {png}" if png else " (plot not regenerated: not every scenario ran)"))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_json_safe(results), indent=2) + "\n")
        print(f"json: {out}")
    return 1 if results["errors"] else 0
