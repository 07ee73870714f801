"""counts() comes from maintained counters (issue 14 item 5): they must never drift.

A seeded random mix of every state-changing call — commits and re-puts, refused
commits (rolled back), leases that expire, acks (repeated and stale), retryable
and final fails, aborts, durable marks, requeues, new epochs, planned claims and
crashes (a fresh client reconciles from a checkpoint) — is run against SQLite and
a real redis-server; after every step the counters are compared with a recount
made by scanning the ledger's own records.
"""

from __future__ import annotations

import contextlib
import random
import time
from typing import Any

import pytest

from torch_dataflow.errors import ConfigError, SampleAborted
from torch_dataflow.ledger import open_ledger
from torch_dataflow.ledger.base import Ledger, LedgerCounts, Plan
from torch_dataflow.testing.ledger_conformance import fake_ref

FIELDS = ("pending", "leased", "trained", "durable", "aborted", "quarantined", "freed", "committed", "closed")


def _cmp(got: LedgerCounts, want: LedgerCounts, where: str) -> None:
    g = {k: getattr(got, k) for k in FIELDS} | {"epochs": got.extra["epochs"]}
    w = {k: getattr(want, k) for k in FIELDS} | {"epochs": want.extra["epochs"]}
    assert g == w, f"counters drifted after {where}: counters {g} != recount {w}"


def redis_scan_counts(led: Any, epoch: int | None = None) -> LedgerCounts:
    """The Redis ledger's counts recomputed from its per-sample hashes (SCAN, no counters)."""
    c = led._client
    p = led._prefix
    by_state = [0, 0, 0, 0]
    epochs: set[int] = set()
    for key in c.scan_iter(match=p + "d:*", count=1000):
        e, _ = key[len(p) + 2 :].split(":", 1)
        epochs.add(int(e))
        if epoch is None or int(e) == epoch:
            by_state[int(c.hget(key, "s"))] += 1
    status = {1: 0, 2: 0, 3: 0}
    committed = 0
    for key in c.scan_iter(match=p + "s:*", count=1000):
        st, com = c.hmget(key, "st", "c")
        if int(st) in status:
            status[int(st)] += 1
        committed += int(com or 0) > 0
    return LedgerCounts(pending=by_state[0], leased=by_state[1], trained=by_state[2], durable=by_state[3],
                        aborted=status[1], quarantined=status[2], freed=status[3], committed=committed,
                        closed=led.is_closed(), extra={"epochs": sorted(epochs)})


def recount(led: Ledger, epoch: int | None = None) -> LedgerCounts:
    if hasattr(led, "scan_counts"):
        return led.scan_counts(epoch)
    return redis_scan_counts(led, epoch)


class _Mix:
    """The random operations, with the little state the driver needs."""

    def __init__(self, led: Ledger, reopen: Any, seed: int) -> None:
        self.led, self.reopen, self.rng = led, reopen, random.Random(seed)
        self.ids = [f"s{i:03d}" for i in range(60)]
        self.leases: list[Any] = []
        self.step = 0
        self.epoch = 0
        self.marks: list[int] = []

    def commit(self) -> None:
        chunk = self.rng.sample(self.ids, self.rng.randint(1, 8))
        gens = self.led.reserve(chunk)
        refs = [fake_ref(s, g) for s, g in zip(chunk, gens, strict=True)]
        if self.rng.random() < 0.15:  # a refused commit: never reserved -> nothing may change
            bad = refs[:-1] + [fake_ref(refs[-1].sample_id, refs[-1].generation + 5)]
            with pytest.raises(ConfigError):
                self.led.commit(bad)
        with contextlib.suppress(SampleAborted):  # an id aborted earlier in the mix
            self.led.commit(refs)

    def lease(self) -> None:
        ttl = self.rng.choice([0.05, 30.0])  # short ones expire and are reclaimed by a later lease
        self.leases += self.led.lease("c", self.rng.randint(1, 10), ttl=ttl, epoch=self.epoch)

    def claim(self) -> None:
        plan = Plan(attempt=self.led.attempt(), epoch=self.epoch, world=2, batch=2, round=self.rng.randint(0, 3))
        claim = self.led.claim_step(plan, self.rng.randint(0, 2), self.rng.randint(0, 1), ttl=30.0,
                                    wait_for_stream=False)
        self.leases += list(claim.leases)

    def ack(self) -> None:
        if not self.leases:
            return
        self.step += 1
        got = self.rng.sample(self.leases, min(len(self.leases), self.rng.randint(1, 6)))
        self.led.ack([x.lease_id for x in got] + [got[0].lease_id, "not-a-lease"], self.step)

    def fail(self) -> None:
        if self.leases:
            x = self.leases.pop(self.rng.randrange(len(self.leases)))
            self.led.fail([x.lease_id], retryable=self.rng.random() < 0.6, reason="test")

    def abort(self) -> None:
        self.led.abort(self.rng.sample(self.ids, 2) + [f"never{self.rng.randrange(1000)}"])

    def durable(self) -> None:
        if self.step:
            self.led.mark_durable(self.step, retain=self.rng.random() < 0.7)
            self.marks.append(self.step)

    def requeue(self) -> None:
        self.led.requeue_quarantined(None if self.rng.random() < 0.5 else self.rng.sample(self.ids, 5))

    def new_epoch(self) -> None:
        self.epoch += 1
        self.leases = []
        self.led.begin_epoch(self.epoch, seed=self.epoch, shuffle=self.rng.random() < 0.5)

    def crash(self) -> None:
        # The process dies: its client is gone; a new one reconciles from a checkpoint it still has.
        self.led.close()
        self.led = self.reopen()
        self.leases = []
        resume = self.marks[-1] if self.marks and self.rng.random() < 0.8 else None
        try:
            self.led.reconcile(resume)
        except Exception as e:  # CheckpointTooOld: refused, nothing changed
            assert "checkpoint" in str(e).lower()
            self.led.reconcile(self.marks[-1] if self.marks else None, strict=False)

    def producers(self) -> None:
        name = f"p{self.rng.randrange(2)}"
        self.led.register_producer(name)
        if self.rng.random() < 0.5:
            self.led.producer_done(name)

    OPS = (("commit", 6), ("lease", 5), ("claim", 2), ("ack", 5), ("fail", 2), ("abort", 1), ("durable", 2),
           ("requeue", 1), ("new_epoch", 1), ("crash", 1), ("producers", 1))

    def run(self, n: int) -> None:
        names = [o for o, _ in self.OPS]
        weights = [w for _, w in self.OPS]
        for i in range(n):
            op = self.rng.choices(names, weights)[0]
            if op == "lease" and self.rng.random() < 0.2:
                time.sleep(0.06)  # let the short leases expire
            getattr(self, op)()
            where = f"op {i} ({op})"
            _cmp(self.led.counts(), recount(self.led), where)
            _cmp(self.led.counts(self.epoch), recount(self.led, self.epoch), where + f", epoch {self.epoch}")
        assert self.led.counts().durable + self.led.counts().trained > 0, "the mix never trained anything"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sqlite_counters_match_a_recount(tmp_path: Any, seed: int) -> None:
    uri = f"sqlite://{tmp_path}/l.db"
    _Mix(open_ledger(uri), lambda: open_ledger(uri), seed).run(250)


def test_memory_counters_match_a_recount() -> None:
    uri = f"memory://counts-{time.monotonic_ns()}"
    _Mix(open_ledger(uri), lambda: open_ledger(uri), 7).run(150)


def test_sqlite_ledger_without_counters_is_seeded(tmp_path: Any) -> None:
    """A ledger file made before the counters gets them from one scan on attach."""
    import sqlite3

    uri = f"sqlite://{tmp_path}/old.db"
    mix = _Mix(open_ledger(uri), lambda: open_ledger(uri), 11)
    mix.run(60)
    want = mix.led.scan_counts()
    mix.led.close()
    con = sqlite3.connect(f"{tmp_path}/old.db")
    con.execute("DROP TABLE dcount")
    con.execute("DROP TABLE scount")
    con.commit()
    con.close()
    _cmp(open_ledger(uri).counts(), want, "re-attaching a ledger without counters")


@pytest.mark.parametrize("seed", [1, 2])
def test_redis_counters_match_a_recount(redis_uri: str, seed: int) -> None:
    uri = f"{redis_uri}?namespace=counts{seed}-{time.monotonic_ns()}"
    _Mix(open_ledger(uri), lambda: open_ledger(uri), seed).run(200)


def test_ref_json_is_to_json() -> None:
    """The ledgers' fast ref encoder writes exactly ``SampleRef.to_json()``."""
    from torch_dataflow.ledger._refcodec import ref_from_json, ref_json
    from torch_dataflow.refs import FeatureSpec, SampleRef

    rng = random.Random(5)
    alphabet = "abcXYZ09_-. é\u00ff\u4e2d\"\\/\t"
    for i in range(500):
        specs = tuple(FeatureSpec("".join(rng.choices(alphabet, k=rng.randint(1, 8))), rng.choice(["bfloat16", "int64"]),
                                  tuple(rng.randint(0, 4096) for _ in range(rng.randint(0, 3))), rng.randint(0, 1 << 40))
                      for _ in range(rng.randint(0, 3)))
        ref = SampleRef(f"id{i}-é", rng.randint(1, 1 << 40), "file:///x/" + "".join(rng.choices(alphabet, k=5)), specs,
                        rng.randint(0, 1 << 50), "".join(rng.choices(alphabet, k=6)),
                        {"len": i} if i % 7 == 0 else {})
        assert ref_json(ref) == ref.to_json()
        assert ref_from_json(ref_json(ref)) == ref


def test_sqlite_one_statement_reserve_and_lease(tmp_path: Any) -> None:
    """reserve() and lease() are one statement each (RETURNING): generations, the RESERVED count
    (an aborted unknown id at generation 0 is not a new row), more ids than one statement chunk,
    lease order, and unique lease ids must all stay what the per-row versions gave."""
    led = open_ledger(f"sqlite://{tmp_path}/l.db")
    led.abort(["ghost"])  # a catalog row at generation 0, status ABORTED
    ids = [f"s{i:04d}" for i in range(1203)] + ["ghost"]  # > the 500-id chunk
    assert led.reserve(ids) == [1] * len(ids)
    _cmp(led.counts(), led.scan_counts(), "reserve of new ids and an aborted unknown one")
    led._check_auth()
    con = led._con
    scount = dict(con.execute("SELECT k, n FROM scount WHERE n != 0 AND k < 100"))
    assert scount == dict(con.execute("SELECT status, count(*) FROM samples GROUP BY status")), scount
    assert led.reserve(["s0001", "s0500", "zz"]) == [2, 2, 1]
    _cmp(led.counts(), led.scan_counts(), "re-reserve")
    gen = {"s0001": 2, "s0500": 2}
    order = ids[:1203:2]  # commit order = the epoch's order (no shuffle online)
    led.commit([fake_ref(s, gen.get(s, 1)) for s in order])
    got: list[str] = []
    lease_ids: set[str] = set()
    led.begin_epoch(1, seed=7)  # a shuffled order: rows come back from RETURNING in another one
    order = [r.sample_id for r in led.pending_refs(1)]
    assert order != sorted(order)
    while batch := led.lease("me", 97, ttl=60, epoch=1):
        assert all(x.ref.sample_id == x.sample_id and x.ref.generation == gen.get(x.sample_id, 1) for x in batch)
        got += [x.sample_id for x in batch]
        lease_ids.update(x.lease_id for x in batch)
    assert got == order and len(lease_ids) == len(order)
    _cmp(led.counts(), led.scan_counts(), "leases")
    assert led.ack(sorted(lease_ids), step=1) == []
    led.mark_durable(1)
    _cmp(led.counts(), led.scan_counts(), "ack + durable")
    assert led.counts(epoch=1).durable == len(order)


def test_sqlite_open_retries_a_locked_new_database(tmp_path: Any, monkeypatch: Any) -> None:
    """Two processes creating one new ledger at once: switching it to WAL can fail with "database is
    locked" at once (seen in CI). The open retries until its timeout instead of calling it not a ledger."""
    import sqlite3

    from torch_dataflow.ledger.sqlite import SQLiteLedger

    real, calls = SQLiteLedger._connect, []

    def flaky(self: Any) -> Any:
        calls.append(1)
        if len(calls) <= 2:
            raise sqlite3.OperationalError("database is locked")
        return real(self)

    monkeypatch.setattr(SQLiteLedger, "_connect", flaky)
    led = open_ledger(f"sqlite://{tmp_path}/l.db")
    assert led.counts().committed == 0 and len(calls) == 3
