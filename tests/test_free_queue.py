"""The ledger's delete queue and resident-bytes counter: upgrade in place and atomicity.

The behaviour itself is the conformance suite's (``testing/free_queue_conformance.py``,
run by test_ledger.py and test_redis_ledger.py); these are backend specifics.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from torch_dataflow.ledger import open_ledger
from torch_dataflow.ledger.free_queue import RESIDENT_KEY, SQLiteFreeQueue
from torch_dataflow.refs import SampleRef


def _put(led, sizes):  # type: ignore[no-untyped-def]
    ids = list(sizes)
    refs = [SampleRef(s, g, "memory://fq", (), sizes[s], "00") for s, g in zip(ids, led.reserve(ids), strict=True)]
    led.commit(refs)
    return refs


def _train_and_free(led) -> list[SampleRef]:  # type: ignore[no-untyped-def]
    leases = led.lease("t", 100, ttl=30)
    assert led.ack([x.lease_id for x in leases], step=1) == []
    return led.mark_durable(1, retain=False)


def test_sqlite_ledger_made_before_the_queue_upgrades_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    led = open_ledger(f"sqlite://{path}")
    _put(led, {"a": 10, "b": 20})
    led.close()
    con = sqlite3.connect(path)  # what an older version left: no queue table, no counter
    con.execute("DROP TABLE free_queue")
    con.execute("DELETE FROM meta WHERE key=?", (RESIDENT_KEY,))
    con.commit()
    con.close()
    led = open_ledger(f"sqlite://{path}")
    assert led.pending_deletes() == [] and led.resident_bytes() == 30  # seeded by one full sum
    _put(led, {"c": 5})
    freed = _train_and_free(led)
    assert {r.sample_id for r in freed} == {"a", "b", "c"} and led.resident_bytes() == 35
    assert led.confirm_deleted(freed) == 3 and led.resident_bytes() == 0


def test_sqlite_queue_and_free_are_one_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while queueing rolls the FREED back too: never freed without a queue entry."""
    led = open_ledger(f"sqlite://{tmp_path / 'l.db'}")
    _put(led, {"a": 10, "b": 20})
    leases = led.lease("t", 2, ttl=30)
    led.ack([x.lease_id for x in leases], step=1)

    def crash(con: sqlite3.Connection, refs: object, texts: object = None) -> None:
        raise KeyboardInterrupt  # as if the process were interrupted between the two writes

    monkeypatch.setattr(SQLiteFreeQueue, "_queue_free", staticmethod(crash))
    with pytest.raises(KeyboardInterrupt):
        led.mark_durable(1, retain=False)
    monkeypatch.undo()
    assert led.counts().freed == 0 and led.pending_deletes() == []
    freed = led.mark_durable(1, retain=False)  # the retry decides and queues, together
    assert len(freed) == 2 and len(led.pending_deletes()) == 2 and led.counts().freed == 2


def test_redis_counter_is_seeded_once_then_kept(redis_uri: str) -> None:
    led = open_ledger(f"{redis_uri}?namespace=fqseed")
    _put(led, {"a": 10, "b": 20})  # committed before anyone asked: no counter yet
    led._cmd(lambda c: c.hdel(led._prefix + "meta", "rb"))  # type: ignore[attr-defined]
    assert led.resident_bytes() == 30
    assert led._cmd(lambda c: c.hget(led._prefix + "meta", "rb")) == "30"  # type: ignore[attr-defined]
    [b2] = _put(led, {"b": 7})  # the counter follows commits from here on
    assert led.resident_bytes() == 37 and len(led.pending_deletes()) == 1
    assert led.confirm_deleted(led.pending_deletes() * 2) == 1 and led.resident_bytes() == 17
    freed = _train_and_free(led)
    assert {r.sample_id for r in freed} == {"a", "b"} and led.resident_bytes() == 17
    assert led.confirm_deleted(freed) == 2 and led.resident_bytes() == 0 and b2 in freed
