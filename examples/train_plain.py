"""A hand-written PyTorch loop that trains from a feature store exactly once across crashes.

    python examples/train_plain.py --workdir /tmp/tdf-plain

Kill it anywhere and run it again: it resumes from the last checkpoint; the
samples whose effect that checkpoint holds are not trained again, all others are.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from torch_dataflow import FeatureStoreDataset, FeatureWriter
from torch_dataflow.acking import StepAcker


def produce(store: str, ledger: str, n: int) -> None:
    # A stable name and resume=True: a producer restarted after a crash re-registers under the
    # same name and skips ids already committed, so no sample is ever trained twice.
    with FeatureWriter(store, ledger, name="producer-0", resume=True) as w:
        if w.ledger.counts().committed >= n:
            return
        g = torch.Generator().manual_seed(0)
        for i in range(n):
            x = torch.randn(16, generator=g)
            w.put(f"sample-{i:06d}", {"x": x, "y": x.sum()})


def save_atomically(state: dict, path: Path) -> None:
    """Temporary file, fsync, rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/tdf-plain")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--accumulate", type=int, default=2)
    ap.add_argument("--checkpoint-every", type=int, default=4)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    store, ledger = f"file://{work}/features", f"sqlite://{work}/ledger.db"
    produce(store, ledger, args.samples)

    model = torch.nn.Linear(16, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ds = FeatureStoreDataset(store, ledger, batch_size=args.batch_size)
    acker = StepAcker(ds)
    ckpt = work / "last.ckpt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        acker.resume(from_state=state["acker"])  # reconcile: replay what the checkpoint lacks
    else:
        acker.resume(None)  # fresh start: anything trained by a crashed run is replayed

    def checkpoint() -> None:
        save_atomically({"model": model.state_dict(), "opt": opt.state_dict(), "acker": acker.state_dict()}, ckpt)
        acker.checkpoint_written()  # only now: the samples it covers become durable (older bytes freed)

    for i, batch in enumerate(DataLoader(ds, batch_size=args.batch_size, num_workers=2), 1):
        acker.add(batch)  # the leases travel in the batch
        loss = torch.nn.functional.mse_loss(model(batch["x"]).squeeze(-1), batch["y"]) / args.accumulate
        loss.backward()
        if i % args.accumulate == 0:
            with acker.stepping():  # acks the collected samples when the step has happened
                opt.step()
                opt.zero_grad()
            if acker.step % args.checkpoint_every == 0:
                checkpoint()
    if acker.pending():  # an incomplete accumulation window at the end
        with acker.stepping():
            opt.step()
            opt.zero_grad()
    checkpoint()
    acker.finish()  # training is over: free what was kept for a resume from the previous checkpoint
    c = ds.ledger.counts()
    print(f"step={acker.step} durable={c.durable} pending={c.pending} leased={c.leased}")


if __name__ == "__main__":
    main()
