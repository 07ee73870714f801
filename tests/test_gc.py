"""Issue 15 item 3: deletes that finish.

Freeing is a durable intent in the ledger (a delete queue written in the same
transaction / script as FREED): a transient delete error or a SIGKILL between
the ledger update and the deletes leaves the bytes queued, and the next
``mark_durable`` / ``reconcile`` / writer start / ``torch-dataflow gc`` removes
them. ``gc`` also removes generations no ledger entry needs (a producer killed
between writing and committing) after a grace period, and refuses a store that
is not the ledger's. Leftover bytes are counted, not only samples.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from torch_dataflow import FeatureStoreDataset, FeatureWriter
from torch_dataflow.ledger import open_ledger
from torch_dataflow.stores import open_store
from torch_dataflow.stores.shared_dir import SharedDirStore

N = 8


def _produce(store: str, ledger: str, n: int = N) -> None:
    with FeatureWriter(store, ledger, name="p") as w:
        for i in range(n):
            w.put(f"s{i}", {"x": torch.full((64,), float(i))})


def _train_all(ds: FeatureStoreDataset) -> int:
    step = 0
    it = iter(ds)
    for step, s in enumerate(it, 1):
        assert ds.ack(s, step) == []
    return step


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name != ".torch_dataflow.json"]  # the store marker


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_failed_delete_stays_queued_and_the_next_mark_removes_it(
        tmp_path: Path, backend: str, redis_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = f"file://{tmp_path / 'store'}"
    ledger = f"sqlite://{tmp_path / 'l.db'}" if backend == "sqlite" else f"{redis_uri}?namespace=gc{tmp_path.name[-6:]}"
    _produce(store, ledger)
    ds = FeatureStoreDataset(store, ledger, idle_timeout=5)
    last = _train_all(ds)
    real = SharedDirStore._delete
    broken = {"s3": True}  # one sample's unlink fails until the disk recovers

    def flaky(self: SharedDirStore, sid: str, gen: int) -> bool:
        if broken.get(sid):
            raise OSError(5, "transient I/O error")
        return real(self, sid, gen)

    monkeypatch.setattr(SharedDirStore, "_delete", flaky)
    assert ds.mark_durable(last, final=True) == N  # no exception: the ledger state is right
    led = open_ledger(ledger)
    assert len(led.pending_deletes()) == 1 and len(open_store(store).keys()) == 1
    assert led.resident_bytes() == led.pending_deletes()[0].nbytes
    broken.clear()
    ds.mark_durable(last, final=True)  # the next mark (any later call) finishes it
    assert led.pending_deletes() == [] and open_store(store).keys() == [] and led.resident_bytes() == 0


_KILLED = textwrap.dedent("""
    import os, signal, sys
    import torch_dataflow.gc as gc
    from torch_dataflow import FeatureStoreDataset
    store, ledger = sys.argv[1:3]
    ds = FeatureStoreDataset(store, ledger, idle_timeout=5)
    step = 0
    for step, s in enumerate(iter(ds), 1):
        ds.ack(s, step)
    gc.drain_deletes = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # dies right after the ledger update
    ds.mark_durable(step, final=True)
""")


def test_sigkill_between_the_free_and_the_deletes_converges(tmp_path: Path) -> None:
    store, ledger = f"file://{tmp_path / 'store'}", f"sqlite://{tmp_path / 'l.db'}"
    _produce(store, ledger)
    rc = subprocess.run([sys.executable, "-c", _KILLED, store, ledger]).returncode
    assert rc == -signal.SIGKILL
    led = open_ledger(ledger)
    assert led.counts().freed == N and len(led.pending_deletes()) == N
    assert len(open_store(store).keys()) == N  # the bytes outlived the process that freed them
    dry = json.loads(_gc(store, ledger, "--dry-run", "--json").stdout)  # the queued ones, counted once
    assert (dry["queued_left"], dry["young"], dry["orphans"]) == (N, 0, 0)
    out = subprocess.run([sys.executable, "-m", "torch_dataflow.cli", "gc", store, ledger, "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["queued_deleted"] == N
    assert open_store(store).keys() == [] and led.pending_deletes() == [] and _files(tmp_path / "store") == []


def test_a_new_writer_finishes_queued_deletes(tmp_path: Path) -> None:
    store, ledger = f"file://{tmp_path / 'store'}", f"sqlite://{tmp_path / 'l.db'}"
    _produce(store, ledger)
    subprocess.run([sys.executable, "-c", _KILLED, store, ledger])
    assert len(open_store(store).keys()) == N
    with FeatureWriter(store, ledger, name="p2") as w:
        w.put("new", {"x": torch.zeros(4)})
    assert open_store(store).keys() == [("new", 1)]


def _gc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torch_dataflow.cli", "gc", *args], capture_output=True, text=True)


def test_gc_removes_orphans_after_grace_and_refuses_another_store(tmp_path: Path) -> None:
    store, ledger = f"file://{tmp_path / 'store'}", f"sqlite://{tmp_path / 'l.db'}"
    _produce(store, ledger, 3)
    led, st = open_ledger(ledger), open_store(store)
    # A producer killed between writing and committing: reserved, written, never committed.
    [gen] = led.reserve(["s9"])
    st.put("s9", gen, {"x": torch.ones(64)})
    # A superseded generation whose delete never happened (the writer died after the commit).
    [g2] = led.reserve(["s0"])
    led.commit([st.put("s0", g2, {"x": torch.ones(64)})])
    led.confirm_deleted(led.pending_deletes())  # as if the queue had been lost too: only orphan search finds it
    assert sorted(st.keys()) == [("s0", 1), ("s0", 2), ("s1", 1), ("s2", 1), ("s9", 1)]
    r = _gc(store, ledger, "--dry-run")  # default grace (1 h): the fresh uncommitted s9@1 is kept
    assert r.returncode == 0 and "1 younger" in r.stdout and "would remove 1" in r.stdout, r.stdout
    assert len(st.keys()) == 5
    r = _gc(store, ledger)  # s0@1 is older than s0's committed generation: no commit of it can come, no grace
    assert r.returncode == 0 and "1 younger" in r.stdout and "removed 1" in r.stdout, r.stdout
    assert sorted(st.keys()) == [("s0", 2), ("s1", 1), ("s2", 1), ("s9", 1)]
    r = _gc(store, ledger, "--grace", "0")
    assert r.returncode == 0 and "removed 1" in r.stdout, r.stdout
    assert sorted(st.keys()) == [("s0", 2), ("s1", 1), ("s2", 1)]
    # The bytes the ledger needs are intact.
    assert {s["__sample_id__"] for s in FeatureStoreDataset(store, ledger, idle_timeout=5)} == {"s0", "s1", "s2"}
    # Killed between the put and the commit of s5@1 (twice), then resumed: the resumed writer
    # commits s5@3 and removes s5@1 and s5@2 itself; gc has nothing left to do.
    for _ in range(2):
        [g5] = led.reserve(["s5"])
        st.put("s5", g5, {"x": torch.ones(64)})
    assert {("s5", 1), ("s5", 2)} <= set(st.keys())
    with FeatureWriter(store, ledger, name="p", resume=True) as w:
        assert w.missing(["s5"]) == ["s5"]
        w.put("s5", {"x": torch.ones(64)})
    assert sorted(st.keys()) == [("s0", 2), ("s1", 1), ("s2", 1), ("s5", 3)]
    r = _gc(store, ledger, "--grace", "0")
    assert r.returncode == 0 and sorted(st.keys()) == [("s0", 2), ("s1", 1), ("s2", 1), ("s5", 3)], r.stdout
    # The same with put_many.
    [g6] = led.reserve(["s6"])
    st.put("s6", g6, {"x": torch.ones(64)})
    with FeatureWriter(store, ledger, name="p", resume=True) as w:
        w.put_many([("s6", {"x": torch.ones(64)}), ("s7", {"x": torch.ones(64)})])
    assert sorted(st.keys()) == [("s0", 2), ("s1", 1), ("s2", 1), ("s5", 3), ("s6", 2), ("s7", 1)]
    # Another store (a mistyped path to another run's store): refused, nothing deleted.
    other = f"file://{tmp_path / 'other'}"
    _produce(other, f"sqlite://{tmp_path / 'l2.db'}", 2)
    r = _gc(other, ledger, "--grace", "0")
    assert r.returncode != 0 and "cannot serve ledger" in r.stderr and len(open_store(other).keys()) == 2
    assert os.path.isdir(tmp_path / "other")
