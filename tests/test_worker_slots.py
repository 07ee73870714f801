"""DataLoader workers read batch-direct into the pool's reusable shared slots
(torch_dataflow._shm_slots): same batches as 0 workers, each sample once, a kept
batch never overwritten, and nothing left in /dev/shm or in this process's
descriptors once the loader and the pool are gone (also after a worker is
SIGKILLed)."""

from __future__ import annotations

import gc
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from _batch_helpers import _sample
from torch.utils.data import DataLoader

from torch_dataflow import ConfigError, FeatureWriter
from torch_dataflow.eagle3 import Eagle3Collator
from torch_dataflow.ledger import open_ledger
from torch_dataflow.pool import FeaturePool
from torch_dataflow.sampler import ReshardingSampler

N = 12  # 6 batches of 2 per epoch
KEYS = ("input_ids", "attention_mask", "loss_mask", "hidden_state", "target")


def _dev_shm(pids: list[int]) -> set[str]:
    """Files in /dev/shm made by this process or these workers (torch names them ``torch_<pid>_...``);
    other processes on the machine (and multiprocessing's ``sem.*``) are not ours to count."""
    mine = [os.getpid(), *pids]
    return {n for n in os.listdir("/dev/shm")
            if "torch_dataflow" in n or (not n.startswith("sem.") and any(f"_{p}_" in n for p in mine))}


def _epoch(loader: DataLoader, pids: list[int]) -> list[dict[str, Any]]:
    it = iter(loader)
    batches = list(it)
    pids += [w.pid for w in it._workers]
    return batches


def _memfds(name: str = "memfd:") -> tuple[int, int]:
    """This process's open memfd descriptors and memfd mappings (whose name holds ``name``)."""
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds += name in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    with open("/proc/self/maps") as f:
        maps = sum(name in line for line in f)
    return fds, maps


def _pool(tmp_path: Path, slots: int = 8) -> FeaturePool:
    store, ledger = f"file://{tmp_path}/pool", f"sqlite://{tmp_path}/ledger.db"
    with FeatureWriter(store, ledger) as w:
        for i in range(N):
            w.put(f"s{i:03d}", _sample((3, 9, 5)[i % 3] * 20, 64, i))  # 60-180 tokens: widths differ per batch
    return FeaturePool(store, ledger, worker_slots=slots)


def _expected(pool: FeaturePool, collate: Eagle3Collator, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return collate([pool[pool.index_of(sid)] for sid in batch["__sample_id__"]])


def _check(pool: FeaturePool, collate: Eagle3Collator, batches: list[dict[str, Any]]) -> None:
    for batch in batches:
        expect = _expected(pool, collate, batch)
        for k in KEYS:
            assert batch[k].dtype == expect[k].dtype and torch.equal(batch[k], expect[k]), k


def _loader(pool: FeaturePool, sampler: ReshardingSampler, collate: Eagle3Collator, ctx: str,
            persistent: bool) -> DataLoader:
    return DataLoader(pool, batch_size=2, sampler=sampler, num_workers=2, collate_fn=collate,
                      multiprocessing_context=ctx, persistent_workers=persistent)


@pytest.mark.allow_leaks  # multiprocessing's forkserver lives on, as it does for users
@pytest.mark.parametrize(("ctx", "persistent"), [("fork", True), ("fork", False), ("forkserver", True), ("spawn", False)])
def test_worker_batches_equal_zero_worker_batches_each_sample_once(tmp_path: Path, ctx: str,
                                                                   persistent: bool) -> None:
    pool = _pool(tmp_path)
    collate = Eagle3Collator(max_len=150, with_position_ids=True)
    sampler = ReshardingSampler(pool, shuffle=True, seed=3, lease_ttl=60)
    plain = DataLoader(pool, batch_size=2, sampler=sampler, num_workers=0, collate_fn=collate)
    loader = _loader(pool, sampler, collate, ctx, persistent)
    step = 0
    for epoch in range(3):
        sampler.set_epoch(epoch)
        seen: list[str] = []
        used = False
        for batch in (plain if epoch == 0 else loader):
            step += 1
            ref = None if epoch == 0 else _expected(pool, collate, batch)
            if ref is not None:
                for k in (*KEYS, "position_ids"):
                    assert batch[k].dtype == ref[k].dtype and torch.equal(batch[k], ref[k]), (epoch, k)
                assert pool._slots is not None
                used = used or pool._slots.free_slots() < pool._slots.slots  # this batch sits in a slot
            assert pool.ack(batch, step, strict=True) == []
            seen += batch["__sample_id__"]
        assert sorted(seen) == pool.sample_ids, epoch  # every sample once, none twice
        assert set(open_ledger(pool.ledger.uri).trained_steps(epoch)) == set(pool.sample_ids)
        assert epoch == 0 or used  # the workers' batches came through the slots, not fresh memory
    del batch
    gc.collect()
    assert pool._slots.free_slots() == pool._slots.slots  # no tensor alive: every slot free again


def test_a_kept_batch_is_never_overwritten(tmp_path: Path) -> None:
    pool = _pool(tmp_path, slots=3)  # fewer slots than batches in flight + kept: reuse and fallback both run
    collate = Eagle3Collator()
    sampler = ReshardingSampler(pool, shuffle=False, lease_ttl=60)
    loader = _loader(pool, sampler, collate, "fork", True)
    kept: list[dict[str, Any]] = []
    step = 0
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            step += 1
            pool.ack(batch, step)
            if i % 2 == 0:
                kept.append(batch)  # kept: its slot must stay untouched
            elif i % 3 == 0:
                kept.append({k: v[0] for k, v in batch.items() if isinstance(v, torch.Tensor)} |
                            {"__sample_id__": batch["__sample_id__"], "row0": True})  # only views of row 0 kept
            del batch
    assert pool._slots is not None and pool._slots.free_slots() < pool._slots.slots
    for b in kept:  # checked after three epochs of reuse
        expect = _expected(pool, collate, b)
        for k in KEYS:
            assert torch.equal(b[k], expect[k][0] if "row0" in b else expect[k]), k
    kept.clear()
    gc.collect()
    assert pool._slots.free_slots() == pool._slots.slots


def test_nothing_left_after_the_loader_and_the_pool_are_gone(tmp_path: Path) -> None:
    fds, pids = _memfds(), []
    pool = _pool(tmp_path)
    collate = Eagle3Collator()
    sampler = ReshardingSampler(pool, shuffle=False, lease_ttl=60)
    for persistent in (True, False):
        loader = _loader(pool, sampler, collate, "fork", persistent)
        for epoch in range(2):
            sampler.set_epoch(2 * persistent + epoch)
            batches = _epoch(loader, pids)
            _check(pool, collate, batches)
            del batches
        del loader
    gc.collect()
    assert len(set(pids)) == 6 and _dev_shm(pids) == set()
    del pool, sampler
    gc.collect()
    assert _memfds() == fds  # the slots' memfd closed and unmapped in this process
    assert _dev_shm(pids) == set()


def test_a_sigkilled_worker_leaves_nothing_and_its_slots_come_back(tmp_path: Path) -> None:
    pool = _pool(tmp_path, slots=4)
    collate = Eagle3Collator()
    sampler = ReshardingSampler(pool, shuffle=False, lease_ttl=2)
    loader = _loader(pool, sampler, collate, "fork", True)
    it = iter(loader)
    pids = [w.pid for w in it._workers]
    with pytest.raises(RuntimeError, match="killed by signal|exited unexpectedly"):
        # killed before its first batch arrived (the loader needs that batch first): the error is certain,
        # and whatever slot the worker had claimed is left claimed by a dead process
        os.kill(pids[0], signal.SIGKILL)  # inside: torch's SIGCHLD handler may raise right here
        for batch in it:
            del batch  # a batch kept here would hold its slot
    del it, loader
    gc.collect()
    assert _dev_shm(pids) == set()
    # The next loader of the same pool takes back the slots the dead worker held; every batch intact.
    sampler.set_epoch(1)
    batches = _epoch(_loader(pool, sampler, collate, "fork", False), pids)
    _check(pool, collate, batches)
    assert sorted(s for b in batches for s in b["__sample_id__"]) == pool.sample_ids
    del batches
    gc.collect()
    assert pool._slots is not None and pool._slots.free_slots() == pool._slots.slots
    assert _dev_shm(pids) == set()


def _no_torch_shm(_: int) -> None:
    """worker_init_fn: torch's named shared memory (a /dev/shm file until it is unlinked) is refused."""

    def refuse(*args: Any, **kw: Any) -> Any:
        raise AssertionError("a worker batch went to torch's /dev/shm shared memory")

    torch.UntypedStorage._new_shared = refuse  # type: ignore[method-assign]


def test_past_the_slots_batches_go_to_one_shot_memfds_not_dev_shm(tmp_path: Path) -> None:
    """One slot for 2 workers x prefetch 2 (+ kept batches): the overflow lands in one-shot memfds,
    which have no /dev/shm name a SIGKILL could leave behind; every batch intact, each sample once."""
    pool = _pool(tmp_path, slots=1)
    collate = Eagle3Collator()
    sampler = ReshardingSampler(pool, shuffle=False, lease_ttl=60)
    loader = DataLoader(pool, batch_size=2, sampler=sampler, num_workers=2, collate_fn=collate,
                        multiprocessing_context="fork", worker_init_fn=_no_torch_shm)
    one_shot = "memfd:torch_dataflow-batch"
    batches = list(loader)
    _check(pool, collate, batches)
    assert sorted(s for b in batches for s in b["__sample_id__"]) == pool.sample_ids
    assert _memfds(one_shot)[1] >= len(batches) - 1  # all but the slot's batch are one-shot memfd mappings
    del batches
    gc.collect()
    assert _memfds(one_shot) == (0, 0)  # each one-shot memfd closed and unmapped with its batch
    assert pool._slots is not None and pool._slots.free_slots() == 1


def test_no_slots_keeps_the_fresh_shared_memory_path(tmp_path: Path) -> None:
    pool = _pool(tmp_path, slots=0)
    assert pool._slots is None
    collate = Eagle3Collator()
    sampler = ReshardingSampler(pool, shuffle=False, lease_ttl=60)
    batches = list(_loader(pool, sampler, collate, "fork", False))
    _check(pool, collate, batches)
    assert all(b["hidden_state"].is_shared() for b in batches)  # torch's own shared memory, as before slots


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8", 65, 30000])
def test_worker_slots_must_be_an_int_from_0_to_64(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ConfigError, match="worker_slots"):
        _pool(tmp_path, slots=bad)


def test_a_forked_process_dropping_an_inherited_batch_does_not_free_its_slot() -> None:
    """A worker forked while the main process holds a batch inherits it; the worker dropping its copy
    must not hand the slot back (another worker would overwrite the batch the main process holds)."""
    from torch_dataflow._shm_slots import SlotRing

    ring = SlotRing.create(slots=1, capacity=1 << 20)
    assert ring is not None
    claimed = ring.claim(4096)  # this process plays the worker ...
    assert claimed is not None
    claimed.fill_(7)
    seq = int(ring._map()[1][1])
    del claimed
    batch = torch.empty(0, dtype=torch.uint8).set_(ring._open(0, seq, 4096))  # ... and the main process
    assert ring.free_slots() == 0
    pid = os.fork()
    if pid == 0:  # the forked process drops its inherited copy of the batch
        del batch
        gc.collect()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert ring.free_slots() == 0 and int(batch[0]) == 7  # still held by this process
    del batch
    gc.collect()
    assert ring.free_slots() == 1


def test_a_slot_claimed_by_a_dead_process_is_taken_back() -> None:
    """A worker killed after it claimed a slot (its batch never sent): the slot counts free and the
    next claim takes it."""
    from torch_dataflow._shm_slots import SlotRing

    ring = SlotRing.create(slots=1, capacity=1 << 20)
    assert ring is not None
    pid = os.fork()
    if pid == 0:  # a worker: claims the only slot, then dies without sending it
        os._exit(0 if ring.claim(4096) is not None else 3)
    assert os.waitpid(pid, 0)[1] == 0
    assert int(ring._map()[1][0]) == pid  # still marked as the dead worker's
    assert ring.free_slots() == 1
    again = ring.claim(4096)
    assert again is not None and int(ring._map()[1][0]) == os.getpid()
