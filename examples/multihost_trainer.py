"""Multi-host rehearsal, host B: one trainer rank, and the final audit.

``train``: rank ``--rank`` of ``--world`` iterates
``FeatureStoreDataset(store, ledger, batch_size=B, rank=r, world_size=W)``
through a ``DataLoader``, takes an optimizer step per batch and acks the batch
at that step (``ds.ack(batch, step)``). Every rank gets the same number of
batches, disjoint from the others'. The sample ids it trained go to ``--out``
(one line per batch) so the audit can compare what the trainers saw with what
the ledger recorded.

``audit``: reads the ledger and the trainers' logs and checks that every
committed sample was trained exactly once (and nothing is left pending or
leased). Exit status 1 if not.

Run by ``examples/multihost_rehearsal.sh``; by hand, on each trainer host:

    python examples/multihost_trainer.py train --rank 0 --world 2 --store file:///shared/td/store \\
        --ledger 'redis://:PASSWORD@10.0.0.5:6379/0?namespace=run1' --out /tmp/rank0.txt
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from torch_dataflow import FeatureStoreDataset
from torch_dataflow.ledger import open_ledger


def train(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ds = FeatureStoreDataset(args.store, args.ledger, batch_size=args.batch, rank=args.rank, world_size=args.world,
                             lease_ttl=120, idle_timeout=120)
    loader = DataLoader(ds, batch_size=args.batch, num_workers=args.workers)
    model = torch.nn.Linear(args.dim, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    step, seen, t0 = 0, 0, time.monotonic()
    with open(args.out, "w") as log:
        for batch in loader:
            loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            lost = ds.ack(batch, step)  # the optimizer step that used these samples
            if lost:
                print(f"rank {args.rank}: {len(lost)} leases lost at step {step}", file=sys.stderr)
                return 1
            ids = list(batch["__sample_id__"])
            seen += len(ids)
            log.write(" ".join(ids) + "\n")
            log.flush()
    print(f"rank {args.rank}: {step} steps, {seen} samples, last loss {loss.item():.4f}, "
          f"{time.monotonic() - t0:.1f}s")
    return 0


def audit(args: argparse.Namespace) -> int:
    led = open_ledger(args.ledger)
    c = led.counts()
    trained = led.trained_steps(epoch=0)
    logged = Counter(s for out in args.outs for line in Path(out).read_text().split("\n") for s in line.split())
    twice = sorted(s for s, n in logged.items() if n > 1)
    problems = []
    if c.committed != args.expect:
        problems.append(f"{c.committed} samples committed, expected {args.expect}")
    if c.pending or c.leased:
        problems.append(f"{c.pending} pending and {c.leased} leased after the run")
    if twice:
        problems.append(f"{len(twice)} samples trained twice by the trainers (first: {twice[0]})")
    if set(logged) != set(trained):
        problems.append(f"trainers logged {len(logged)} samples, the ledger has {len(trained)} trained")
    if len(trained) != args.expect:
        problems.append(f"{len(trained)} samples trained, expected {args.expect}")
    print(f"audit: committed={c.committed} trained={c.trained} durable={c.durable} pending={c.pending} "
          f"leased={c.leased} closed={c.closed}; trainers logged {sum(logged.values())} deliveries of "
          f"{len(logged)} samples over {len(set(trained.values()))} optimizer steps")
    for p in problems:
        print(f"audit: FAILED: {p}")
    if not problems:
        print(f"audit: OK: each of the {args.expect} samples was trained exactly once")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="run one trainer rank")
    t.add_argument("--store", required=True)
    t.add_argument("--ledger", required=True)
    t.add_argument("--rank", type=int, required=True)
    t.add_argument("--world", type=int, default=2)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    t.add_argument("--dim", type=int, default=16)
    t.add_argument("--out", required=True, help="file for the sample ids this rank trained")
    a = sub.add_parser("audit", help="check the ledger after the run")
    a.add_argument("--ledger", required=True)
    a.add_argument("--expect", type=int, required=True, help="samples the producer wrote")
    a.add_argument("outs", nargs="+", help="the trainers' --out files")
    args = p.parse_args(argv)
    return train(args) if args.cmd == "train" else audit(args)


if __name__ == "__main__":
    raise SystemExit(main())
