"""ReshardingSampler + FeaturePool: DistributedSampler parity, leases, resharding, DDP crash/resume."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from itertools import count
from pathlib import Path
from typing import Any

import _sampler_procs
import pytest
import torch
from _batch_helpers import rot
from torch.utils.data import DataLoader, DistributedSampler

from torch_dataflow import ConfigError, CorruptSample, FeatureWriter, LeaseLost, open_ledger
from torch_dataflow.pool import FeaturePool, PoolIndex
from torch_dataflow.sampler import ReshardingSampler

CTX = mp.get_context("spawn")
ROOT = Path(__file__).resolve().parents[1]
_names = count()


def _sample(i: int) -> dict[str, torch.Tensor]:
    return {"x": torch.full((4,), float(i)), "i": torch.tensor(i)}


def _fill(store: str, ledger: str, n: int) -> None:
    with FeatureWriter(store, ledger) as w:
        w.put_many([(f"s{i:05d}", _sample(i)) for i in range(n)])


def _memory_pool(n: int) -> FeaturePool:
    name = f"sampler-test-{os.getpid()}-{next(_names)}"
    _fill(f"memory://{name}", f"memory://{name}", n)
    return FeaturePool(f"memory://{name}", f"memory://{name}")


def _files(tmp_path: Path) -> tuple[str, str]:
    return f"file://{tmp_path}/features", f"sqlite://{tmp_path}/ledger.db"


def _ranks(pool: FeaturePool, world: int, **kw: object) -> list[list[int]]:
    """Every rank's indices for the sampler's current epoch (ranks run one after another)."""
    return [[int(i) for i in ReshardingSampler(pool, world, r, **kw)] for r in range(world)]  # type: ignore[arg-type]


# ---------------------------------------------------------------- DistributedSampler parity
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("n", [10, 11])
@pytest.mark.parametrize("drop_last", [True, False])
def test_same_partition_as_distributed_sampler_without_shuffle(world: int, n: int, drop_last: bool) -> None:
    pool = _memory_pool(n)
    ours = _ranks(pool, world, shuffle=False, drop_last=drop_last)
    theirs = [list(DistributedSampler(range(n), world, r, shuffle=False, drop_last=drop_last)) for r in range(world)]
    assert [len(x) for x in ours] == [len(x) for x in theirs]
    assert ours == theirs  # padded slots too: the head of the global list, as DistributedSampler pads


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("n", [12, 13])
@pytest.mark.parametrize("drop_last", [True, False])
def test_shuffled_epochs_match_distributed_sampler_multiset_and_lengths(world: int, n: int, drop_last: bool) -> None:
    pool = _memory_pool(n)
    orders = []
    for epoch in range(3):
        ours, theirs = [], []
        for r in range(world):
            s = ReshardingSampler(pool, world, r, shuffle=True, seed=3, drop_last=drop_last)
            d = DistributedSampler(range(n), world, r, shuffle=True, seed=3, drop_last=drop_last)
            s.set_epoch(epoch)
            d.set_epoch(epoch)
            assert len(s) == len(d)
            ours.append([int(i) for i in s])
            theirs.append(list(d))
        assert [len(x) for x in ours] == [len(x) for x in theirs] == [len(ours[0])] * world
        flat = [i for x in ours for i in x]
        if n % world == 0:
            assert Counter(flat) == Counter(i for x in theirs for i in x) == Counter(range(n))
        else:
            assert len(set(flat)) == (n // world) * world if drop_last else set(flat) == set(range(n))
        orders.append(flat)
    assert orders[0] != orders[1] != orders[2], "every epoch is reshuffled"


def test_shuffle_is_identical_on_every_rank_and_seeded() -> None:
    a, b = _memory_pool(20), _memory_pool(20)
    assert _ranks(a, 2, seed=5) == _ranks(b, 2, seed=5)
    assert _ranks(_memory_pool(20), 2, seed=6) != _ranks(_memory_pool(20), 2, seed=5)


# ---------------------------------------------------------------- leases and exactly-once
def test_dataloader_workers_pin_memory_persistent_and_acks(tmp_path: Path) -> None:
    store, ledger = _files(tmp_path)
    _fill(store, ledger, 24)
    pool = FeaturePool(store, ledger)
    sampler = ReshardingSampler(pool, lease_ttl=60)
    loader = DataLoader(
        pool, batch_size=5, sampler=sampler, num_workers=2, pin_memory=True, persistent_workers=True, drop_last=False
    )
    step = 0
    with pytest.warns(UserWarning, match="pin_memory") if not torch.cuda.is_available() else _nothing():
        for epoch in range(2):
            sampler.set_epoch(epoch)
            assert len(loader) == 5
            seen = []
            for batch in loader:
                assert isinstance(batch["x"], torch.Tensor) and len(batch["__lease__"]) == len(batch["x"])
                step += 1
                assert pool.ack(batch, step, strict=True) == []
                seen += batch["__sample_id__"]
            assert sorted(seen) == pool.sample_ids
            assert set(open_ledger(ledger).trained_steps(epoch)) == set(pool.sample_ids)
    del loader  # persistent workers end with the loader


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_never_hands_out_leased_aborted_or_trained() -> None:
    pool = _memory_pool(12)
    led = pool.ledger
    led.begin_epoch(0, seed=0, shuffle=False)
    held = led.lease("someone-else", 2, ttl=60)
    led.ack([lease.lease_id for lease in led.lease("trainer", 2, ttl=60)], step=1)
    FeatureWriter(pool.store, led).abort(["s00010", "s00011"])
    sampler = ReshardingSampler(pool, shuffle=False)
    got = [pool.sample_id(i) for i in sampler]
    assert got == [f"s{i:05d}" for i in range(4, 10)]
    assert not {lease.sample_id for lease in held} & set(got)
    # Leases held elsewhere are counted as undone: the pass ends early, on every rank alike.
    assert sampler.remaining() == 8
    assert len(sampler) == 10  # the whole epoch (the 2 aborted are not in it), as DistributedSampler counts


def test_indices_carry_leases_and_pool_reads_them() -> None:
    pool = _memory_pool(3)
    idx = next(iter(ReshardingSampler(pool, shuffle=False)))
    assert isinstance(idx, PoolIndex) and idx == 0 and idx.lease_id
    import pickle

    again = pickle.loads(pickle.dumps(idx))
    assert (int(again), again.lease_id) == (0, idx.lease_id)
    item = pool[again]
    assert item["__lease__"] == idx.lease_id and item["__sample_id__"] == "s00000" and int(item["i"]) == 0
    assert pool[idx.lease_id]["__sample_id__"] == "s00000"  # a lease id works as a key too
    plain = pool[2]
    assert "__lease__" not in plain and int(plain["i"]) == 2 and int(pool[-1]["i"]) == 2


def test_padding_repeats_the_head_without_a_lease_and_counts_once() -> None:
    pool = _memory_pool(5)
    samplers = [ReshardingSampler(pool, 2, r, shuffle=False, drop_last=False) for r in range(2)]
    out = [list(s) for s in samplers]
    assert [len(x) for x in out] == [3, 3]
    assert int(out[1][-1]) == 0 and out[1][-1].lease_id == ""  # DistributedSampler's pad: the head, no lease
    for r, indices in enumerate(out):
        batch = [pool[i] for i in indices]
        assert pool.ack(batch, step=r + 1, strict=True) == []
    assert open_ledger(pool.ledger).trained_steps(0) == {f"s{i:05d}": 1 + (i % 2) for i in range(5)}


def test_dead_rank_leases_come_back_after_expiry() -> None:
    pool = _memory_pool(10)
    dying = iter(ReshardingSampler(pool, shuffle=False, lease_ttl=0.3))
    taken = [next(dying) for _ in range(3)]  # leased, never acked: the rank dies
    del dying
    time.sleep(0.4)
    rescuer = ReshardingSampler(pool, shuffle=False)
    got = list(rescuer)
    assert [int(i) for i in got] == list(range(10))
    assert {pool.sample_id(i) for i in taken} <= {pool.sample_id(i) for i in got}
    assert pool.ack([pool[i] for i in got], step=1, strict=True) == []
    with pytest.raises(LeaseLost):  # the dead rank's leases are gone for good
        pool.ack([pool[i] for i in taken], step=2, strict=True)


def test_expired_slot_is_padded_so_ranks_stay_even() -> None:
    pool = _memory_pool(6)
    r0 = iter(ReshardingSampler(pool, 2, 0, shuffle=False, lease_ttl=0.2))
    first = next(r0)  # materialises step 0 for both ranks
    time.sleep(0.3)  # rank 1's slot expires before rank 1 claims it
    r1 = [int(i) for i in ReshardingSampler(pool, 2, 1, shuffle=False, lease_ttl=60)]
    rest = [int(i) for i in r0]
    assert len([first, *rest]) == len(r1) == 3


def test_reshard_2_to_3_mid_epoch_in_process() -> None:
    pool = _memory_pool(30)
    its = [iter(ReshardingSampler(pool, 2, r, seed=1, drop_last=True)) for r in range(2)]
    done = []
    for step in range(1, 5):  # four steps of one sample per rank, acked
        batch = [pool[next(it)] for it in its]
        pool.ack(batch, step, strict=True)
        done += [b["__sample_id__"] for b in batch]
    _prefetched = [next(it) for it in its]  # leased, never trained: the job dies here
    pool.reconcile(resume_step=4)
    samplers = [ReshardingSampler(pool, 3, r, seed=1, drop_last=True) for r in range(3)]
    assert [s.remaining() for s in samplers] == [(30 - 8) // 3] * 3
    assert [len(s) for s in samplers] == [30 // 3] * 3  # len() stays the full epoch's share
    rest = [pool.sample_id(i) for s in samplers for i in s]
    assert len(rest) == len(set(rest)) == 21 and not set(rest) & set(done)
    left = set(pool.sample_ids) - set(done) - set(rest)
    assert len(left) == 1  # drop_last: the one-sample tail stays pending for the next run
    for s in samplers:
        s.set_epoch(1)
    assert [len(s) for s in samplers] == [10, 10, 10]  # the next epoch is balanced over the new width


def test_corrupt_leased_sample_is_quarantined_and_raised() -> None:
    pool = _memory_pool(4)
    ref = pool.ledger.get_ref("s00001")
    assert ref is not None
    rot(pool.store, "s00001", ref.generation, b"not a sample")  # bit rot under a committed ref
    indices = list(ReshardingSampler(pool, shuffle=False))
    with pytest.raises(CorruptSample):
        pool[indices[1]]
    assert [r.sample_id for r, _ in pool.ledger.quarantined() if r is not None] == ["s00001"]
    pool.ledger.reconcile(None)
    assert "s00001" not in {pool.sample_id(i) for i in ReshardingSampler(pool, shuffle=False)}


# ---------------------------------------------------------------- errors
def test_bad_arguments() -> None:
    pool = _memory_pool(2)
    with pytest.raises(TypeError, match="FeaturePool"):
        ReshardingSampler(list(range(4)))  # type: ignore[arg-type]
    for kw in (
        {"num_replicas": 0},
        {"num_replicas": 2, "rank": 2},
        {"num_replicas": 2, "rank": -1},
        {"rank": 1.0},
        {"num_replicas": True},
        {"lease_ttl": 0},
    ):
        with pytest.raises(ValueError):
            ReshardingSampler(pool, **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="same id twice"):
        FeaturePool(pool.store, pool.ledger, sample_ids=["s00000", "s00000"])
    with pytest.raises(ConfigError):
        FeaturePool(pool.store, pool.ledger, sample_ids=["../etc"])
    with pytest.raises(IndexError):
        pool[2]
    with pytest.raises(TypeError):
        pool[1.5]  # type: ignore[index]
    with pytest.raises(LeaseLost):
        pool["not-a-lease"]
    with pytest.raises(KeyError):
        pool.index_of("nope")


# ---------------------------------------------------------------- SpecForge
def test_specforge_directory_through_import(tmp_path: Path) -> None:
    from torch_dataflow.eagle3 import SpecForgeDirectory, eagle3_collate, import_directory, write_specforge_directory

    write_specforge_directory(tmp_path / "hs", n=12, seq_lens=[5, 7], hidden=8, group=5)
    store, ledger = _files(tmp_path)
    assert import_directory(tmp_path / "hs", store, ledger, progress=False) == 12
    src = SpecForgeDirectory(tmp_path / "hs")
    pool = FeaturePool.from_specforge(src, store, ledger)
    assert pool.sample_ids == [src.sample_id(i) for i in range(12)]
    assert torch.equal(pool[7]["aux_hidden_state"], src[7]["aux_hidden_state"])
    ours = _ranks(pool, 2, shuffle=False)
    assert ours == [list(DistributedSampler(src, 2, r, shuffle=False)) for r in range(2)]
    pool.ledger.reconcile(None)  # forget the parity pass: train the epoch from scratch
    loader = DataLoader(pool, batch_size=4, sampler=ReshardingSampler(pool), collate_fn=eagle3_collate)
    batches = list(loader)
    assert [b["hidden_state"].shape[-1] for b in batches] == [24] * 3
    assert sorted(s for b in batches for s in b["__sample_id__"]) == sorted(pool.sample_ids)


# ---------------------------------------------------------------- DDP: 2 ranks killed, resumed with 3
def _run_ranks(
    tmp_path: Path, tag: str, world: int, store: str, ledger: str, epochs: list[int], step0: int, stop_at: int | None
) -> list[Any]:
    out = tmp_path / tag
    out.mkdir()
    init = f"file://{tmp_path}/pg-{tag}"
    procs = [
        CTX.Process(
            target=_sampler_procs.ddp_train,
            name=f"{tag}-rank{r}",
            args=(r, world, init, store, ledger, str(out), epochs, step0, stop_at),
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    return procs


def _log(tmp_path: Path, tag: str) -> list[dict]:
    return [
        json.loads(line) for f in sorted((tmp_path / tag).glob("log.*.jsonl")) for line in f.read_text().splitlines()
    ]


def test_ddp_killed_mid_epoch_resumes_with_three_ranks_exactly_once(tmp_path: Path) -> None:
    store, ledger = _files(tmp_path)
    n, stop = 48, 4  # world 2 x batch 2: 12 steps per epoch; killed at step 4
    _fill(store, ledger, n)

    procs = _run_ranks(tmp_path, "w2", 2, store, ledger, [0, 1], 0, stop)
    deadline = time.monotonic() + 90
    while not all((tmp_path / "w2" / f"stopped.{r}").exists() for r in range(2)):
        assert time.monotonic() < deadline and all(p.is_alive() for p in procs), [p.exitcode for p in procs]
        time.sleep(0.05)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [-signal.SIGKILL] * 2

    # The checkpoint holds the steps every rank logged (a log line is written after its ack).
    before = _log(tmp_path, "w2")
    resume = min(max(e["step"] for e in before if e["rank"] == r) for r in range(2))
    assert resume == stop - 1  # rank 1 died between its optimizer step and its ack
    kept = [e for e in before if e["step"] <= resume]
    report = FeaturePool(store, ledger).reconcile(resume)  # keeps the bytes: epoch 1 reads them again
    assert report.replayed == 2 and report.released > 0  # rank 0's step 4, and prefetched leases

    procs = _run_ranks(tmp_path, "w3", 3, store, ledger, [0, 1], resume, None)
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    after = _log(tmp_path, "w3")

    epoch0 = [s for e in kept + after if e["epoch"] == 0 for s in e["ids"]]
    assert sorted(epoch0) == [f"s{i:05d}" for i in range(n)], "every sample of epoch 0 trained exactly once"
    rest = [e for e in after if e["epoch"] == 0]
    assert {e["planned"] for e in rest} == {(n - 2 * 2 * resume) // 3 // 2}  # len(loader) equal on every rank
    assert Counter(e["rank"] for e in rest) == {0: 6, 1: 6, 2: 6}
    epoch1 = [e for e in after if e["epoch"] == 1]
    assert Counter(e["rank"] for e in epoch1) == {0: 8, 1: 8, 2: 8}  # balanced over the new width
    assert sorted(s for e in epoch1 for s in e["ids"]) == [f"s{i:05d}" for i in range(n)]

    led = open_ledger(ledger)
    for epoch in (0, 1):
        steps = led.trained_steps(epoch)
        assert set(steps) == set(pool_ids := [f"s{i:05d}" for i in range(n)]), epoch
        logged = {s: e["step"] for e in kept + after if e["epoch"] == epoch for s in e["ids"]}
        assert steps == logged and len(pool_ids) == n  # the ledger and the log agree sample by sample
    c = led.counts()
    assert (c.pending, c.leased) == (0, 0)


# ---------------------------------------------------------------- examples
@pytest.mark.parametrize("script", ["legacy_train_eagle3.py", "migrated_train_eagle3.py"])
def test_examples_run(tmp_path: Path, script: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done" in res.stdout


def test_step_acker_accepts_a_pool_and_skips_padding(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from torch_dataflow import FeaturePool, FeatureWriter, ReshardingSampler, StepAcker
    from torch_dataflow.acking import find_lease_ids

    store, ledger = f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db"
    with FeatureWriter(store, ledger) as w:
        for i in range(4):
            w.put(f"a{i}", {"x": torch.ones(2)})
    pool = FeaturePool(store, ledger)
    acker = StepAcker(pool)
    loader = DataLoader(pool, batch_size=2, sampler=ReshardingSampler(pool, num_replicas=1, rank=0, shuffle=False))
    for step, batch in enumerate(loader, 1):
        acker.add(batch)
        acker.after_step(step)
    assert pool.ledger.counts().trained == 4
    assert find_lease_ids({"__lease__": ["", "x"]}) == ["x"]  # a padded slot is never acked
