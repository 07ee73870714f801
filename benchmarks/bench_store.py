"""Store round trip on EAGLE3 samples vs memcpy, raw file I/O and the torch.save path.

    python -m benchmarks.bench_store [--quick] [--repeats N] [--no-write]

A thin wrapper: the scenario lives in ``torch_dataflow/bench/store.py`` and also
runs as ``torch-dataflow bench --scenarios store``. Writes
``benchmarks/results/store.json`` and regenerates ``docs/benchmarks.md`` (this
section new, the others kept).
"""

from __future__ import annotations

from benchmarks._wrap import run_one


def main(argv: list[str] | None = None) -> int:
    return run_one("store", argv, doc=__doc__ or "")


if __name__ == "__main__":
    raise SystemExit(main())
