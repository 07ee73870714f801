"""The ledger conformance suite on the in-memory and SQLite ledgers, plus SQLite specifics."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from torch_dataflow.errors import ConfigError
from torch_dataflow.ledger import open_ledger
from torch_dataflow.ledger.base import Ledger
from torch_dataflow.ledger.memory import MemoryLedger
from torch_dataflow.ledger.sqlite import SQLiteLedger
from torch_dataflow.testing.ledger_conformance import LedgerConformance, commit_ids
from torch_dataflow.testing.ledger_model import make_state_machine

_names = itertools.count()


class TestMemoryLedger(LedgerConformance):
    def make_ledger(self, **kw: Any) -> Ledger:
        name = f"conf{next(_names)}"
        return open_ledger(f"memory://{name}", **kw)

    def attach_ledger(self, ledger: Ledger, **kw: Any) -> Ledger:
        assert isinstance(ledger, MemoryLedger)
        return MemoryLedger(ledger.name, **kw)


class TestSQLiteLedger(LedgerConformance):
    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.tmp = tmp_path

    def make_ledger(self, **kw: Any) -> Ledger:
        return open_ledger(f"sqlite://{self.tmp}/l{next(_names)}.db", **kw)

    def attach_ledger(self, ledger: Ledger, **kw: Any) -> Ledger:
        assert isinstance(ledger, SQLiteLedger)
        return SQLiteLedger(ledger.path, **kw)


def test_not_a_ledger_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="not a torch_dataflow ledger"):
        open_ledger(f"sqlite://{junk}").counts()
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE users(name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(ConfigError, match="not a torch_dataflow ledger"):
        open_ledger(f"sqlite://{other}").counts()
    assert sqlite3.connect(other).execute("SELECT count(*) FROM users").fetchone() == (0,)


def test_bad_uris(tmp_path: Path) -> None:
    for uri in (f"sqlite://{tmp_path}/l.db?bogus=1", "sqlite://host/x.db", "postgres://x", "nope",
                f"sqlite://{tmp_path}/missing/dir/l.db", f"sqlite://{tmp_path}/l.db?synchronous=maybe"):
        with pytest.raises(ConfigError):
            open_ledger(uri).counts()


def test_sqlite_cache_mib(tmp_path: Path) -> None:
    import pickle

    led = open_ledger(f"sqlite://{tmp_path}/l.db?cache_mib=8")
    led.counts()
    assert led._con.execute("PRAGMA cache_size").fetchone() == (-8192,)
    again = pickle.loads(pickle.dumps(led))  # a DataLoader worker gets the same cache size
    again.counts()
    assert again._con.execute("PRAGMA cache_size").fetchone() == (-8192,)
    default = open_ledger(f"sqlite://{tmp_path}/l.db")
    default.counts()
    assert default._con.execute("PRAGMA cache_size").fetchone() == (-64 * 1024,)
    for bad in ("0", "-1", "x"):
        with pytest.raises(ConfigError):
            open_ledger(f"sqlite://{tmp_path}/l.db?cache_mib={bad}").counts()


def test_memory_ledger_refuses_other_process() -> None:
    import multiprocessing as mp

    led = open_ledger("memory://fork-check")
    commit_ids(led, ["x"])
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_touch, args=(led, q))
    p.start()
    p.join(30)
    assert q.get(timeout=5) == "ConfigError"


def _touch(led: Ledger, q: Any) -> None:
    try:
        led.counts()
        q.put("no error")
    except ConfigError:
        q.put("ConfigError")


TestMemoryLedgerModel = make_state_machine(
    lambda: open_ledger(f"memory://model{next(_names)}")
).TestCase


def _sqlite_factory() -> Ledger:
    import tempfile

    return open_ledger(f"sqlite://{tempfile.mkdtemp(prefix='td-model-')}/l.db")


TestSQLiteLedgerModel = make_state_machine(_sqlite_factory).TestCase


def test_no_sqlite_connection_is_carried_across_fork(tmp_path: Path) -> None:
    """SQLite must not be carried across fork(): a forked DataLoader worker that
    reopened a file its parent had open shared the parent's lock bookkeeping, and
    two workers leased the same rows. Connections close before a fork (under the
    ledger's lock) and reopen lazily, in the parent and in the child."""
    import multiprocessing as mp

    led = SQLiteLedger(str(tmp_path / "l.db"))
    commit_ids(led, [f"s{i}" for i in range(8)])
    assert led._con is not None
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def child() -> None:
        q.put(led._con is None)
        q.put(sorted(x.sample_id for x in led.lease("child", 4, ttl=60)))

    p = ctx.Process(target=child)
    p.start()
    assert q.get(timeout=30) is True, "the child inherited an open connection"
    theirs = q.get(timeout=30)
    p.join(30)
    mine = sorted(x.sample_id for x in led.lease("parent", 8, ttl=60))  # the parent reopened lazily
    assert len(theirs) == 4 and not set(theirs) & set(mine) and len(mine) == 4
