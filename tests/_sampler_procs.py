"""Process bodies for the ReshardingSampler DDP tests (importable by spawned children)."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import torch


def ddp_train(
    rank: int,
    world: int,
    init: str,
    store: str,
    ledger: str,
    out: str,
    epochs: list[int],
    step0: int,
    stop_at: int | None = None,
    batch_size: int = 2,
    num_workers: int = 2,
) -> None:
    """One DDP rank training through a ReshardingSampler over a real DataLoader.

    Per batch: an all_reduce (DDP's gradient sync: it hangs if ranks disagree
    on the batch count), the optimizer step number, the ack, then one log
    line, fsynced — the training step's own record of what its model has
    seen, written after the ack as a checkpoint is. With ``stop_at``, rank 0
    completes global step ``stop_at`` and rank 1 stops just before acking it
    (killed between its optimizer step and its ack); both then wait to be
    SIGKILLed by the test.
    """
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from torch_dataflow.pool import FeaturePool
    from torch_dataflow.sampler import ReshardingSampler

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    pool = FeaturePool(store, ledger)
    sampler = ReshardingSampler(pool, shuffle=True, seed=7, lease_ttl=120)  # rank and world from the group
    # Workers fork, as under torchrun (this rank was spawned, which would make them spawn too).
    loader = DataLoader(
        pool,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        drop_last=True,
        multiprocessing_context="fork" if num_workers else None,
    )
    step = step0
    with open(Path(out) / f"log.{rank}.jsonl", "a") as log:
        for epoch in epochs:
            sampler.set_epoch(epoch)
            # len(loader) is the full epoch's count; a resumed epoch yields what is left.
            assert len(loader) == sampler.num_samples // batch_size
            planned = sampler.remaining() // batch_size
            seen = 0
            for batch in loader:
                t = torch.ones(1)
                dist.all_reduce(t)
                step += 1
                seen += 1
                if stop_at is not None and step == stop_at and rank == 1:
                    _wait_to_be_killed(out, rank)
                pool.ack(batch, step, strict=True)
                ids = batch["__sample_id__"]
                assert all(f"s{int(v):05d}" == s for v, s in zip(batch["i"], ids, strict=True))
                log.write(
                    json.dumps(
                        {"rank": rank, "epoch": epoch, "step": step, "ids": ids, "planned": planned, "world": world}
                    )
                    + "\n"
                )
                log.flush()
                os.fsync(log.fileno())
                if stop_at is not None and step == stop_at:
                    _wait_to_be_killed(out, rank)
            assert seen == planned, (seen, planned)
    dist.barrier()
    dist.destroy_process_group()


def _wait_to_be_killed(out: str, rank: int) -> None:
    Path(out, f"stopped.{rank}").write_text(str(os.getpid()))
    time.sleep(600)
    raise SystemExit(f"rank {rank} was not killed")
