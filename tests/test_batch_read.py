"""Batch-direct reads (torch_dataflow.batch_read): identical batches to the per-sample path,
the same quarantine of corrupt bytes, buffer reuse only when a batch is gone, workers."""

from __future__ import annotations

import os
from itertools import count
from pathlib import Path

import pytest
import torch
from _batch_helpers import CASES, _same, _sample, check_corrupt_middle_sample, check_direct_batch, rot
from torch.utils.data import DataLoader, default_collate

from torch_dataflow import CorruptSample, FeatureWriter, SampleUnavailable, open_ledger
from torch_dataflow.batch_read import BufferPool, LazyBatch, read_batch
from torch_dataflow.eagle3 import Eagle3Collator
from torch_dataflow.pool import FeaturePool
from torch_dataflow.sampler import ReshardingSampler
from torch_dataflow.stores import open_store

_names = count()


def _stores(tmp_path: Path) -> list[str]:
    return [f"memory://br-{os.getpid()}-{next(_names)}", f"file://{tmp_path}/features-{next(_names)}"]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_direct_batch_is_identical_to_the_per_sample_path(tmp_path: Path, case: int) -> None:
    for uri in _stores(tmp_path):
        check_direct_batch(open_store(uri), case)


def test_layouts_the_collator_refuses_fall_back_and_raise_its_errors(tmp_path: Path) -> None:
    store = open_store(_stores(tmp_path)[0])
    good = store.put("a", 1, _sample(4, 4, 0))
    wide = store.put("b", 1, _sample(4, 8, 1))  # another H in the same batch
    bad = store.put("c", 1, {"input_ids": torch.arange(3), "loss_mask": torch.ones(3)})
    collate = Eagle3Collator()
    assert read_batch(store, [good, wide], collate) is None
    assert read_batch(store, [good, bad], collate) is None
    assert read_batch(store, [], collate) is None


@pytest.mark.parametrize("how", ["flip", "truncate", "other_blob"])
def test_corrupt_bytes_raise_like_the_per_sample_path(tmp_path: Path, how: str) -> None:
    for uri in _stores(tmp_path):
        check_corrupt_middle_sample(open_store(uri), how)


def test_header_flip_is_caught(tmp_path: Path) -> None:
    store = open_store(_stores(tmp_path)[1])
    ref = store.put("s", 1, _sample(5, 4, 0))
    blob = bytearray(store._read("s", 1))
    blob[20] ^= 0x01  # inside the JSON header
    rot(store, "s", 1, bytes(blob))
    with pytest.raises(CorruptSample):
        read_batch(store, [ref], Eagle3Collator())


def test_missing_bytes_raise_sample_unavailable(tmp_path: Path) -> None:
    for uri in _stores(tmp_path):
        store = open_store(uri)
        ref = store.put("s", 1, _sample(5, 4, 0))
        store.delete(ref)
        with pytest.raises(SampleUnavailable):
            read_batch(store, [ref], Eagle3Collator())


def _pool(tmp_path: Path, n: int, lengths: list[int] | None = None) -> FeaturePool:
    store, ledger = f"file://{tmp_path}/pool", f"sqlite://{tmp_path}/ledger.db"
    with FeatureWriter(store, ledger) as w:
        for i in range(n):
            w.put(f"s{i:03d}", _sample((lengths or [3, 6, 4])[i % len(lengths or [3, 6, 4])], 4, i))
    return FeaturePool(store, ledger)


@pytest.mark.parametrize("workers", [0, 2])
def test_pool_loader_batches_match_and_ack_exactly_once(tmp_path: Path, workers: int) -> None:
    pool = _pool(tmp_path, 10)
    collate = Eagle3Collator(max_len=5, with_position_ids=True)
    sampler = ReshardingSampler(pool, shuffle=True, seed=1, lease_ttl=60)
    loader = DataLoader(pool, batch_size=3, sampler=sampler, num_workers=workers, collate_fn=collate)
    seen = []
    for step, batch in enumerate(loader, start=1):
        expect = collate([pool[pool.index_of(sid)] for sid in batch["__sample_id__"]])
        for k in ("input_ids", "attention_mask", "loss_mask", "hidden_state", "target", "position_ids"):
            assert torch.equal(batch[k], expect[k]) and batch[k].dtype == expect[k].dtype, k
        if workers:  # landed in one of the pool's shared slots (torch_dataflow._shm_slots): the hop copied nothing
            assert pool._slots is not None and pool._slots.free_slots() < pool._slots.slots
        assert len(batch["__lease__"]) == len(batch["__sample_id__"]) and all(batch["__lease__"])
        assert pool.ack(batch, step, strict=True) == []
        seen += batch["__sample_id__"]
    assert sorted(seen) == pool.sample_ids
    assert set(open_ledger(pool.ledger.uri).trained_steps(0)) == set(pool.sample_ids)


def test_pool_quarantines_a_corrupt_sample_on_the_direct_path(tmp_path: Path) -> None:
    pool = _pool(tmp_path, 4)
    ref = pool.ledger.get_ref("s001")
    assert ref is not None
    rot(pool.store, "s001", ref.generation, b"not a sample at all")
    indices = list(ReshardingSampler(pool, shuffle=False))
    batch = pool.__getitems__(indices[:3])
    with pytest.raises(CorruptSample):
        Eagle3Collator()(batch)
    assert [r.sample_id for r, _ in pool.ledger.quarantined() if r is not None] == ["s001"]


def test_plain_collate_sees_per_sample_dicts(tmp_path: Path) -> None:
    pool = _pool(tmp_path, 4, lengths=[4])
    items = pool.__getitems__([0, 1])
    assert isinstance(items, LazyBatch) and len(items) == 2
    assert [s["__sample_id__"] for s in items] == ["s000", "s001"]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(items, [pool[0], pool[1]], strict=True) for k in a
               if isinstance(a[k], torch.Tensor))
    batch = default_collate(items)
    assert batch["input_ids"].shape == (2, 1, 4)
    assert Eagle3Collator()(items)["input_ids"].shape == (2, 4)  # already read: the per-sample path


def test_buffer_returns_to_the_pool_only_when_every_view_is_gone() -> None:
    pool = BufferPool(max_buffers=2)
    a = pool.take(4 << 20)
    ptr = a.data_ptr()
    kept = a[100:200].view(torch.int16)
    arr = a[:10].numpy()
    del a
    b = pool.take(4 << 20)
    assert b.data_ptr() != ptr  # a view and a numpy array still use the first buffer
    del kept
    c = pool.take(4 << 20)
    assert c.data_ptr() not in (ptr, b.data_ptr())  # arr still holds it; the pool is full: fresh memory
    del arr, c
    assert pool.take(4 << 20).data_ptr() == ptr
    assert pool.pooled_bytes >= 8 << 20


def test_batches_kept_by_the_caller_are_never_overwritten(tmp_path: Path) -> None:
    store = open_store(_stores(tmp_path)[0])
    refs = [store.put(f"s{i}", 1, _sample(64, 2048, i)) for i in range(4)]  # ~3 MB per batch: pooled
    collate = Eagle3Collator()
    pool = BufferPool(max_buffers=2)
    kept = [read_batch(store, refs[i : i + 2], collate, buffers=pool) for i in (0, 2, 0, 2)]
    for batch, i in zip(kept, (0, 2, 0, 2), strict=True):
        _same(batch, collate([store.get(r) for r in refs[i : i + 2]]))  # type: ignore[arg-type]


def test_batches_kept_from_workers_stay_intact(tmp_path: Path) -> None:
    pool = _pool(tmp_path, 12, lengths=[5, 2, 7])
    collate = Eagle3Collator()
    sampler = ReshardingSampler(pool, shuffle=False, lease_ttl=60)
    kept = list(DataLoader(pool, batch_size=2, sampler=sampler, num_workers=2, collate_fn=collate))
    assert sum(len(b["__sample_id__"]) for b in kept) == 12
    for batch in kept:  # checked after the whole epoch: no buffer was reused under a live batch
        expect = collate([pool[pool.index_of(sid)] for sid in batch["__sample_id__"]])
        for k in ("input_ids", "attention_mask", "loss_mask", "hidden_state", "target"):
            assert torch.equal(batch[k], expect[k]), k
