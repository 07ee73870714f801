"""First commit wins (exactly-once): two resumed producers with different names put
the same ids; the second one's bytes are in flight while the first commits and a
trainer trains the id. Its commit must be refused, its bytes deleted, and the id
trained exactly once: on file:// + SQLite and on file:// + a real Redis."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from torch_dataflow import FeatureWriter
from torch_dataflow.gc import collect, drain_deletes
from torch_dataflow.ledger import SampleStatus, open_ledger
from torch_dataflow.stores import open_store

N = 24
_NS = itertools.count()


class _Trainer:
    """Leases, reads, acks and checkpoints through the ledger; counts what it trained."""

    def __init__(self, store: str, ledger: str) -> None:
        self.store, self.led = open_store(store), open_ledger(ledger)
        self.trained: Counter[str] = Counter()
        self.held: list[Any] = []
        self.step = 0

    def lease(self, sample_id: str | None = None) -> None:
        for x in self.led.lease("trainer", 64, ttl=60):
            value = self.store.get(x.ref)["x"]
            assert int(value[0]) == int(x.sample_id[1:])  # the bytes of the committed generation
            self.held.append(x)

    def ack(self) -> None:
        if self.held:
            self.step += 1
            for x in self.held:
                self.trained[x.sample_id] += 1
            assert self.led.ack([x.lease_id for x in self.held], step=self.step) == []
            self.held = []

    def checkpoint(self) -> None:
        drain_deletes(self.led, self.store, self.led.mark_durable(self.step, retain=False))


def _tensors(sid: str) -> dict[str, torch.Tensor]:
    return {"x": torch.full((16,), float(int(sid[1:])))}


def _at_reserve(sids: list[str]) -> bool:
    """Where the other writer runs: before ``reserve`` (it gets the lower generation) or while bytes are written."""
    return int(sids[0][1:]) % 8 < 4


def _in_flight(writer: FeatureWriter, method: str, hook: Callable[[list[str]], None]) -> None:
    """Run ``hook(ids)`` after ``writer``'s check for committed ids: inside its ``reserve``
    (``method="reserve"``) or its store write (``"put"`` / ``"put_many"``), before its commit."""
    obj = writer.ledger if method == "reserve" else writer.store
    orig = getattr(obj, method)

    def wrapped(*args: Any, **kw: Any) -> Any:
        ids = list(args[0]) if method == "reserve" else [args[0]] if method == "put" else [it[0] for it in args[0]]
        if (method == "reserve") == _at_reserve(ids):
            hook(ids)
        return orig(*args, **kw)

    setattr(obj, method, wrapped)


def _run(store: str, ledger: str, root: Path) -> None:
    a = FeatureWriter(store, ledger, name="gen-a", resume=True)
    b = FeatureWriter(store, ledger, name="gen-b", resume=True)
    trainer = _Trainer(store, ledger)
    ids = [f"s{i:03d}" for i in range(N)]
    assert a.missing(ids) == ids and b.missing(ids) == ids  # both resumed writers see every id missing

    def a_wins(sids: list[str]) -> None:
        # A commits the first ids of B's batch while B's bytes are in flight; the trainer moves them on
        first = [s for s in sids if int(s[1:]) % 3 != 2]
        if not first:
            return
        if len(first) == 1:
            a.put(first[0], _tensors(first[0]))
        else:
            a.put_many([(s, _tensors(s)) for s in first])
        stage = int(first[0][1:]) % 4  # 0 pending, 1 leased, 2 trained, 3 durable and freed
        if stage >= 1:
            trainer.lease()
        if stage >= 2:
            trainer.ack()
        if stage == 3:
            trainer.checkpoint()

    _in_flight(b, "reserve", a_wins)
    _in_flight(b, "put", a_wins)
    _in_flight(b, "put_many", a_wins)
    got: dict[str, Any] = {}
    for i in range(0, N // 2):  # single puts: s000..s011
        got[ids[i]] = b.put(ids[i], _tensors(ids[i]))
    for i in range(N // 2, N, 4):  # batches of 4, some ids committed by A meanwhile
        chunk = ids[i : i + 4]
        refs = b.put_many([(s, _tensors(s)) for s in chunk])
        assert [r.sample_id for r in refs] == chunk  # input order
        got.update(zip(chunk, refs, strict=True))
    led = open_ledger(ledger)
    a_ids = {s for s in ids if int(s[1:]) % 3 != 2}
    assert b.skipped == len(a_ids) and b.written == N - len(a_ids)
    # A ran inside B's reserve (A: generation 1, B: 2) or while B's bytes were written (B: 1, A: 2); A committed first
    assert {s: r.generation for s, r in got.items()} == {
        s: (1 if _at_reserve([s if int(s[1:]) < N // 2 else ids[int(s[1:]) // 4 * 4]]) else 2) if s in a_ids else 1
        for s in ids}
    assert {s: led.get_ref(s) for s in ids} == got
    blobs = sorted(p.name for p in root.rglob("*.tdf"))  # the committed generations not yet freed, nothing else
    statuses = led.sample_statuses(ids)
    assert blobs == sorted(f"{s}@{r.generation}.tdf" for s, r in got.items() if statuses[s] != SampleStatus.FREED)
    a.close()
    b.close()
    trainer.lease()
    trainer.ack()
    assert trainer.led.lease("trainer", 64, ttl=60) == []
    assert dict(trainer.trained) == {s: 1 for s in ids}  # every id trained exactly once
    c = led.counts()
    assert (c.committed, c.pending, c.leased, c.quarantined) == (N, 0, 0, 0)
    trainer.checkpoint()
    assert led.counts().freed == N and led.resident_bytes() == 0
    assert led.pending_deletes() == []
    # no refused bytes left behind: nothing but the store's marker file
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == [".torch_dataflow.json"]
    rep = collect(store, ledger, grace_s=0, dry_run=True)
    assert (rep.orphans, rep.young) == (0, 0)


def test_first_commit_wins_sqlite(tmp_path: Path) -> None:
    _run(f"file://{tmp_path}/feats", f"sqlite://{tmp_path}/ledger.db", tmp_path / "feats")


def test_first_commit_wins_redis(tmp_path: Path, redis_uri: str) -> None:
    _run(f"file://{tmp_path}/feats", f"{redis_uri}?namespace=first{next(_NS)}", tmp_path / "feats")


@pytest.mark.parametrize("via", ["put", "put_many"])
def test_without_resume_a_rewrite_still_supersedes(tmp_path: Path, via: str) -> None:
    store, ledger = f"file://{tmp_path}/feats", f"sqlite://{tmp_path}/ledger.db"
    with FeatureWriter(store, ledger, name="gen-a", resume=True) as a:
        a.put("s001", _tensors("s001"))
    with FeatureWriter(store, ledger, name="gen-b") as b:
        ref = b.put("s001", _tensors("s001")) if via == "put" else b.put_many([("s001", _tensors("s001"))])[0]
    assert ref.generation == 2 and open_ledger(ledger).get_ref("s001") == ref
    assert [p.name for p in (tmp_path / "feats").rglob("*.tdf")] == ["s001@2.tdf"]
