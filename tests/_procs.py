"""Process bodies for the cross-process tests (importable by spawned children)."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from typing import Any

import torch


def sample(i: int, size: int = 16) -> dict[str, torch.Tensor]:
    return {"x": torch.full((size,), float(i)), "i": torch.tensor(i)}


def produce(store: str, ledger: str, ids: list[int], delay: float = 0.0, close: bool = True) -> None:
    from torch_dataflow import FeatureWriter

    w = FeatureWriter(store, ledger, name=f"producer-{os.getpid()}")
    for i in ids:
        w.put(f"s{i:05d}", sample(i))
        if delay:
            time.sleep(delay)
    if close:
        w.close()


def consume(store: str, ledger: str, out: str, ack: bool = True, hold: float = 0.0, lease_ttl: float = 60.0,
            num_workers: int = 0, batch_size: int = 4, ready: str | None = None) -> None:
    """Consume everything; log each sample id to ``out`` (one JSON line per batch) before acking.
    ``ready``: a file created once the loader (and its workers) runs."""
    from torch.utils.data import DataLoader

    from torch_dataflow import FeatureStoreDataset

    ds = FeatureStoreDataset(store, ledger, batch_size=batch_size, lease_ttl=lease_ttl, idle_timeout=120)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    batches = iter(loader)  # starts the workers
    if ready:
        open(ready, "w").close()
    with open(out, "a") as f:
        for step, batch in enumerate(batches, 1):
            f.write(json.dumps({"pid": os.getpid(), "ids": batch["__sample_id__"]}) + "\n")
            f.flush()
            if hold:
                time.sleep(hold)  # the test kills us while we hold leases
            if ack:
                ds.ack(batch, step)


def ddp_rank(rank: int, world: int, init: str, store: str, ledger: str, out: str, max_batches: int | None,
             step0: int, num_workers: int) -> None:
    """One DDP rank: all_reduce per batch (as DDP's gradient sync does), ack, log."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from torch_dataflow import FeatureStoreDataset

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        ds = FeatureStoreDataset(store, ledger, batch_size=2, lease_ttl=120)
        loader = DataLoader(ds, batch_size=2, num_workers=num_workers)
        n = 0
        log: list[Any] = []
        for batch in loader:
            t = torch.ones(1)
            dist.all_reduce(t)  # hangs (and times out) if ranks disagree on the batch count
            n += 1
            ds.ack(batch, step0 + n)
            # Trained (leased) samples only: a padded repeat of the last step has lease "".
            log.append([s for s, lid in zip(batch["__sample_id__"], batch["__lease__"], strict=True) if lid])
            if max_batches is not None and n >= max_batches:
                break
        dist.barrier()
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"rank": rank, "batches": n, "ids": log, "last_step": step0 + n}, f)
    finally:
        dist.destroy_process_group()
