"""Deletes that finish: the ledger's durable delete queue, shared by SQLite and Redis.

Every ref whose bytes the ledger stops needing — freed by
:meth:`~torch_dataflow.ledger.base.Ledger.mark_durable` / ``reconcile``, aborted,
or superseded by a newer generation — enters the queue **in the same
transaction** (SQLite) or **the same script** (Redis) that makes that decision,
so no crash can fall between the intent and the record of it. The bytes are
deleted afterwards by :func:`torch_dataflow.gc.drain_deletes` (called by the
dataset after every durable mark and reconcile, by the writer when it starts and
after its own aborts, and by ``torch-dataflow gc``), which confirms each delete
that succeeded (:meth:`confirm_deleted`). A delete that failed — a transient
error, a SIGKILL, a Mooncake removal parked behind a read lease — stays queued
and is retried by the next drain, in any process.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from ..refs import SampleRef

__all__ = ["FREEQ_DDL", "REDIS_SCRIPTS", "RedisFreeQueue", "SQLiteFreeQueue"]

FREEQ_DDL = ("CREATE TABLE IF NOT EXISTS free_queue(sample_id TEXT NOT NULL, gen INTEGER NOT NULL, "
             "ref TEXT NOT NULL, nbytes INTEGER NOT NULL, PRIMARY KEY(sample_id, gen))")


class SQLiteFreeQueue:
    """Mixed into :class:`~torch_dataflow.ledger.sqlite.SQLiteLedger`."""

    _tx: Any

    @staticmethod
    def _queue_free(con: sqlite3.Connection, refs: Sequence[SampleRef]) -> None:
        con.executemany("INSERT OR IGNORE INTO free_queue VALUES (?, ?, ?, ?)",
                        [(r.sample_id, r.generation, r.to_json(), int(r.nbytes)) for r in refs])

    def pending_deletes(self, limit: int | None = None) -> list[SampleRef]:
        """Refs whose bytes no ledger entry needs and whose delete is not confirmed yet."""
        q = "SELECT ref FROM free_queue ORDER BY rowid" + ("" if limit is None else f" LIMIT {int(limit)}")
        with self._tx() as con:
            return [SampleRef.from_json(r[0]) for r in con.execute(q)]

    def confirm_deleted(self, refs: Sequence[SampleRef]) -> int:
        """Drop exactly these ``(sample_id, generation)`` entries from the queue (idempotent)."""
        with self._tx() as con:
            return con.executemany("DELETE FROM free_queue WHERE sample_id=? AND gen=?",
                                   [(r.sample_id, r.generation) for r in refs]).rowcount

    def sample_statuses(self, sample_ids: Sequence[str]) -> dict[str, Any]:
        """``sample_id -> SampleStatus`` of the ids the catalog knows (gc, audits)."""
        from ._sqlite_schema import _chunks
        from .base import SampleStatus

        out: dict[str, Any] = {}
        with self._tx() as con:
            for chunk in _chunks(list(sample_ids)):
                q = f"SELECT sample_id, status FROM samples WHERE sample_id IN ({','.join('?' * len(chunk))})"
                out.update((s, SampleStatus(st)) for s, st in con.execute(q, chunk))
        return out

    def resident_bytes(self) -> int:
        """Bytes of committed generations not confirmed deleted: LIVE, QUARANTINED and queued."""
        from .base import SampleStatus

        with self._tx() as con:
            live = con.execute("SELECT coalesce(sum(json_extract(ref, '$.nbytes')), 0) FROM samples "
                               "WHERE status IN (?, ?) AND ref IS NOT NULL",
                               (int(SampleStatus.LIVE), int(SampleStatus.QUARANTINED))).fetchone()[0]
            queued = con.execute("SELECT coalesce(sum(nbytes), 0) FROM free_queue").fetchone()[0]
        return int(live) + int(queued)


# The Redis side queues in the prelude's ``queue_free`` (redis_scripts.py), in the deciding script.
_PENDING = r"""
local out = {}
for i, v in ipairs(redis.call('HVALS', P..'fq')) do out[#out + 1] = v end
return out
"""

# ARGV[5..]: "sid@gen" fields
_CONFIRM = r"""
local n = 0
for i = 5, #ARGV do n = n + redis.call('HDEL', P..'fq', ARGV[i]) end
return n
"""

_RESIDENT = r"""
local total = 0
for _, sid in ipairs(redis.call('SUNION', P..'live', P..'qs')) do
  local ref = redis.call('HGET', P..'s:'..sid, 'ref')
  if ref then total = total + cjson.decode(ref).nbytes end
end
for _, ref in ipairs(redis.call('HVALS', P..'fq')) do total = total + cjson.decode(ref).nbytes end
return string.format('%d', total)
"""

_STATUSES = r"""
local out = {}
for i = 5, #ARGV do out[#out + 1] = redis.call('HGET', P..'s:'..ARGV[i], 'st') or '' end
return out
"""

REDIS_SCRIPTS = {"sample_statuses": _STATUSES, "pending_deletes": _PENDING, "confirm_deleted": _CONFIRM, "resident_bytes": _RESIDENT}


class RedisFreeQueue:
    """Mixed into :class:`~torch_dataflow.ledger.redis.RedisLedger`."""

    _run: Any

    def pending_deletes(self, limit: int | None = None) -> list[SampleRef]:
        refs = sorted((SampleRef.from_json(t) for t in self._run("pending_deletes", [])),
                      key=lambda r: (r.sample_id, r.generation))
        return refs if limit is None else refs[: int(limit)]

    def confirm_deleted(self, refs: Sequence[SampleRef]) -> int:
        if not refs:
            return 0
        return int(self._run("confirm_deleted", [f"{r.sample_id}@{r.generation}" for r in refs]))

    def resident_bytes(self) -> int:
        return int(self._run("resident_bytes", []))

    def sample_statuses(self, sample_ids: Sequence[str]) -> dict[str, Any]:
        from .base import SampleStatus

        ids = list(dict.fromkeys(sample_ids))
        out: dict[str, Any] = {}
        for i in range(0, len(ids), 1000):
            chunk = ids[i : i + 1000]
            for sid, st in zip(chunk, self._run("sample_statuses", chunk), strict=True):
                if st != "":
                    out[sid] = SampleStatus(int(st))
        return out
