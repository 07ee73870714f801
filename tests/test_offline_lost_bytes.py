"""An offline pool reads every sample again each epoch: a sample whose bytes the store
lost after it was trained in an earlier epoch must be put again by a resumed producer,
or the next epoch quarantines it. One trained in the current epoch must not (it would
train twice)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from torch_dataflow import FeatureStoreDataset, FeatureWriter
from torch_dataflow.acking import StepAcker
from torch_dataflow.stores.shared_dir import SharedDirStore

N = 6


def _write(store: str, ledger: str, ids: list[str] | None = None) -> list[str]:
    with FeatureWriter(store, ledger, name="p", resume=True) as w:
        todo = w.missing([f"s{i}" for i in range(N)]) if ids is None else ids
        for sid in todo:
            w.put(sid, {"x": torch.full((8,), float(sid[1:]))})
    return todo


def _epoch(ds: FeatureStoreDataset, acker: StepAcker, epoch: int) -> list[str]:
    ds.set_epoch(epoch)
    seen = []
    for batch in DataLoader(ds, batch_size=2):
        seen += batch["__sample_id__"]
        acker.add(batch)
        acker.after_step()
    acker.checkpoint_written()
    return sorted(seen)


def test_lost_bytes_after_an_earlier_epoch_are_put_again(tmp_path: Path) -> None:
    store, ledger = f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db"
    assert len(_write(store, ledger)) == N
    ds = FeatureStoreDataset(store, ledger, batch_size=2, mode="offline")
    acker = StepAcker(ds)
    acker.resume(None)
    ids = [f"s{i}" for i in range(N)]
    assert _epoch(ds, acker, 0) == sorted(ids)

    lost = ["s1", "s4"]
    st = SharedDirStore(str(tmp_path / "s"), create=False)
    for sid in lost:
        ref = ds.ledger.get_ref(sid)
        os.unlink(st.path_of(sid, ref.generation))
    ds.ledger.begin_epoch(1)  # epoch 1 has begun; none of it trained yet
    assert sorted(_write(store, ledger)) == lost  # put again: epoch 1 reads them

    assert _epoch(ds, acker, 1) == sorted(ids)
    c = ds.ledger.counts()
    assert c.quarantined == 0
    # In the current epoch every sample is trained: lost bytes now are not put again (no second training).
    ref = ds.ledger.get_ref("s2")
    os.unlink(st.path_of("s2", ref.generation))
    assert _write(store, ledger) == []
    acker.finish(warn=False)
