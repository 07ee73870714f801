"""The one-scenario entry points of ``benchmarks/`` (kept so ``python -m benchmarks.bench_store`` works).

The logic lives in :mod:`torch_dataflow.bench` (``torch-dataflow bench``); each
``bench_*.py`` here runs one of its scenarios, writes
``benchmarks/results/<scenario>.json`` and, unless ``--no-write``, regenerates
``docs/benchmarks.md`` with this scenario's section new and the others kept.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch_dataflow.bench import main as bench_main

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(scenario: str, argv: list[str] | None = None, *, doc: str = "") -> int:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.bench_{scenario}", description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the CI setting (seconds)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per figure (default: per scenario)")
    p.add_argument("--no-write", action="store_true", help="print only: no JSON, no docs")
    args = p.parse_args(argv)
    out = ["--scenarios", scenario]
    if args.quick:
        out.append("--quick")
    if args.repeats is not None:
        out += ["--repeats", str(args.repeats)]
    if not args.no_write:
        out += ["--json", str(RESULTS / f"{scenario}.json"), "--write-docs"]
    return bench_main(out, prog=f"python -m benchmarks.bench_{scenario}")
