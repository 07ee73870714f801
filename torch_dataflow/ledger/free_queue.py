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
from ._refcodec import ref_from_json, ref_json

__all__ = ["FREEQ_DDL", "REDIS_SCRIPTS", "RedisFreeQueue", "SQLiteFreeQueue"]

FREEQ_DDL = ("CREATE TABLE IF NOT EXISTS free_queue(sample_id TEXT NOT NULL, gen INTEGER NOT NULL, "
             "ref TEXT NOT NULL, nbytes INTEGER NOT NULL, PRIMARY KEY(sample_id, gen))")
RESIDENT_KEY = "resident"  # SQLite meta key / Redis meta field "rb": the resident-bytes counter


class SQLiteFreeQueue:
    """Mixed into :class:`~torch_dataflow.ledger.sqlite.SQLiteLedger`."""

    _tx: Any

    @staticmethod
    def _queue_free(con: sqlite3.Connection, refs: Sequence[SampleRef], texts: Sequence[str] | None = None) -> None:
        """Queue ``refs`` for deletion; ``texts``: their JSON as the ledger stores it, when at hand."""
        if not refs:
            return
        if texts is None:
            texts = [ref_json(r) for r in refs]
        con.executemany("INSERT OR IGNORE INTO free_queue VALUES (?, ?, ?, ?)",
                        [(r.sample_id, r.generation, t, int(r.nbytes)) for r, t in zip(refs, texts, strict=True)])

    def pending_deletes(self, limit: int | None = None) -> list[SampleRef]:
        """Refs whose bytes no ledger entry needs and whose delete is not confirmed yet."""
        q = "SELECT ref FROM free_queue ORDER BY rowid" + ("" if limit is None else f" LIMIT {max(0, int(limit))}")
        with self._tx() as con:
            return [ref_from_json(r[0]) for r in con.execute(q)]

    def confirm_deleted(self, refs: Sequence[SampleRef]) -> int:
        """Drop exactly these ``(sample_id, generation)`` entries from the queue (idempotent)."""
        n = gone = 0
        with self._tx() as con:
            for key in dict.fromkeys((r.sample_id, r.generation) for r in refs):
                row = con.execute("DELETE FROM free_queue WHERE sample_id=? AND gen=? RETURNING nbytes", key).fetchone()
                if row is not None:
                    n, gone = n + 1, gone + int(row[0])
            self._add_resident(con, -gone)
        return n

    @staticmethod
    def _add_resident(con: sqlite3.Connection, delta: int) -> None:
        # A no-op until resident_bytes() has seeded the counter (then the seed includes this change).
        if delta:
            con.execute(f"UPDATE meta SET value=CAST(value AS INTEGER)+? WHERE key='{RESIDENT_KEY}'", (int(delta),))

    @classmethod
    def _count_committed(cls, con: sqlite3.Connection, refs: Sequence[SampleRef],
                         new: Sequence[tuple[Any, ...]]) -> None:
        """Add the bytes of the generations a commit made new (``new``: ``(sample_id, generation, ...)``)."""
        added = {(x[0], x[1]) for x in new}
        cls._add_resident(con, sum(int(r.nbytes) for r in refs if (r.sample_id, r.generation) in added))

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
        """Bytes of committed generations not confirmed deleted: LIVE, QUARANTINED and queued.

        A counter in ``meta`` kept by every commit and confirm (O(1)); the first call on a
        ledger without it (a new one, or one made before the counter) seeds it with a full sum."""
        from .base import SampleStatus

        with self._tx() as con:
            row = con.execute("SELECT value FROM meta WHERE key=?", (RESIDENT_KEY,)).fetchone()
            if row is not None:
                return int(row[0])
            live = con.execute("SELECT coalesce(sum(json_extract(ref, '$.nbytes')), 0) FROM samples "
                               "WHERE status IN (?, ?) AND ref IS NOT NULL",
                               (int(SampleStatus.LIVE), int(SampleStatus.QUARANTINED))).fetchone()[0]
            queued = con.execute("SELECT coalesce(sum(nbytes), 0) FROM free_queue").fetchone()[0]
            total = int(live) + int(queued)
            con.execute("INSERT INTO meta VALUES (?, ?)", (RESIDENT_KEY, str(total)))
        return total


# The Redis side queues in the prelude's ``queue_free`` (redis_scripts.py), in the deciding script.
# ARGV[5]=limit or '': with a limit, HSCAN only until that many (a long queue of parked
# removals is not copied whole on every durable mark or producer wait)
_PENDING = r"""
local limit = tonumber(ARGV[5])
if not limit then return redis.call('HVALS', P..'fq') end
local out, seen, cursor = {}, {}, '0'
repeat
  local r = redis.call('HSCAN', P..'fq', cursor, 'COUNT', math.max(limit, 128))
  cursor = r[1]
  for i = 1, #r[2], 2 do
    if #out < limit and not seen[r[2][i]] then seen[r[2][i]] = true; out[#out + 1] = r[2][i + 1] end
  end
until cursor == '0' or #out >= limit
return out
"""

# ARGV[5..]: "sid@gen" fields
_CONFIRM = r"""
local n, gone = 0, 0
for i = 5, #ARGV do
  local ref = redis.call('HGET', P..'fq', ARGV[i])
  if ref then
    redis.call('HDEL', P..'fq', ARGV[i])
    n, gone = n + 1, gone + cjson.decode(ref).nbytes
  end
end
if gone > 0 and redis.call('HEXISTS', P..'meta', 'rb') == 1 then
  redis.call('HINCRBY', P..'meta', 'rb', string.format('%d', -gone))
end
return n
"""

# the counter (O(1)); seeded by one full sum on a ledger that has none yet
_RESIDENT = r"""
local rb = redis.call('HGET', P..'meta', 'rb')
if rb then return rb end
local total = 0
for _, sid in ipairs(redis.call('SUNION', P..'live', P..'qs')) do
  local ref = redis.call('HGET', P..'s:'..sid, 'ref')
  if ref then total = total + cjson.decode(ref).nbytes end
end
for _, ref in ipairs(redis.call('HVALS', P..'fq')) do total = total + cjson.decode(ref).nbytes end
redis.call('HSET', P..'meta', 'rb', string.format('%d', total))
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
        if limit is not None and int(limit) < 1:
            return []
        got = self._run("pending_deletes", ["" if limit is None else str(int(limit))])
        return sorted((ref_from_json(t) for t in got), key=lambda r: (r.sample_id, r.generation))

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
