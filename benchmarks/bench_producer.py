"""FeatureWriter.put of one EAGLE3 sample vs a raw os.writev of the same bytes (same run).

    python -m benchmarks.bench_producer [--quick] [--repeats N] [--no-write]

A thin wrapper: the scenario lives in ``torch_dataflow/bench/producer.py`` and also
runs as ``torch-dataflow bench --scenarios producer``. Writes
``benchmarks/results/producer.json`` and regenerates ``docs/benchmarks.md`` (this
section new, the others kept).
"""

from __future__ import annotations

from benchmarks._wrap import run_one


def main(argv: list[str] | None = None) -> int:
    return run_one("producer", argv, doc=__doc__ or "")


if __name__ == "__main__":
    raise SystemExit(main())
