"""A FeaturePool built while its producer still commits: the samples committed
after it was built are delivered too (appended to its index), each once, and no
lease is left behind (they crashed the sampler with a KeyError and stayed leased)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from torch_dataflow import FeatureWriter
from torch_dataflow.ledger import open_ledger
from torch_dataflow.pool import FeaturePool
from torch_dataflow.sampler import ReshardingSampler


def _collate(samples: list[dict]) -> dict:
    return {"x": torch.stack([s["x"] for s in samples]), "__sample_id__": [s["__sample_id__"] for s in samples],
            "__lease__": [s["__lease__"] for s in samples]}


@pytest.mark.allow_leaks  # multiprocessing's forkserver lives on, as it does for users
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shuffle", [False, True])
def test_samples_committed_after_the_pool_was_built_are_delivered_once(tmp_path: Path, workers: int,
                                                                       shuffle: bool) -> None:
    store, ledger = f"file://{tmp_path}/feats", f"sqlite://{tmp_path}/ledger.db"
    w = FeatureWriter(store, ledger, name="p")
    for i in range(10):
        w.put(f"a{i}", {"x": torch.full((4,), float(i))})
    pool = FeaturePool(store, ledger)
    assert len(pool) == 10
    for i in range(10):  # the producer goes on after the pool was built
        w.put(f"b{i}", {"x": torch.full((4,), 100.0 + i)})
    w.close()
    sampler = ReshardingSampler(pool, shuffle=shuffle, seed=1, lease_ttl=60)
    assert len(sampler) == 20
    loader = DataLoader(pool, batch_size=3, sampler=sampler, num_workers=workers, collate_fn=_collate)
    seen: list[str] = []
    for step, batch in enumerate(loader, 1):
        for sid, x in zip(batch["__sample_id__"], batch["x"], strict=True):
            assert float(x[0]) == (100.0 + int(sid[1:]) if sid[0] == "b" else float(sid[1:]))
        assert pool.ack(batch, step, strict=True) == []
        seen += batch["__sample_id__"]
    assert sorted(seen) == sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)])
    c = open_ledger(ledger).counts(epoch=0)
    assert (c.leased, c.pending, c.trained) == (0, 0, 20)
    assert len(pool) == 20 and pool.sample_id(pool.index_of("b3")) == "b3"


def _train_epoch(pool: FeaturePool, sampler: ReshardingSampler, epoch: int, first_step: int) -> tuple[list[str], int]:
    sampler.set_epoch(epoch)
    seen, step = [], first_step
    for batch in DataLoader(pool, batch_size=4, sampler=sampler, collate_fn=_collate):
        step += 1
        assert pool.ack(batch, step, strict=True) == []
        seen += batch["__sample_id__"]
    pool.mark_durable(step)
    return seen, step


@pytest.mark.parametrize("sized_first", [False, True])
def test_fresh_run_trains_files_that_came_after_epoch_0_in_every_epoch(tmp_path: Path, sized_first: bool) -> None:
    # Run 1 trains epoch 0 over 10 samples; 6 more are committed once epoch 1 has begun (sized 10).
    # A fresh run (no checkpoint: reconcile(None)) trains all 16 in epoch 0 too, each once
    # (before, its epoch 0 had only the first 10). sized_first: its sampler was sized before the
    # reconcile, as a DataLoader built before Lightning's fit starts is.
    store, ledger = f"file://{tmp_path}/feats", f"sqlite://{tmp_path}/ledger.db"
    w = FeatureWriter(store, ledger, name="p")
    for i in range(10):
        w.put(f"a{i}", {"x": torch.full((4,), float(i))})
    pool = FeaturePool(store, ledger)
    sampler = ReshardingSampler(pool, shuffle=True, seed=2, lease_ttl=60)
    seen, step = _train_epoch(pool, sampler, 0, 0)
    assert len(seen) == 10
    sampler.set_epoch(1)
    assert len(sampler) == 10  # epoch 1 is begun: what comes now has no epoch-0 delivery
    for i in range(6):
        w.put(f"b{i}", {"x": torch.full((4,), 100.0 + i)})
    w.close()
    seen, step = _train_epoch(pool, sampler, 1, step)
    assert sorted(seen) == sorted(f"a{i}" for i in range(10))  # the epoch's length was fixed when it began
    every = sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(6)])

    pool2 = FeaturePool(store, ledger)
    sampler2 = ReshardingSampler(pool2, shuffle=True, seed=2, lease_ttl=60)
    if sized_first:
        assert len(sampler2) == 10  # epoch 0 of the old run, before the reconcile (it begins epoch 0)
    pool2.reconcile(None)
    assert len(sampler2) == 16
    step = 0
    for epoch in (0, 1):
        seen, step = _train_epoch(pool2, sampler2, epoch, step)
        assert sorted(seen) == every, epoch
    c = open_ledger(ledger).counts(epoch=0)
    assert (c.pending, c.leased, c.durable) == (0, 0, 16)
