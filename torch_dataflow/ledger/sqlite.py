"""SQLite ledger: one file shared by every process on one host.

``sqlite:///run/ledger.db?synchronous=normal&timeout=60&secret=...``

Every state change is one ``BEGIN IMMEDIATE`` transaction in WAL mode, so
producers and consumers in different processes see one truth. Hot paths are
batched (lease and ack many in one transaction). ``synchronous=normal`` (the
default) survives a process crash; ``synchronous=full`` also a host crash.

Example:
    >>> import tempfile, os
    >>> from torch_dataflow.ledger import open_ledger
    >>> led = open_ledger("sqlite://" + os.path.join(tempfile.mkdtemp(), "l.db"))
    >>> led.reserve(["a", "b"])
    [1, 1]
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..auth import SecretGuard, make_verifier
from ..errors import BackendUnavailable, ConfigError, SampleAborted
from ..refs import Lease, SampleRef, validate_sample_id
from ..uri import parse_uri
from . import retention
from ._refcodec import ref_from_json, ref_json
from ._sqlite_counts import COMMITTED_K, SQLiteCounters
from ._sqlite_fencing import SQLiteFencing
from ._sqlite_queries import SQLiteQueries
from ._sqlite_schema import (
    _CLEAR_LEASE,
    _SCHEMA,
    OLD_INDEXES,
    SCHEMA_VERSION,
    STATE_INDEXES,
    D,
    L,
    P,
    T,
    _chunks,
    _td_ord,
)
from .base import (
    RESUME_FLOOR,
    CommitResult,
    Ledger,
    Plan,
    ReconcileReport,
    SampleStatus,
    StepClaim,
    check_step,
    format_lease_id,
    new_nonce,
    parse_lease_id,
    resume_floor_message,
)
from .fencing import DEFAULT_SESSION_TTL
from .free_queue import FREEQ_DDL, SQLiteFreeQueue
from .heartbeats import BEATS_DDL, SQLiteProducers
from .ordering import SQLiteOrdering

__all__ = ["SQLiteLedger"]

log = logging.getLogger(__name__)


# SQLite must not be carried across fork() (howtocorrupt.html §2.6): a child
# that opens the file a parent connection had open reuses the parent's
# in-process lock and WAL-index bookkeeping, and two forked DataLoader workers
# then both "hold" the write lock and lease the same rows (measured: both
# workers leased the same two samples, each in its own committed transaction).
# So every file-backed connection is closed just before a fork, under its
# ledger's lock so no transaction is cut, and reopens lazily on next use.
_LIVE: weakref.WeakSet[SQLiteLedger] = weakref.WeakSet()
_HELD: list[SQLiteLedger] = []


def _before_fork() -> None:
    for ledger in list(_LIVE):
        if ledger._closes_at_fork and ledger._lock.acquire(timeout=30):
            _HELD.append(ledger)
            if ledger._con is not None and ledger._pid == os.getpid():
                ledger._con.close()
            ledger._con, ledger._guard = None, None


def _after_fork() -> None:
    while _HELD:
        _HELD.pop()._lock.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork)


DEFAULT_CACHE_MIB = 64.0  # SQLite page cache per connection, MiB (URI query ``cache_mib``)


class SQLiteLedger(SQLiteFreeQueue, SQLiteFencing, SQLiteProducers, SQLiteQueries, SQLiteOrdering, SQLiteCounters,
                   Ledger):
    """The ledger in one SQLite file (see module docs). Thread-safe within a process."""

    _closes_at_fork = True  # file-backed: never carried into a child (see _before_fork)

    _QUERY = {"synchronous": str, "timeout": float, "secret": str, "cache_mib": float}

    def __init__(self, path: str, *, synchronous: str = "normal", timeout: float = 60.0,
                 secret: str | None = None, cache_mib: float = DEFAULT_CACHE_MIB) -> None:
        if synchronous.lower() not in ("normal", "full", "off", "extra"):
            raise ConfigError(f"synchronous must be normal, full, extra or off, got {synchronous!r}")
        if not cache_mib > 0:
            raise ConfigError(f"cache_mib must be > 0 (MiB of SQLite page cache per connection), got {cache_mib!r}")
        self.cache_mib = float(cache_mib)
        self.path = path
        self.synchronous = synchronous.lower()
        self.timeout = float(timeout)
        self._secret = secret
        self.uri = f"sqlite://{path}"
        self._con: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        _LIVE.add(self)

    @classmethod
    def from_uri(cls, uri: str, **overrides: Any) -> SQLiteLedger:
        u = parse_uri(uri, cls._QUERY)
        if u.host:
            raise ConfigError(f"sqlite URI takes an absolute path (sqlite:///path/to.db), got host {u.host!r}")
        if not u.path or u.path == "/":
            raise ConfigError(f"sqlite URI has no file path: {uri!r}")
        return cls(u.path, **{**u.query, **overrides})

    def _config_state(self) -> dict[str, Any]:
        return {"path": self.path, "synchronous": self.synchronous, "timeout": self.timeout, "secret": self._secret,
                "cache_mib": self.cache_mib}

    # ------------------------------------------------------------ connection
    def _connect(self) -> sqlite3.Connection:
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise ConfigError(f"directory of ledger file does not exist: {parent} (a ledger file is created, "
                              f"its directory never is: `mkdir -p {parent}` first, or fix the path if it is a typo)")
        con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        con.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        # Page cache (pages are allocated as used): SQLite's 2 MiB default re-reads the ledger's indexes
        # from the OS once they outgrow it, which cost ~14% of the life cycle at batch 64 (bench ledger).
        con.execute(f"PRAGMA cache_size=-{max(1, int(self.cache_mib * 1024))}")
        return con

    def _attach(self) -> None:
        with self._lock:
            if self._con is not None and self._pid == os.getpid():
                return
            deadline, pause = time.monotonic() + self.timeout, 0.01
            while True:
                con = None
                try:
                    con = self._connect()
                    con.create_function("td_ord", 3, _td_ord, deterministic=True)
                    con.execute("BEGIN IMMEDIATE")
                    try:
                        verifier = self._ensure_schema(con)
                        con.execute("COMMIT")
                    except BaseException:
                        con.execute("ROLLBACK")
                        raise
                    break
                except sqlite3.OperationalError as e:
                    # Two processes creating one new ledger at once: switching it to WAL can fail with
                    # "database is locked" without waiting for the busy timeout. Retry until the timeout.
                    if con is not None:
                        con.close()
                    if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() > deadline:
                        raise ConfigError(f"{self.path} is not a torch_dataflow ledger: {e}") from e
                    time.sleep(pause)
                    pause = min(pause * 2, 0.25)
                except sqlite3.DatabaseError as e:
                    if con is not None:
                        con.close()
                    raise ConfigError(f"{self.path} is not a torch_dataflow ledger: {e}") from e
            self._guard = SecretGuard.attach(self._secret, verifier, f"ledger {self.uri}")
            self._con, self._pid = con, os.getpid()

    def _ensure_schema(self, con: sqlite3.Connection) -> str | None:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" not in tables:
            raise ConfigError(f"{self.path} is an SQLite database but not a torch_dataflow ledger "
                              f"(tables: {', '.join(sorted(tables))})")
        if "meta" in tables:
            meta = dict(con.execute("SELECT key, value FROM meta"))
            if meta.get("schema") != SCHEMA_VERSION:
                raise ConfigError(f"{self.path} is not a torch_dataflow ledger of schema {SCHEMA_VERSION} "
                                  f"(found {meta.get('schema')!r})")
            con.execute(BEATS_DDL)  # ledgers made before heartbeats gain the table (nothing else changes)
            self._state_indexes(con)  # and the per-state indexes
            con.execute(FREEQ_DDL)  # and the delete queue
            self._seed_counts(con, tables)  # and the maintained counters (seeded by one scan, once)
            return meta.get("verifier")
        for stmt in _SCHEMA.split(";"):
            if stmt.strip():
                con.execute(stmt)
        self._state_indexes(con)
        con.execute(FREEQ_DDL)
        self._seed_counts(con, tables)
        rows = [("schema", SCHEMA_VERSION), ("attempt", "0"), ("epoch", "0"), ("seq", "0")]
        verifier = make_verifier(self._secret) if self._secret is not None else None
        if verifier is not None:
            rows.append(("verifier", verifier))
        con.executemany("INSERT INTO meta VALUES (?, ?)", rows)
        return verifier

    @staticmethod
    def _state_indexes(con: sqlite3.Connection) -> None:
        have = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        for name in OLD_INDEXES:
            if name in have:
                con.execute(f"DROP INDEX {name}")
        for ddl in STATE_INDEXES:
            con.execute(ddl)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._check_auth()
        with self._lock:
            con = self._con
            assert con is not None
            try:
                con.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise BackendUnavailable(f"ledger {self.uri} is busy or unreachable: {e}") from e
            self._reset_counts()
            try:
                yield con
                self._flush_counts(con)  # the counters commit with the change they count
            except BaseException:
                self._reset_counts()
                con.execute("ROLLBACK")
                raise
            try:
                con.execute("COMMIT")
            except sqlite3.OperationalError as e:
                raise BackendUnavailable(f"commit to ledger {self.uri} failed: {e}") from e

    def close(self) -> None:
        with self._lock:
            if self._con is not None and self._pid == os.getpid():
                self._con.close()
            self._con, self._guard = None, None

    @staticmethod
    def _set_meta(con: sqlite3.Connection, key: str, value: Any) -> None:
        con.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (key, str(value)))

    # ------------------------------------------------------------ producer
    def reserve(self, sample_ids: Sequence[str]) -> list[int]:
        ids = [validate_sample_id(s) for s in sample_ids]
        if len(set(ids)) != len(ids):
            raise ConfigError("reserve() got the same sample id twice in one call")
        gens: dict[str, int] = {}
        r = int(SampleStatus.RESERVED)
        with self._tx() as con:
            fresh = 0
            for chunk in _chunks(ids):  # one upsert statement per chunk; RETURNING gives each id's new generation
                q = (f"INSERT INTO samples(sample_id, gen, status) VALUES {','.join([f'(?,1,{r})'] * len(chunk))} "
                     "ON CONFLICT(sample_id) DO UPDATE SET gen=gen+1 RETURNING sample_id, gen, status")
                for sid, gen, st in con.execute(q, chunk):
                    gens[sid] = gen
                    fresh += gen == 1 and st == r  # a new row (an old one at gen 0 is an aborted unknown id)
            self._sc(SampleStatus.RESERVED, fresh)
        return [gens[s] for s in ids]

    def commit(self, refs: Sequence[SampleRef], *, if_absent: bool = False) -> list[SampleRef]:
        ids = self._commit_ids(refs)
        superseded = CommitResult()
        with self._tx() as con:
            rows: dict[str, tuple[int, int, int, int, str | None]] = {}
            for chunk in _chunks(ids):
                q = ("SELECT sample_id, gen, committed, tomb, status, ref FROM samples "
                     f"WHERE sample_id IN ({','.join('?' * len(chunk))})")
                rows.update({r[0]: r[1:] for r in con.execute(q, chunk)})
            m = self._metas(con, "epoch", "seq")
            epoch, seq = int(m.get("epoch") or 0), int(m.get("seq") or 0)
            sample_rows, new_ids = [], []
            left: dict[int, int] = {}
            fresh = 0
            live, held = int(SampleStatus.LIVE), (int(SampleStatus.LIVE), int(SampleStatus.QUARANTINED))
            aborted = int(SampleStatus.ABORTED)
            for ref in refs:
                sid, g = ref.sample_id, ref.generation
                row = rows.get(sid)
                if row is None or g > row[0]:
                    raise ConfigError(f"commit of {sid!r} generation {g}, which was never "
                                      "reserved (call reserve() before writing the bytes)")
                gen, committed, tomb, status, old = row
                if g <= tomb:
                    raise SampleAborted(f"sample {sid!r} generation {g} was aborted")
                if g == committed:
                    continue  # idempotent re-commit
                if if_absent and committed and status != aborted:
                    # first commit wins: the id's committed generation and state stay as they are
                    superseded.refused.append(ref)
                    if old:
                        superseded.existing[sid] = ref_from_json(old)
                    continue
                if (g < gen and not if_absent) or g < committed:
                    raise ConfigError(f"stale commit of {sid!r} generation {g}: "
                                      f"generation {max(gen, committed)} supersedes it")
                if committed and old and status in held:
                    superseded.append(ref_from_json(old))
                seq += 1
                sample_rows.append((g, live, ref_json(ref), seq, sid))
                new_ids.append((sid, g, seq))
                left[status] = left.get(status, 0) + 1  # status counts, summed once below
                fresh += not committed
            con.executemany("UPDATE samples SET committed=?, status=?, ref=?, seq=?, reason=NULL "
                            "WHERE sample_id=?", sample_rows)
            for st, n in left.items():
                self._sc(st, -n)
            self._sc(SampleStatus.LIVE, len(sample_rows))
            self._sc(COMMITTED_K, fresh)
            # (epoch, state) -> n of the deliveries these ids have, for the counters; an id never committed
            # has none (deliveries come from a commit, or from begin_epoch/requeue of a committed id)
            had = self._delivery_states(con, [s for s, _, _ in new_ids if rows[s][1]])
            if superseded:
                con.executemany(f"UPDATE deliveries SET gen=?, state={P}, step=NULL, {_CLEAR_LEASE} "
                                f"WHERE sample_id=? AND state IN ({P},{L})",
                                [(g, s) for s, g, _ in new_ids])
                for (e, st), n in list(had.items()):
                    if st == L:
                        self._dmove(e, L, P, n)
                        had[(e, P)] = had.get((e, P), 0) + had.pop((e, L))
            here = 0  # the current epoch's deliveries of these ids: each becomes PENDING, the others are new
            for (e, st), n in had.items():
                if e == epoch:
                    self._dmove(e, st, P, n)
                    here += n
            self._dc(epoch, P, len(new_ids) - here)
            con.executemany(
                "INSERT INTO deliveries(epoch, sample_id, gen, state, ord) VALUES (?, ?, ?, ?, ?) "
                f"ON CONFLICT(epoch, sample_id) DO UPDATE SET gen=excluded.gen, ord=excluded.ord, state={P}, step=NULL, "
                f"{_CLEAR_LEASE}",
                [(epoch, s, g, P, q) for s, g, q in new_ids])
            self._set_meta(con, "seq", seq)
            self._queue_free(con, superseded)
            self._count_committed(con, refs, new_ids)  # resident bytes (free_queue.py)
        return superseded

    def register_producer(self, name: str, info: dict[str, Any] | None = None) -> None:
        with self._tx() as con:
            con.execute("INSERT INTO producers VALUES (?, 0) ON CONFLICT(name) DO UPDATE SET done=0", (name,))
            self._beat(con, name, info, time.time(), register=True)

    def producer_done(self, name: str) -> None:
        with self._tx() as con:
            con.execute("INSERT INTO producers VALUES (?, 1) ON CONFLICT(name) DO UPDATE SET done=1", (name,))

    def reopen(self) -> None:
        with self._tx() as con:
            con.execute("DELETE FROM producers")
            con.execute("DELETE FROM producer_beats")

    def is_closed(self) -> bool:
        with self._tx() as con:
            return self._closed(con)

    # ------------------------------------------------------------ consumer
    def begin_epoch(self, epoch: int, seed: int = 0, shuffle: bool = True) -> None:
        with self._tx() as con:
            if self._meta(con, f"epoch:{epoch}") is not None:
                return
            cur = con.execute(f"INSERT OR IGNORE INTO deliveries(epoch, sample_id, gen, state, ord) "
                              f"SELECT ?, sample_id, committed, {P}, seq FROM samples WHERE status=? AND committed>0",
                              (epoch, int(SampleStatus.LIVE)))
            self._dc(epoch, P, cur.rowcount)
            if shuffle:
                con.execute(f"UPDATE deliveries SET ord=td_ord(?, ?, sample_id) WHERE epoch=? AND state={P}",
                            (seed, epoch, epoch))
            else:  # commit order, also for deliveries an earlier, shuffled run of this epoch ordered
                con.execute(f"UPDATE deliveries SET ord=(SELECT s.seq FROM samples s WHERE "
                            f"s.sample_id=deliveries.sample_id) WHERE epoch=? AND state={P}", (epoch,))
            self._set_meta(con, f"epoch:{epoch}", f"{seed}:{int(shuffle)}")
            if epoch > int(self._meta(con, "epoch", "0") or 0):
                self._set_meta(con, "epoch", epoch)

    def _reclaim(self, con: sqlite3.Connection, now: float) -> None:
        self._dmoves(con.execute(f"UPDATE deliveries SET state={P}, {_CLEAR_LEASE} WHERE state={L} AND deadline<? "
                                 "RETURNING epoch", (now,)), L, P)

    @staticmethod
    def _delivery_states(con: sqlite3.Connection, sample_ids: Sequence[str]) -> dict[tuple[int, int], int]:
        """``(epoch, state) -> n`` of the deliveries of ``sample_ids`` (all epochs)."""
        out: dict[tuple[int, int], int] = {}
        for chunk in _chunks(sample_ids):
            q = ("SELECT epoch, state, count(*) FROM deliveries WHERE sample_id IN "
                 f"({','.join('?' * len(chunk))}) GROUP BY epoch, state")
            for e, st, n in con.execute(q, chunk):
                out[(e, st)] = out.get((e, st), 0) + n
        return out

    def lease(self, owner: str, n: int, ttl: float, *, epoch: int = 0, fence: int | None = None) -> list[Lease]:
        if n < 1:
            return []
        now = time.time()
        with self._tx() as con:
            self._gate(con, fence, "lease")
            self._reclaim(con, now)
            deadline = now + ttl
            # One statement picks the first n PENDING in order and leases them (no row can be taken
            # twice: the pick and the write are the same statement). Nonces: one random token per
            # call plus the row's id, unique within the call. RETURNING order is unspecified: sort by ord.
            rows = sorted(con.execute(
                f"UPDATE deliveries SET state={L}, owner=?, nonce=?||printf('%x', rowid), deadline=?, slot=NULL "
                f"WHERE rowid IN (SELECT rowid FROM deliveries WHERE epoch=? AND state={P} ORDER BY ord LIMIT ?) "
                "RETURNING ord, sample_id, gen, nonce, "
                # CAST: without it SQLite 3.40 scans samples here (a RETURNING column loses its affinity)
                "(SELECT s.ref FROM samples s WHERE s.sample_id=CAST(deliveries.sample_id AS TEXT))",
                (owner, new_nonce()[:12], deadline, epoch, n)))
            self._dmove(epoch, P, L, len(rows))
        return [Lease(format_lease_id(epoch, g, nonce, sid), epoch, owner, deadline, ref_from_json(ref))
                for _, sid, g, nonce, ref in rows]

    def claim_step(self, plan: Plan, step: int, rank: int, ttl: float, *, wait_for_stream: bool,
                   fence: int | None = None) -> StepClaim:
        if not 0 <= rank < plan.world:
            raise ConfigError(f"rank {rank} outside world size {plan.world}")
        now, key, need = time.time(), plan.key, plan.world * plan.batch
        with self._tx() as con:
            self._gate(con, plan.attempt, f"claim of step {step} of plan {key}")  # a plan of an older attempt
            self._gate(con, fence, f"claim of step {step} of plan {key}")
            self._reclaim(con, now)
            row = con.execute("SELECT next_step, end_step FROM plans WHERE key=?", (key,)).fetchone()
            next_step, end_step = row if row else (0, None)
            if con.execute("SELECT 1 FROM claims WHERE key=? AND step=? AND rank=?", (key, step, rank)).fetchone():
                return StepClaim("claimed")
            if end_step is not None and step >= end_step:
                return StepClaim("end", tail=self._pending(con, plan.epoch))
            k = next_step
            status = "ready"
            while k <= step:
                rows = con.execute(f"SELECT sample_id FROM deliveries WHERE epoch=? AND state={P} "
                                   "ORDER BY ord LIMIT ?", (plan.epoch, need)).fetchall()
                if len(rows) < need:
                    status = "wait" if wait_for_stream and not self._closed(con) else "end"
                    break
                cur = con.executemany(
                    f"UPDATE deliveries SET state={L}, owner=?, nonce=?, deadline=?, slot=? "
                    f"WHERE epoch=? AND sample_id=? AND state={P}",
                    [(f"{key}/r{i // plan.batch}", new_nonce(), now + ttl, f"{key}/s{k}/r{i // plan.batch}",
                      plan.epoch, r[0]) for i, r in enumerate(rows)])
                if cur.rowcount != len(rows):
                    raise BackendUnavailable(f"ledger {self.uri}: concurrent lease detected; file locks are not "
                                             "effective (network filesystem, or a connection carried across fork?)")
                self._dmove(plan.epoch, P, L, len(rows))
                k += 1
            if row is None or k != next_step or status == "end":
                # An ended plan stays ended: ranks must agree on its length forever.
                con.execute("INSERT INTO plans VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                            "next_step=max(next_step, excluded.next_step), "
                            "end_step=coalesce(end_step, excluded.end_step)", (key, k, k if status == "end" else None))
            if status != "ready":
                return StepClaim(status, tail=self._pending(con, plan.epoch) if status == "end" else 0)
            con.execute("INSERT INTO claims VALUES (?, ?, ?)", (key, step, rank))
            slot = f"{key}/s{step}/r{rank}"
            con.execute(f"UPDATE deliveries SET deadline=? WHERE slot=? AND state={L}", (now + ttl, slot))
            rows = con.execute(
                "SELECT d.epoch, d.sample_id, d.gen, d.nonce, d.owner, d.deadline, s.ref FROM deliveries d "
                f"JOIN samples s ON s.sample_id=d.sample_id WHERE d.slot=? AND d.state={L} ORDER BY d.ord",
                (slot,)).fetchall()
            return StepClaim("ready", tuple(self._leases(con, rows)))

    def _pending(self, con: sqlite3.Connection, epoch: int) -> int:
        self._flush_counts(con)  # this transaction's moves first
        row = con.execute(f"SELECT n FROM dcount WHERE epoch=? AND state={P}", (epoch,)).fetchone()  # maintained
        return int(row[0]) if row else 0

    def _lease_update(self, sql: str, lease_ids: Sequence[str], extra: tuple[Any, ...], *,
                      idempotent: bool = True, on_held: Any = None, move: tuple[int, int] | None = None) -> list[str]:
        """Run ``sql`` (ending in the lease-identity predicate) for each id in one
        transaction; return the lost ids in input order. ``on_held(con, sample_ids)``
        runs in the same transaction for the ids that were held; ``move``: the
        ``(old, new)`` state each held delivery changes (not idempotent ``sql`` only)."""
        parsed, lost = [], []
        for lid in lease_ids:
            try:
                e, g, n, s = parse_lease_id(lid)
            except Exception:
                lost.append(lid)
                continue
            parsed.append((lid, s, (*extra, e, s, g, n)))
        with self._tx() as con:
            if idempotent:
                assert move is None, "an idempotent update moves no delivery"
                cur = con.executemany(sql, [p for _, _, p in parsed])
                if cur.rowcount != len(parsed):  # find which ones (re-running is harmless)
                    lost.extend(lid for lid, _, p in parsed if con.execute(sql, p).rowcount == 0)
            else:
                seen: set[str] = set()
                for lid, _, p in parsed:  # a repeated id is handled once
                    if lid not in seen:
                        if con.execute(sql, p).rowcount == 0:
                            lost.append(lid)
                        elif move is not None:
                            self._dmove(p[len(extra)], *move)
                    seen.add(lid)
            if on_held is not None:
                gone = set(lost)
                on_held(con, list(dict.fromkeys(s for lid, s, _ in parsed if lid not in gone)))
        gone = set(lost)
        return [lid for lid in dict.fromkeys(lease_ids) if lid in gone]

    _IDENT = "epoch=? AND sample_id=? AND gen=? AND nonce=?"

    def renew(self, lease_ids: Sequence[str], ttl: float) -> list[str]:
        return self._lease_update(f"UPDATE deliveries SET deadline=? WHERE {self._IDENT} AND state={L}",
                                  lease_ids, (time.time() + ttl,))

    _ACK = f"UPDATE deliveries SET step=?, state={T}, deadline=NULL, slot=NULL WHERE {_IDENT} AND state={L}"
    _ACKED = f"SELECT 1 FROM deliveries WHERE {_IDENT} AND state IN ({T},{D})"

    def ack(self, lease_ids: Sequence[str], step: int) -> list[str]:
        # A repeat ack of the same lease (a padded repeat, a retried ack) is a no-op, also once a
        # checkpoint made the first ack DURABLE: only the LEASED -> TRAINED transition writes.
        step = check_step(step)
        by_epoch: dict[int, list[tuple[str, tuple[Any, ...]]]] = {}
        lost = []
        for lid in lease_ids:
            try:
                e, g, n, s = parse_lease_id(lid)
            except Exception:
                lost.append(lid)
                continue
            by_epoch.setdefault(e, []).append((lid, (e, s, g, n)))
        with self._tx() as con:
            floor = int(self._meta(con, RESUME_FLOOR, "0") or 0)
            if floor > 0 and step <= floor and by_epoch:
                raise ConfigError(resume_floor_message(step, floor))
            for e, items in by_epoch.items():  # one statement per epoch: its row count is that epoch's move
                moved = con.executemany(self._ACK, [(step, *ident) for _, ident in items]).rowcount
                self._dmove(e, L, T, moved)
                if moved != len(items):  # a repeat, or lost: held ones are TRAINED or DURABLE under this lease now
                    lost.extend(lid for lid, ident in items if con.execute(self._ACKED, ident).fetchone() is None)
        gone = set(lost)
        return [lid for lid in dict.fromkeys(lease_ids) if lid in gone]

    def fail(self, lease_ids: Sequence[str], *, retryable: bool = True, reason: str = "") -> list[str]:
        def quarantine(con: sqlite3.Connection, held: list[str]) -> None:
            for chunk in _chunks(held):
                q = f"SELECT status FROM samples WHERE sample_id IN ({','.join('?' * len(chunk))})"
                for (st,) in con.execute(q, chunk):
                    self._sc(st, -1)
                    self._sc(SampleStatus.QUARANTINED, 1)
            con.executemany("UPDATE samples SET status=?, reason=? WHERE sample_id=?",
                            [(int(SampleStatus.QUARANTINED), reason or "failed", s) for s in held])
            for s in held:
                self._drop_undone(con, s)

        return self._lease_update(f"UPDATE deliveries SET state={P}, {_CLEAR_LEASE} WHERE {self._IDENT} AND state={L}",
                                  lease_ids, (), idempotent=False, on_held=None if retryable else quarantine,
                                  move=(L, P))

    def _drop_undone(self, con: sqlite3.Connection, sample_id: str) -> None:
        """Delete the PENDING and LEASED deliveries of ``sample_id`` (every epoch)."""
        for e, st in con.execute(f"DELETE FROM deliveries WHERE sample_id=? AND state IN ({P},{L}) "
                                 "RETURNING epoch, state", (sample_id,)):
            self._dc(e, st, -1)

    def abort(self, sample_ids: Sequence[str]) -> list[SampleRef]:
        ids = [validate_sample_id(s) for s in sample_ids]
        freed = []
        with self._tx() as con:
            for s in ids:
                row = con.execute("SELECT gen, status, ref FROM samples WHERE sample_id=?", (s,)).fetchone()
                if row is None:
                    con.execute("INSERT INTO samples(sample_id, gen, status) VALUES (?, 0, ?)",
                                (s, int(SampleStatus.ABORTED)))
                    self._sc(SampleStatus.ABORTED, 1)
                    continue
                gen, status, ref = row
                if ref and status in (SampleStatus.LIVE, SampleStatus.QUARANTINED):
                    freed.append(ref_from_json(ref))
                con.execute("UPDATE samples SET tomb=?, status=? WHERE sample_id=?",
                            (gen, int(SampleStatus.ABORTED), s))
                self._sc(status, -1)
                self._sc(SampleStatus.ABORTED, 1)
                self._drop_undone(con, s)
            self._queue_free(con, freed)
        return freed

    def _durable(self, con: sqlite3.Connection, step: int, free: bool, retain: bool = True) -> tuple[int, list[SampleRef]]:
        ids, moved = set(), Counter()
        for e, sid in con.execute(f"UPDATE deliveries SET state={D} WHERE state={T} AND step<=? "
                                  "RETURNING epoch, sample_id", (step,)):
            moved[e] += 1
            ids.add(sid)
        for e, k in moved.items():
            self._dmove(e, T, D, k)
        marks, prev = retention.add_mark(self._marks(con), step)
        self._set_meta(con, "marks", json.dumps(marks))
        upto = retention.free_upto(step, prev, retain)
        freed: list[SampleRef] = []
        horizon = self._meta(con, "horizon")
        if free and upto is not None and (horizon is None or upto > int(horizon)):
            # DURABLE deliveries trained in (horizon, upto]: the retention rule of retention.py.
            # ... whose sample no other delivery still needs (none below DURABLE, any epoch): one query.
            # Picked and marked FREED in one statement (RETURNING), not a select and a row-by-row update.
            texts = [r[0] for r in con.execute(
                "UPDATE samples SET status=? WHERE status=? AND ref IS NOT NULL AND sample_id IN ("
                f"SELECT d.sample_id FROM deliveries d WHERE d.state={D} AND d.step<=? AND d.step>?) "
                "AND NOT EXISTS (SELECT 1 FROM deliveries o WHERE o.sample_id=samples.sample_id "
                f"AND o.state<{D}) RETURNING ref",
                (int(SampleStatus.FREED), int(SampleStatus.LIVE), upto,
                 -(1 << 62) if horizon is None else int(horizon)))]
            self._set_meta(con, "horizon", upto)
            freed = [ref_from_json(t) for t in texts]
            self._sc(SampleStatus.LIVE, -len(freed))  # the statement picked LIVE ones
            self._sc(SampleStatus.FREED, len(freed))
            self._queue_free(con, freed, texts)
        return len(ids), freed

    def mark_durable(self, step: int, *, free: bool = True, retain: bool = True,
                     fence: int | None = None) -> list[SampleRef]:
        step = check_step(step)
        with self._tx() as con:
            self._gate(con, fence, f"durable mark of step {step}")
            return self._durable(con, step, free, retain)[1]

    def reconcile(self, resume_step: int | None, *, free: bool = True, strict: bool = True,
                  session: dict[str, Any] | None = None, takeover: bool = False,
                  session_ttl: float = DEFAULT_SESSION_TTL) -> ReconcileReport:
        rs = None if resume_step is None else check_step(resume_step)
        with self._tx() as con:
            self._open_session(con, session, takeover)
            if strict:
                self._refuse_old(con, rs)
            released = self._dmoves(con.execute(f"UPDATE deliveries SET state={P}, {_CLEAR_LEASE} WHERE state={L} "
                                                "RETURNING epoch"), L, P)
            after = -1 if rs is None else rs
            replayed = self._dmoves(con.execute(f"UPDATE deliveries SET state={P}, step=NULL WHERE state={T} AND "
                                                "step>? RETURNING epoch", (after,)), T, P)
            # DURABLE after the resume step: not in the checkpoint being resumed; replayed while the bytes last.
            replayed += self._dmoves(con.execute(
                f"UPDATE deliveries SET state={P}, step=NULL WHERE state={D} AND step>? AND "
                "sample_id IN (SELECT sample_id FROM samples WHERE status=?) RETURNING epoch",
                (after, int(SampleStatus.LIVE))), D, P)
            self._set_meta(con, "marks", json.dumps([m for m in self._marks(con) if m < after]))
            con.execute("DELETE FROM meta WHERE key='horizon'")  # one full scan at the next free
            durable, freed = (0, []) if rs is None else self._durable(con, rs, free)
            con.execute("DELETE FROM plans")
            con.execute("DELETE FROM claims")
            if rs is None:
                # A fresh run starts again at epoch 0, and each epoch's begin_epoch fills in
                # the samples committed after that epoch was first begun (only its own later
                # epochs had them): every live sample is in every epoch of the new run.
                con.execute("DELETE FROM meta WHERE key GLOB 'epoch:*'")
                self._set_meta(con, "epoch", 0)
            attempt = int(self._meta(con, "attempt", "0") or 0) + 1
            self._set_meta(con, "attempt", attempt)
            self._set_meta(con, RESUME_FLOOR, rs or 0)  # this run's acks are of later steps (ack refuses others)
            self._record_session(con, session, attempt, session_ttl)
        return ReconcileReport(attempt, replayed, durable, released, tuple(freed))

    # ------------------------------------------------------------ run metadata and requeue (issue 15)
    def get_meta(self, key: str) -> str | None:
        with self._tx() as con:
            return self._meta(con, _user_meta(key))

    def claim_meta(self, key: str, value: str) -> str:
        with self._tx() as con:
            con.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (_user_meta(key), str(value)))
            return str(self._meta(con, _user_meta(key)))

    def requeue_quarantined(self, sample_ids: Sequence[str] | None = None) -> int:
        q = int(SampleStatus.QUARANTINED)
        with self._tx() as con:
            if sample_ids is None:
                ids = [r[0] for r in con.execute("SELECT sample_id FROM samples WHERE status=?", (q,))]
            else:
                wanted = [validate_sample_id(s) for s in sample_ids]
                ids = [s for s in dict.fromkeys(wanted)
                       if con.execute("SELECT 1 FROM samples WHERE sample_id=? AND status=?", (s, q)).fetchone()]
            epochs = {int(self._meta(con, "epoch", "0") or 0)}
            epochs.update(int(k.split(":", 1)[1]) for (k,) in con.execute("SELECT key FROM meta WHERE key LIKE 'epoch:%'"))
            for chunk in _chunks(ids):
                n = con.executemany("UPDATE samples SET status=?, reason=NULL WHERE sample_id=? AND status=?",
                                    [(int(SampleStatus.LIVE), s, q) for s in chunk]).rowcount
                self._sc(q, -n)
                self._sc(SampleStatus.LIVE, n)
                for e in sorted(epochs):  # one statement per epoch: its row count is that epoch's new deliveries
                    self._dc(e, P, con.executemany(
                        "INSERT OR IGNORE INTO deliveries(epoch, sample_id, gen, state, ord) "
                        f"SELECT ?, sample_id, committed, {P}, seq FROM samples WHERE sample_id=?",
                        [(e, s) for s in chunk]).rowcount)
        return len(ids)

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as con:
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (_user_meta(key), str(value)))


def _user_meta(key: str) -> str:
    """The meta-table key of run metadata ``key`` (kept apart from the ledger's own keys)."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"a ledger meta key must be a non-empty str, got {key!r}")
    return "x:" + key
