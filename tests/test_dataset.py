"""FeatureWriter + FeatureStoreDataset: DataLoader integration, modes, sharding, errors."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest
import torch
from _procs import sample
from torch.utils.data import DataLoader

from torch_dataflow import (
    ConfigError,
    FeatureLoader,
    FeatureStoreDataset,
    FeatureWriter,
    StoreFull,
    errors,
    open_ledger,
    open_store,
)

_n = itertools.count()


@pytest.fixture
def uris(tmp_path: Path) -> tuple[str, str]:
    return f"file://{tmp_path}/store", f"sqlite://{tmp_path}/ledger.db"


def _fill(uris: tuple[str, str], n: int, close: bool = True) -> list[str]:
    w = FeatureWriter(*uris)
    ids = [f"s{i:05d}" for i in range(n)]
    for i, sid in enumerate(ids):
        w.put(sid, sample(i))
    if close:
        w.close()
    return ids


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_delivers_each_sample_once(uris: tuple[str, str], num_workers: int) -> None:
    ids = _fill(uris, 23)
    ds = FeatureStoreDataset(*uris, batch_size=4)
    seen: list[str] = []
    for step, batch in enumerate(DataLoader(ds, batch_size=4, num_workers=num_workers), 1):
        assert batch["x"].shape[1] == 16 and batch["x"].dtype == torch.float32
        for sid, i, x in zip(batch["__sample_id__"], batch["i"], batch["x"], strict=True):
            assert sid == f"s{int(i):05d}" and torch.all(x == float(i))
        assert ds.ack(batch, step) == []
        seen += batch["__sample_id__"]
    assert sorted(seen) == ids
    c = ds.ledger.counts()
    assert (c.trained, c.pending, c.leased) == (23, 0, 0)
    assert ds.mark_durable(10**6, final=True) == 23
    assert ds.store.keys() == []


def test_online_streams_while_producer_runs(uris: tuple[str, str]) -> None:
    w = FeatureWriter(*uris, name="p")
    w.ledger.register_producer("p")
    ds = FeatureStoreDataset(*uris, batch_size=3, idle_timeout=60)

    def produce() -> None:
        for i in range(20):
            w.put(f"s{i:05d}", sample(i))
        w.close()

    t = threading.Thread(target=produce)
    t.start()
    seen = [sid for b in DataLoader(ds, batch_size=3) for sid in b["__sample_id__"]]
    t.join()
    assert sorted(seen) == [f"s{i:05d}" for i in range(20)]


def test_online_idle_timeout_names_the_producer(uris: tuple[str, str]) -> None:
    led = open_ledger(uris[1])
    led.register_producer("silent")
    ds = FeatureStoreDataset(*uris, idle_timeout=0.3)
    with pytest.raises(TimeoutError, match="producer"):
        list(ds)


def test_offline_epochs_shuffle_and_repeat(uris: tuple[str, str]) -> None:
    ids = _fill(uris, 12)
    ds = FeatureStoreDataset(*uris, mode="offline", batch_size=4, seed=3)
    orders = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        order = []
        for step, batch in enumerate(DataLoader(ds, batch_size=4), 1):
            ds.ack(batch, epoch * 10 + step)
            order += batch["__sample_id__"]
        assert sorted(order) == ids
        orders.append(order)
        ds.mark_durable(epoch * 10 + 9)
    assert len({tuple(o) for o in orders}) == 3 and orders[0] != ids
    assert len(ds.store.keys()) == 12  # offline pools keep their bytes


def test_corrupt_sample_is_quarantined_not_trained(uris: tuple[str, str], tmp_path: Path) -> None:
    ids = _fill(uris, 5)
    victim = next((tmp_path / "store").rglob("s00002@1.tdf"))
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    ds = FeatureStoreDataset(*uris)
    seen = [s["__sample_id__"] for s in ds]
    assert sorted(seen) == [s for s in ids if s != "s00002"]
    [(ref, reason)] = ds.ledger.quarantined()
    assert ref is not None and ref.sample_id == "s00002" and "corrupt" in reason


def test_typed_errors_survive_worker_processes(uris: tuple[str, str]) -> None:
    for cls in [getattr(errors, n) for n in errors.__all__]:
        e = cls("message")
        assert isinstance(type(e)(str(e)), cls) and str(cls("m")) == "m"
    _fill(uris, 4)
    store = open_store(uris[0])
    ds = FeatureStoreDataset(store, f"memory://in-parent-{next(_n)}")
    it = iter(DataLoader(ds, num_workers=2, multiprocessing_context="fork"))
    with pytest.raises(ConfigError, match="memory ledger cannot cross processes"):
        next(it)
    it._shutdown_workers()  # type: ignore[attr-defined]


def test_bad_input_is_typed_and_loses_nothing(uris: tuple[str, str]) -> None:
    _fill(uris, 2, close=False)
    w = FeatureWriter(*uris)
    before = w.ledger.counts()
    keys = w.store.keys()
    bad = [
        ({"x": [1, 2]}, TypeError),
        ({"x": torch.ones(2, requires_grad=True)}, ConfigError),
        ({"x": torch.empty(2, device="meta")}, ConfigError),
        ({"__lease__": torch.ones(1)}, ConfigError),
        ([("x", torch.ones(1))], TypeError),
    ]
    for tensors, exc in bad:
        with pytest.raises(exc):
            w.put("s-bad", tensors)  # type: ignore[arg-type]
    for sid in ("../x", "a/b", "x\0", "y" * 300):
        with pytest.raises(ConfigError):
            w.put(sid, {"x": torch.ones(1)})
    after = w.ledger.counts()
    assert (after.pending, after.committed) == (before.pending, before.committed)
    assert w.store.keys() == keys
    for uri in ("nope://x", "file:///tmp/x?bogus=1", "sqlite:///tmp/x.db?what=1"):
        with pytest.raises(ConfigError):
            FeatureStoreDataset(uri, uris[1]) if uri.startswith(("nope", "file")) else FeatureStoreDataset(
                uris[0], uri).ledger.counts()
    with pytest.raises(ConfigError):
        FeatureStoreDataset(*uris, mode="sometimes")
    with pytest.raises(ConfigError):
        FeatureStoreDataset(*uris, rank=2, world_size=2)


def test_backpressure_waits_then_raises(uris: tuple[str, str]) -> None:
    probe = open_store(uris[0]).put("probe", 1, sample(0))
    one = probe.nbytes
    open_store(uris[0]).delete(probe)  # no blob of another ledger in the store (a writer refuses those)
    w = FeatureWriter(*uris, max_resident_bytes=2 * one, put_timeout=0.5)
    for i in range(2):
        w.put(f"s{i}", sample(i))
    with pytest.raises(StoreFull, match="budget"):
        w.put("s9", sample(9))
    assert w.ledger.counts().pending == 2 and w.waited_s >= 0.5
    # A consumer that trains and frees makes room: the waiting put proceeds.
    ds = FeatureStoreDataset(*uris, batch_size=2)
    w2 = FeatureWriter(*uris, max_resident_bytes=2 * one, put_timeout=30)

    def drain() -> None:
        batch = next(iter(DataLoader(ds, batch_size=2)))
        ds.ack(batch, 1)
        ds.mark_durable(1, final=True)

    t = threading.Timer(0.3, drain)
    t.start()
    w2.put("s9", sample(9))
    t.join()
    assert w2.waited_s > 0.1 and w2.ledger.get_ref("s9") is not None


def test_reput_frees_old_generation_and_delivers_new(uris: tuple[str, str]) -> None:
    w = FeatureWriter(*uris)
    r1 = w.put("s", sample(1))
    r2 = w.put("s", sample(2))
    assert r2.generation == r1.generation + 1
    assert not w.store.exists(r1) and w.store.exists(r2)
    w.close()
    [s] = list(FeatureStoreDataset(*uris, idle_timeout=30))
    assert int(s["i"]) == 2


def test_feature_loader_takes_shuffle_and_drop_last(uris: tuple[str, str]) -> None:
    _fill(uris, 10)
    ds = FeatureStoreDataset(*uris, mode="offline")
    loader = FeatureLoader(ds, batch_size=4, shuffle=True, drop_last=True)
    batches = list(loader)
    assert ds.batch_size == 4 and [len(b["__sample_id__"]) for b in batches] == [4, 4]
    with pytest.raises(ValueError):
        DataLoader(ds, batch_size=4, shuffle=True)


def test_plan_mode_reiteration_advances_round(uris: tuple[str, str]) -> None:
    _fill(uris, 8, close=False)
    ds0 = FeatureStoreDataset(*uris, batch_size=2, rank=0, world_size=2, idle_timeout=5)
    ds1 = FeatureStoreDataset(*uris, batch_size=2, rank=1, world_size=2, idle_timeout=5)
    it0, it1 = iter(ds0), iter(ds1)
    first = [next(it0)["__sample_id__"] for _ in range(2)] + [next(it1)["__sample_id__"] for _ in range(2)]
    # A fresh pass of the same epoch (same attempt) must not re-deliver step 0.
    again0, again1 = iter(ds0), iter(ds1)
    second = [next(again0)["__sample_id__"] for _ in range(2)] + [next(again1)["__sample_id__"] for _ in range(2)]
    assert not set(first) & set(second) and len(set(first + second)) == 8


def test_memory_store_refuses_a_spawned_worker() -> None:
    name = f"spawn-check-{next(_n)}"
    w = FeatureWriter(f"memory://{name}", f"sqlite:///{Path(__import__('tempfile').mkdtemp())}/l.db")
    w.put("s0", sample(0))
    w.close()
    ds = FeatureStoreDataset(w.store, w.ledger)
    it = iter(DataLoader(ds, num_workers=1, multiprocessing_context="spawn"))
    with pytest.raises(ConfigError, match="cannot be used from process"):
        next(it)
    it._shutdown_workers()  # type: ignore[attr-defined]
    assert w.ledger.counts().quarantined == 0  # nothing was mistaken for lost


def test_backpressure_checks_are_not_per_put(uris: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    w = FeatureWriter(*uris, max_resident_bytes=10**9, max_pending=10**6)
    calls = {"health": 0, "counts": 0}
    health, counts = w.store.health, w.ledger.counts

    def count_health():
        calls["health"] += 1
        return health()

    def count_counts(*a, **k):
        calls["counts"] += 1
        return counts(*a, **k)

    monkeypatch.setattr(w.store, "health", count_health)
    monkeypatch.setattr(w.ledger, "counts", count_counts)
    for i in range(50):
        w.put(f"s{i}", sample(i))
    assert calls == {"health": 1, "counts": 1}  # room measured once, then spent put by put


def test_planned_steps_stay_equal_when_a_sample_is_corrupt(uris: tuple[str, str], tmp_path: Path) -> None:
    _fill(uris, 16)
    victim = next((tmp_path / "store").rglob("s00013@1.tdf"))
    data = bytearray(victim.read_bytes())
    data[-2] ^= 0xFF
    victim.write_bytes(bytes(data))
    counts, seen = [], []
    for rank in range(2):
        ds = FeatureStoreDataset(*uris, mode="offline", shuffle=False, rank=rank, world_size=2, batch_size=4)
        batches = list(FeatureLoader(ds, batch_size=4, drop_last=True))
        counts.append(len(batches))
        for b in batches:
            ds.ack(b, 1)
            seen += [s for s, lid in zip(b["__sample_id__"], b["__lease__"], strict=True) if lid]
    assert counts[0] == counts[1] == 2, "a quarantined sample must not make one rank's batch count differ"
    assert sorted(seen) == sorted(f"s{i:05d}" for i in range(16) if i != 13), "padding is never acked twice"
    c = open_ledger(uris[1]).counts()
    assert (c.trained, c.leased, c.quarantined) == (15, 0, 1)


def test_drop_last_gives_the_partial_tail_back(uris: tuple[str, str]) -> None:
    _fill(uris, 10)
    ds = FeatureStoreDataset(*uris, mode="offline")
    batches = list(FeatureLoader(ds, batch_size=4, drop_last=True, num_workers=2))
    assert [len(b["__sample_id__"]) for b in batches] == [4, 4]
    for b in batches:
        ds.ack(b, 1)
    c = ds.ledger.counts()
    assert (c.trained, c.leased, c.pending) == (8, 0, 2), "dropped samples are pending, not held"


def test_store_max_bytes_is_the_default_budget(tmp_path: Path) -> None:
    w = FeatureWriter(f"file://{tmp_path}/s?max_bytes=1KiB", f"sqlite://{tmp_path}/l.db", put_timeout=0.2)
    assert w.max_resident_bytes == 1024
    with pytest.raises(StoreFull):
        for i in range(20):
            w.put(f"s{i}", sample(i, 64))
    assert 1 <= w.written < 20


def test_writer_close_releases_what_it_opened(uris: tuple[str, str]) -> None:
    w = FeatureWriter(*uris)
    w.put("a", sample(0))
    assert w.ledger._con is not None  # type: ignore[attr-defined]
    w.close()
    assert w.ledger._con is None  # type: ignore[attr-defined]
    assert w.ledger.counts().committed == 1  # reopens lazily when used again
    shared = open_ledger(uris[1])
    w2 = FeatureWriter(uris[0], shared)
    w2.put("b", sample(1))
    w2.close()
    assert shared._con is not None  # type: ignore[attr-defined]  # the caller's instance stays open


def test_close_releases_what_the_dataset_opened_not_what_it_was_given(tmp_path) -> None:
    from torch_dataflow import FeatureWriter
    from torch_dataflow.ledger import open_ledger

    store, ledger = f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db"
    with FeatureWriter(store, ledger) as w:
        w.put("a", {"x": torch.ones(2)})
    with FeatureStoreDataset(store, ledger, mode="offline") as ds:
        assert [s["__sample_id__"] for s in ds] == ["a"]
        assert ds.ledger._con is not None
    assert ds.ledger._con is None  # closed with the dataset
    mine = open_ledger(ledger)
    mine.counts()
    with FeatureStoreDataset(store, mine, mode="offline") as ds:
        assert len(ds) == 1
    assert mine._con is not None and mine.counts().committed == 1  # the caller's instance stays open
    mine.close()
