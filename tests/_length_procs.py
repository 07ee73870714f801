"""A length-grouped training run that SIGKILLs itself (tests/test_length_batching.py).

Runs ``world`` ranks of a ``FeatureStoreDataset(group_by_length=True)`` in one
process, in lockstep, logging every step before its ack (fsync'd JSON lines),
acking each step and checkpointing (``mark_durable``) every ``ckpt_every``
steps. With ``kill_after`` it claims the next step and kills itself with
SIGKILL before training it: leases held, acks after the last checkpoint lost.
With ``ranks`` (a subset of ``range(world)``) it runs only those: one process
per rank, racing each other on the ledger as DDP ranks do (no checkpoints then).
With ``face="sampler"`` the ranks are ``ReshardingSampler(group_by_length=True)``
+ ``DataLoader`` over one ``FeaturePool`` instead.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
from typing import Any

from torch_dataflow import FeatureStoreDataset


def _sampler_face(cfg: dict[str, Any], world: int, batch: int) -> tuple[list[Any], list[Any]]:
    """``face="sampler"``: a FeaturePool and one ReshardingSampler + DataLoader per rank."""
    from torch.utils.data import DataLoader

    from torch_dataflow.pool import FeaturePool
    from torch_dataflow.sampler import ReshardingSampler

    pool = FeaturePool(cfg["store"], cfg["ledger"])
    if cfg.get("resume") is not None:
        pool.reconcile(int(cfg["resume"]))
    samplers = [ReshardingSampler(pool, world, r, seed=int(cfg["seed"]), group_by_length=True, batch_size=batch)
                for r in cfg.get("ranks", range(world))]
    for s in samplers:
        s.remaining()  # every rank sizes the epoch before any ack, as under DDP
    loaders = [iter(DataLoader(pool, batch_size=batch, sampler=s, collate_fn=list)) for s in samplers]
    return [(lambda it=it: next(it, [])) for it in loaders], [pool] * len(samplers)


def run(cfg: dict[str, Any]) -> None:
    world, batch = int(cfg["world"]), int(cfg["batch"])
    if cfg.get("face") == "sampler":
        nexts, dss = _sampler_face(cfg, world, batch)
    else:
        dss = [FeatureStoreDataset(cfg["store"], cfg["ledger"], mode="offline", batch_size=batch, rank=r,
                                   world_size=world, seed=int(cfg["seed"]), group_by_length=True, idle_timeout=10)
               for r in cfg.get("ranks", range(world))]
        if cfg.get("resume") is not None:
            dss[0].reconcile(int(cfg["resume"]))
        its = [iter(ds) for ds in dss]
        nexts = [(lambda it=it: list(itertools.islice(it, batch))) for it in its]
    step = int(cfg.get("step0", 0))
    with open(cfg["log"], "a") as log:
        def write(rec: dict[str, Any]) -> None:
            log.write(json.dumps(rec) + "\n")
            log.flush()
            os.fsync(log.fileno())

        while True:
            batches = [nxt() for nxt in nexts]
            if cfg.get("kill_after") is not None and step - int(cfg.get("step0", 0)) >= int(cfg["kill_after"]):
                os.kill(os.getpid(), signal.SIGKILL)  # this step's leases held, nothing trained
            if not any(batches):
                break
            step += 1
            write({"step": step, "ids": [[s["__sample_id__"] for s in b] for b in batches],
                   "leases": [[s["__lease__"] for s in b] for b in batches]})
            for ds, b in zip(dss, batches, strict=True):
                ds.ack(b, step, strict=True)
            if step % int(cfg["ckpt_every"]) == 0:
                dss[0].mark_durable(step)
                write({"durable": step})
    write_done = {"done": step}
    with open(cfg["log"], "a") as log:
        log.write(json.dumps(write_done) + "\n")


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
