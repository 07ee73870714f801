"""Our Mooncake store vs raw Mooncake put_from / get_into.

    python -m benchmarks.bench_mooncake [--quick] [--repeats N] [--no-write]

A thin wrapper: the scenario lives in ``torch_dataflow/bench/mooncake.py`` and also
runs as ``torch-dataflow bench --scenarios mooncake``. Writes
``benchmarks/results/mooncake.json`` and regenerates ``docs/benchmarks.md`` (this
section new, the others kept).
"""

from __future__ import annotations

from benchmarks._wrap import run_one


def main(argv: list[str] | None = None) -> int:
    return run_one("mooncake", argv, doc=__doc__ or "")


if __name__ == "__main__":
    raise SystemExit(main())
