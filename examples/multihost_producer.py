"""Multi-host rehearsal, host A: a producer writing features into a shared store.

Writes ``--samples`` small samples with :class:`~torch_dataflow.FeatureWriter`
into ``--store`` (a shared directory both hosts mount) and commits them to the
Redis ledger ``--ledger`` on the network, then closes the stream. Run by
``examples/multihost_rehearsal.sh``; by hand:

    python examples/multihost_producer.py --store file:///shared/td/store \\
        --ledger 'redis://:PASSWORD@10.0.0.5:6379/0?namespace=run1' --samples 240
"""

from __future__ import annotations

import argparse
import time

import torch

from torch_dataflow import FeatureWriter


def sample(i: int, dim: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(dim, generator=g)
    return {"x": x, "y": x.sum(0, keepdim=True) * 0.1, "i": torch.tensor(i)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--ledger", required=True)
    p.add_argument("--samples", type=int, default=240)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--chunk", type=int, default=8, help="samples per put_many (one reserve + one commit)")
    p.add_argument("--delay", type=float, default=0.01, help="seconds between chunks (the trainers wait)")
    args = p.parse_args(argv)

    t0 = time.monotonic()
    with FeatureWriter(args.store, args.ledger, name="host-a-producer") as w:
        for start in range(0, args.samples, args.chunk):
            ids = range(start, min(start + args.chunk, args.samples))
            w.put_many([(f"s{i:05d}", sample(i, args.dim)) for i in ids])
            time.sleep(args.delay)
    print(f"producer: wrote {w.written} samples ({w.bytes_written} bytes) in {time.monotonic() - t0:.1f}s")


if __name__ == "__main__":
    main()
