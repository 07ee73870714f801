"""Issue 15 item 5: one typo in a store path must not destroy a run's state.

A consumer pointed at the wrong store gets a ConfigError before anything is
leased (nothing quarantined, no directory created); a sample that is missing is
retried and given back, quarantined only after a bounded number of deliveries,
and a quarantine can be undone (API and CLI). Puts are validated before any byte
is written, and a sample larger than the whole byte budget is refused at once.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from torch_dataflow import FeatureStoreDataset, FeatureWriter
from torch_dataflow.errors import ConfigError, ProducerSilent, StoreFull
from torch_dataflow.ledger import open_ledger
from torch_dataflow.pool import FeaturePool
from torch_dataflow.stores import open_store
from torch_dataflow.stores.memory import MemoryStore
from torch_dataflow.stores.shared_dir import MARKER, SharedDirStore

ROOT = Path(__file__).resolve().parents[1]
N = 12


def _produce(tmp: Path, n: int = N) -> tuple[str, str]:
    store, ledger = f"file://{tmp / 'store'}", f"sqlite://{tmp / 'ledger.db'}"
    with FeatureWriter(store, ledger) as w:
        for i in range(n):
            w.put(f"s{i:03d}", {"x": torch.full((4,), float(i))})
    return store, ledger


def _train(ds: FeatureStoreDataset, workers: int = 0) -> list[str]:
    seen: list[str] = []
    loader = DataLoader(ds, batch_size=4, num_workers=workers)
    for step, batch in enumerate(loader, 1):
        assert ds.ack(batch, step) == []
        seen += list(batch["__sample_id__"])
    return seen


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------ the typo
@pytest.mark.parametrize("workers", [0, 2])
def test_typo_store_path_is_config_error_and_nothing_changes(tmp_path: Path, workers: int) -> None:
    store, ledger = _produce(tmp_path)
    typo = f"file://{tmp_path / 'stroe'}"
    before = open_ledger(ledger).counts()
    ds = FeatureStoreDataset(typo, ledger, mode="offline", batch_size=4)
    msg = ""
    try:  # (not pytest.raises: its traceback would keep the DataLoader's workers alive)
        _train(ds, workers)
    except ConfigError as exc:  # raised in the workers too (each checks before its first lease)
        msg = str(exc)
    gc.collect()
    assert typo in msg and ledger in msg and "does not exist" in msg, msg
    assert not (tmp_path / "stroe").exists()  # a consumer never creates a store directory
    led = open_ledger(ledger)
    after = led.counts()
    assert (after.quarantined, after.leased, after.trained, after.committed) == (0, 0, 0, N)
    assert led.quarantined() == [] and led.leases() == []
    assert after.pending == before.pending == N
    # the right path then trains everything, exactly once
    ds = FeatureStoreDataset(store, ledger, mode="offline", batch_size=4)
    seen = _train(ds, workers)
    assert sorted(seen) == [f"s{i:03d}" for i in range(N)]
    c = open_ledger(ledger).counts()
    assert (c.trained, c.quarantined, c.pending) == (N, 0, 0)


def test_other_torch_dataflow_store_is_refused_naming_both_ids(tmp_path: Path) -> None:
    store, ledger = _produce(tmp_path)
    other = f"file://{tmp_path / 'other'}"
    FeatureWriter(other, f"sqlite://{tmp_path / 'other.db'}").put("s000", {"x": torch.zeros(4)})
    recorded = open_ledger(ledger).get_meta("store_id")
    assert recorded == open_store(store).store_id() and recorded.startswith("file:")
    with pytest.raises(ConfigError) as e:
        list(FeatureStoreDataset(other, ledger))
    msg = str(e.value)
    assert open_store(other).store_id() in msg and recorded in msg and other in msg and ledger in msg
    assert open_ledger(ledger).counts().quarantined == 0 and open_ledger(ledger).leases() == []


def test_not_a_store_and_pool_are_refused(tmp_path: Path) -> None:
    store, ledger = _produce(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no .torch_dataflow.json"):
        list(FeatureStoreDataset(f"file://{empty}", ledger))
    assert os.listdir(empty) == []
    with pytest.raises(ConfigError, match="stroe"):
        FeaturePool(f"file://{tmp_path / 'stroe'}", ledger)
    with pytest.raises(ConfigError, match="stroe"):  # a store instance that may create is opened without create
        FeatureStoreDataset(SharedDirStore(tmp_path / "stroe"), ledger).__iter__().__next__()
    assert not (tmp_path / "stroe").exists()
    assert len(FeaturePool(store, ledger)) == N
    assert open_ledger(ledger).counts().quarantined == 0


def test_producer_refuses_a_second_store_for_a_bound_ledger(tmp_path: Path) -> None:
    store, ledger = _produce(tmp_path, 2)
    w = FeatureWriter(f"file://{tmp_path / 'stroe'}", ledger)
    with pytest.raises(ConfigError, match="records store id"):
        w.put("s999", {"x": torch.zeros(4)})
    assert open_ledger(ledger).counts().committed == 2
    assert _files(tmp_path / "stroe") == [MARKER]  # no sample bytes written


def test_online_consumer_started_before_the_producer(tmp_path: Path) -> None:
    store, ledger = f"file://{tmp_path / 'store'}", f"sqlite://{tmp_path / 'ledger.db'}"
    ds = FeatureStoreDataset(store, ledger, batch_size=2, poll=0.01, idle_timeout=30)
    got: list[str] = []
    t = threading.Thread(target=lambda: got.extend(s["__sample_id__"] for s in ds))
    t.start()
    time.sleep(0.3)  # the consumer polls an empty ledger and a store that does not exist yet
    _produce(tmp_path, 4)
    t.join(30)
    assert not t.is_alive() and sorted(got) == ["s000", "s001", "s002", "s003"]


def test_mistyped_sqlite_ledger_path_is_named_at_once_and_in_the_stall(tmp_path: Path, caplog) -> None:
    store, _ = _produce(tmp_path, 2)
    typo = f"sqlite://{tmp_path / 'ledgr.db'}"
    with caplog.at_level("WARNING", logger="torch_dataflow.binding"):
        ds = FeatureStoreDataset(store, typo, batch_size=1, poll=0.01, idle_timeout=0.3)
    assert any("does not exist" in r.getMessage() and "typo" in r.getMessage() for r in caplog.records)
    with pytest.raises(ProducerSilent, match="mistyped ledger path"):
        next(iter(ds))
    caplog.clear()
    with caplog.at_level("WARNING", logger="torch_dataflow.binding"):
        FeatureStoreDataset(store, typo)  # it exists now, but no producer ever registered there
    assert [r.getMessage() for r in caplog.records if "has no producer and no sample yet" in r.getMessage()]
    caplog.clear()
    with caplog.at_level("WARNING", logger="torch_dataflow.binding"):
        FeatureStoreDataset(store, f"sqlite://{tmp_path / 'ledger.db'}")  # the right one: quiet
    assert not caplog.records


def test_consumer_beside_a_writer_of_this_process_is_not_warned(tmp_path: Path, caplog) -> None:
    # docs/backends.md's first block: a FeatureWriter, then a dataset on the same ledger, in one process,
    # before any put. The writer is the producer: no "does not exist" / "no producer" warning. A dataset on
    # a mistyped path beside it is still warned.
    store, led = f"file://{tmp_path / 'feats'}", f"sqlite://{tmp_path / 'ledger.db'}"
    with caplog.at_level("WARNING", logger="torch_dataflow.binding"):
        w = FeatureWriter(store=store, ledger=led)
        FeatureStoreDataset(store=store, ledger=f"sqlite://{tmp_path}/./ledger.db", batch_size=8)
        assert not caplog.records
        FeatureStoreDataset(store=store, ledger=f"sqlite://{tmp_path / 'ledgr.db'}")
        assert [r for r in caplog.records if "does not exist" in r.getMessage()]
    w.close()


def test_ledger_in_a_missing_directory_is_refused_without_a_created_warning(tmp_path: Path, caplog) -> None:
    # Consumer or producer first, in a directory that does not exist: one clear error that says
    # what to do, never the "a new, empty ledger is created" warning just before it.
    led = f"sqlite://{tmp_path / 'nodir' / 'ledger.db'}"
    store = f"file://{tmp_path / 'store'}"
    with caplog.at_level("WARNING", logger="torch_dataflow.binding"), pytest.raises(ConfigError, match="mkdir -p"):
        FeatureStoreDataset(store, led)
    assert not [r for r in caplog.records if "is created" in r.getMessage()]
    with pytest.raises(ConfigError, match="directory of ledger file does not exist"):
        FeatureWriter(store, led).put("a", {"x": torch.zeros(1)})
    assert not (tmp_path / "nodir").exists()  # nothing was made at the mistyped place


def test_mistyped_redis_namespace_is_named_at_once(tmp_path: Path, redis_uri: str, caplog) -> None:
    store = f"file://{tmp_path / 'store'}"
    with FeatureWriter(store, f"{redis_uri}?namespace=run1") as w:
        w.put("a", {"x": torch.zeros(1)})
    with caplog.at_level("WARNING", logger="torch_dataflow.binding"):
        FeatureStoreDataset(store, f"{redis_uri}?namespace=run1")
        assert not caplog.records
        FeatureStoreDataset(store, f"{redis_uri}?namespace=rnu1")
    assert any("rnu1" in r.getMessage() and "typo" in r.getMessage() for r in caplog.records)


def test_old_marker_gets_a_store_id_once(tmp_path: Path) -> None:
    root = tmp_path / "store"
    SharedDirStore(root).put("s", 1, {"x": torch.zeros(1)})
    doc = json.loads((root / MARKER).read_text())
    del doc["store_id"]  # a store made before store ids
    (root / MARKER).write_text(json.dumps(doc))
    ids = {SharedDirStore(root, create=False).store_id() for _ in range(3)}
    assert len(ids) == 1
    assert "file:" + json.loads((root / MARKER).read_text())["store_id"] in ids
    assert SharedDirStore(root).get(SharedDirStore(root).put("t", 1, {"x": torch.ones(1)}))["x"].item() == 1.0


# ------------------------------------------------------------------ missing samples
def _hide(store: str, ledger: str, sid: str, where: Path) -> Path:
    ref = open_ledger(ledger).get_ref(sid)
    assert ref is not None
    path = Path(SharedDirStore(store[len("file://"):]).path_of(sid, ref.generation))
    shutil.move(path, where / "hidden.tdf")
    return path


def test_transiently_missing_sample_is_retried_not_quarantined(tmp_path: Path) -> None:
    store, ledger = _produce(tmp_path, 4)
    path = _hide(store, ledger, "s002", tmp_path)
    timer = threading.Timer(0.3, lambda: shutil.move(tmp_path / "hidden.tdf", path))  # back within the backoff
    timer.start()
    try:
        seen = _train(FeatureStoreDataset(store, ledger, mode="offline", batch_size=4, shuffle=False))
    finally:
        timer.join()
    assert sorted(seen) == ["s000", "s001", "s002", "s003"]
    assert open_ledger(ledger).counts().quarantined == 0


def test_permanently_missing_sample_is_quarantined_after_bounded_deliveries_then_requeued(tmp_path: Path) -> None:
    store, ledger = _produce(tmp_path, 4)
    path = _hide(store, ledger, "s001", tmp_path)
    ds = FeatureStoreDataset(store, ledger, mode="offline", batch_size=1, shuffle=False)
    ds.READ_BACKOFF = 0.01
    t0 = time.monotonic()
    seen = _train(ds)
    assert time.monotonic() - t0 < 10  # bounded: never spins
    assert sorted(seen) == ["s000", "s002", "s003"] and ds.quarantined == ["s001"]
    led = open_ledger(ledger)
    [(ref, reason)] = led.quarantined()
    assert ref is not None and ref.sample_id == "s001"
    assert f"unavailable in {ds.MAX_UNAVAILABLE} deliveries of {ds.READ_TRIES} reads" in reason
    # the bytes come back; the quarantine is undone through the API
    shutil.move(tmp_path / "hidden.tdf", path)
    assert led.requeue_quarantined(["s001"]) == 1
    assert led.counts().quarantined == 0
    assert _train(FeatureStoreDataset(store, ledger, mode="offline", batch_size=1)) == ["s001"]
    assert sorted(led.trained_steps()) == ["s000", "s001", "s002", "s003"]


def test_requeue_cli(tmp_path: Path) -> None:
    store, ledger = _produce(tmp_path, 3)
    led = open_ledger(ledger)
    leases = led.lease("t", 3, ttl=30)
    led.fail([x.lease_id for x in leases], retryable=False, reason="unavailable: a typo'd store")
    assert led.counts().quarantined == 3
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "torch_dataflow.cli", "requeue", *args],
                              capture_output=True, text=True, timeout=120, env=env)

    r = cli(ledger, "--ids", "s000", "s002")
    assert r.returncode == 0 and "requeued 2 quarantined samples" in r.stdout, r.stderr
    assert led.counts().quarantined == 1
    r = cli(ledger)
    assert r.returncode == 0 and "requeued 1 quarantined samples" in r.stdout, r.stderr
    r = cli(f"sqlite://{tmp_path / 'ledgre.db'}")
    assert r.returncode == 2 and "no ledger" in r.stderr and not (tmp_path / "ledgre.db").exists()
    r = cli(ledger, "--ids", "s001", "nosuch")  # an unknown id is an error and nothing changes
    assert r.returncode == 2 and "no sample nosuch" in r.stderr, (r.stdout, r.stderr)
    assert led.counts().quarantined == 0
    r = cli(ledger, "--ids", "s001")
    assert r.returncode == 0 and "not quarantined, left as they are: s001 (live)" in r.stdout, r.stderr
    seen = _train(FeatureStoreDataset(store, ledger, batch_size=1))
    assert sorted(seen) == ["s000", "s001", "s002"]
    c = led.counts()
    assert (c.quarantined, c.trained) == (0, 3)


# ------------------------------------------------------------------ puts
@pytest.mark.parametrize("many", [False, True])
def test_put_validates_metadata_before_writing(tmp_path: Path, many: bool) -> None:
    root = tmp_path / "store"
    s = SharedDirStore(root)
    bad = {"x": torch.zeros(2)}
    with pytest.raises(TypeError, match="never tensors"):
        if many:
            s.put_many([("a", 1, {"x": torch.ones(3)}, {"ok": 1}), ("b", 1, {"x": torch.ones(3)}, bad)])
        else:
            s.put("a", 1, {"x": torch.ones(3)}, bad)
    with pytest.raises(ConfigError, match="JSON"):
        s.put("c", 1, {"x": torch.ones(3)}, {"obj": object()})
    assert _files(root) == [MARKER] and s.keys() == [] and s.health().resident_bytes == 0
    m = MemoryStore("misconfig-put")
    with pytest.raises(TypeError):
        m.put_many([("a", 1, {"x": torch.ones(3)}, None), ("b", 1, {"x": torch.ones(3)}, bad)])
    assert m.keys() == [] and m.health().resident_bytes == 0
    MemoryStore.destroy("misconfig-put")


def test_writer_put_with_tensor_metadata_leaves_nothing(tmp_path: Path) -> None:
    store, ledger = f"file://{tmp_path / 'store'}", f"sqlite://{tmp_path / 'ledger.db'}"
    w = FeatureWriter(store, ledger)
    with pytest.raises(TypeError):
        w.put("s", {"x": torch.ones(3)}, {"mask": torch.ones(3)})
    assert _files(tmp_path / "store") == [MARKER]
    assert open_ledger(ledger).counts().committed == 0


# ------------------------------------------------------------------ budget
def test_sample_larger_than_the_budget_is_refused_at_once(tmp_path: Path) -> None:
    w = FeatureWriter(f"file://{tmp_path / 'store'}", f"sqlite://{tmp_path / 'l.db'}",
                      max_resident_bytes=1000, put_timeout=60)
    t0 = time.monotonic()
    with pytest.raises(StoreFull) as e:
        w.put("big", {"x": torch.zeros(500, dtype=torch.float32)})  # 2000 bytes
    assert time.monotonic() - t0 < 5  # not after put_timeout
    assert "2000 bytes" in str(e.value) and "1000 bytes" in str(e.value)
    with pytest.raises(StoreFull, match="2000 bytes"):
        w.put_many([("a", {"x": torch.zeros(10)}), ("big", {"x": torch.zeros(500)})])
    assert open_ledger(f"sqlite://{tmp_path / 'l.db'}").counts().committed == 0
    w.put("small", {"x": torch.zeros(100, dtype=torch.float32)})  # 400 bytes fit
    w.put_timeout = 0.2
    w.put("small2", {"x": torch.zeros(100, dtype=torch.float32)})
    with pytest.raises(StoreFull) as e:  # over budget now: waits, then names the refused size
        w.put("small3", {"x": torch.zeros(150, dtype=torch.float32)})
    assert "600 bytes" in str(e.value) and "budget 1000" in str(e.value)


def test_specforge_directory_typo_is_refused(tmp_path: Path) -> None:
    from torch_dataflow.eagle3 import write_specforge_directory
    from torch_dataflow.stores.specforge_dir import register_directory

    src, ledger = tmp_path / "hs", f"sqlite://{tmp_path / 'ledger.db'}"
    write_specforge_directory(str(src), n=3, seq_lens=5, hidden=4)
    assert register_directory(str(src), ledger, progress=False) == 3
    assert open_ledger(ledger).get_meta("store_id") == f"specforge:{os.path.realpath(src)}"
    with pytest.raises(ConfigError, match="not found"):
        FeaturePool(f"specforge://{tmp_path / 'sh'}", ledger)
    assert len(FeaturePool(f"specforge://{src}", ledger)) == 3
    assert open_ledger(ledger).counts().quarantined == 0


def test_producer_restarted_without_resume_warns_once_that_it_rewrites(tmp_path: Path, caplog) -> None:
    store, ledger = f"file://{tmp_path / 'store'}", f"sqlite://{tmp_path / 'ledger.db'}"
    with caplog.at_level("WARNING", logger="torch_dataflow.producer"):
        for _ in range(2):
            with FeatureWriter(store, ledger, name="p") as w:
                for i in range(3):
                    w.put(f"s{i}", {"x": torch.zeros(2)})
        first = [r.getMessage() for r in caplog.records]
        with FeatureWriter(store, ledger, name="p", resume=True) as w:
            assert w.put("s0", {"x": torch.zeros(2)}).generation == 2  # resume skips: no rewrite, no warning
    assert len(first) == 1 and "'s0' was written before" in first[0] and "resume=True" in first[0]
    assert [r.getMessage() for r in caplog.records] == first


_SLOW_PRODUCER = """
import sys, time, torch
from torch_dataflow import FeatureWriter
with FeatureWriter(sys.argv[1], sys.argv[2], name="producer-0", resume=True) as w:
    for sid in w.missing([f"s{i}" for i in range(50)]):
        w.put(sid, {"x": torch.zeros(4)})
        print(sid, flush=True)
        time.sleep(0.1)
"""


def test_a_producer_started_twice_is_refused_and_a_killed_one_restarts(tmp_path: Path) -> None:
    from torch_dataflow.errors import SessionConflict

    store, ledger = f"file://{tmp_path / 'store'}", f"sqlite://{tmp_path / 'ledger.db'}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first = subprocess.Popen([sys.executable, "-c", _SLOW_PRODUCER, store, ledger], stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        assert first.stdout.readline().strip() == "s0"  # registered and writing
        with pytest.raises(SessionConflict, match="already running") as e, \
                FeatureWriter(store, ledger, name="producer-0", resume=True) as w:
            w.missing(["s0"])
        assert f"pid {first.pid}" in str(e.value)
        led = open_ledger(ledger)
        assert not led.is_closed()  # the refused writer did not close the live producer's stream
        first.kill()  # SIGKILL mid-run: a restart under the same name right away is no duplicate
        first.wait(30)
        with FeatureWriter(store, ledger, name="producer-0", resume=True) as w:
            todo = w.missing([f"s{i}" for i in range(50)])
            for sid in todo:
                w.put(sid, {"x": torch.zeros(4)})
        c = led.counts()
        assert c.committed == 50 and c.pending == 50 and led.is_closed()
        assert 0 < len(todo) < 50
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(30)
        first.stdout.close()


def test_producer_takeover_starts_beside_a_live_holder(tmp_path: Path) -> None:
    store, ledger = f"file://{tmp_path / 'store'}", f"sqlite://{tmp_path / 'ledger.db'}"
    led = open_ledger(ledger)
    led.register_producer("producer-0", {"host": "other-host", "pid": 1})  # live elsewhere: a fresh heartbeat
    from torch_dataflow.errors import SessionConflict

    with pytest.raises(SessionConflict):
        FeatureWriter(store, ledger, name="producer-0").put("a", {"x": torch.zeros(1)})
    with FeatureWriter(store, ledger, name="producer-0", takeover=True) as w:
        w.put("a", {"x": torch.zeros(1)})
    assert led.counts().committed == 1
