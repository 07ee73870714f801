"""Ledger life cycle (memory, SQLite, Redis) at batch 1, 64, 1024 vs bare engines.

    python -m benchmarks.bench_ledger [--quick] [--repeats N] [--no-write]

A thin wrapper: the scenario lives in ``torch_dataflow/bench/ledger.py`` and also
runs as ``torch-dataflow bench --scenarios ledger``. Writes
``benchmarks/results/ledger.json`` and regenerates ``docs/benchmarks.md`` (this
section new, the others kept).
"""

from __future__ import annotations

from benchmarks._wrap import run_one


def main(argv: list[str] | None = None) -> int:
    return run_one("ledger", argv, doc=__doc__ or "")


if __name__ == "__main__":
    raise SystemExit(main())
