"""Producer liveness: heartbeats in the ledger, shared by SQLite and Redis.

A producer records ``host``, ``pid`` and ``last_seen`` (seconds since the epoch,
on the ledger's clock) when it registers and, at most every few seconds, when
it puts (:class:`~torch_dataflow.producer.FeatureWriter`). Consumers and
``torch-dataflow status`` read :meth:`Ledger.producers` to name a silent
producer instead of waiting forever.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from .._procs import pid_gone
from ..refs import SampleRef

__all__ = ["BEATS_DDL", "SQLiteProducers", "describe", "holder_key", "identity", "pid_gone", "provably_dead",
           "silent_message"]

BEATS_DDL = ("CREATE TABLE IF NOT EXISTS producer_beats(name TEXT PRIMARY KEY, host TEXT, pid INTEGER, "
             "last_seen REAL NOT NULL, info TEXT)")


def identity(info: Mapping[str, Any] | None) -> tuple[str, int, str]:
    """``(host, pid, extra info as JSON)``: this process unless ``info`` says otherwise."""
    extra = dict(info or {})
    host = str(extra.pop("host", socket.gethostname()))
    pid = int(extra.pop("pid", os.getpid()))
    return host, pid, json.dumps(extra, sort_keys=True)


def holder_key(p: Mapping[str, Any] | None) -> str:
    """Who holds a producer name, as :meth:`claim_producer` compares it: ``"-"`` for a name
    never registered, else ``"done|host|pid"`` of its record (from :meth:`Ledger.producers`)."""
    if p is None:
        return "-"
    return f"{int(bool(p['done']))}|{p.get('host') or ''}|{p.get('pid') or ''}"


def provably_dead(p: Mapping[str, Any], ttl: float) -> bool:
    """An open producer silent for more than ``ttl`` seconds whose process is gone."""
    age = p.get("age_s")
    return not p["done"] and age is not None and age > ttl and pid_gone(p.get("host"), p.get("pid"))


def describe(p: Mapping[str, Any]) -> str:
    """``name (host pid N, last heartbeat 12s ago)`` for messages and status tables."""
    where = f"{p['host']} pid {p['pid']}" if p.get("host") else "host unknown"
    age = "never" if p.get("age_s") is None else f"{p['age_s']:.0f}s ago"
    return f"{p['name']} ({where}, last heartbeat {age})"


def silent_message(ledger: Any, prods: Sequence[Mapping[str, Any]], waited: float, what: str, *,
                   dead: bool = False) -> str:
    """The :class:`~torch_dataflow.errors.ProducerSilent` message: who, since when, and the fix."""
    open_ = [p for p in prods if not p["done"]]
    uri = getattr(ledger, "uri", str(ledger))
    why = "every open producer's process is gone" if dead else f"nothing to deliver for {waited:.0f}s"
    if not open_:
        return (f"{why} while the stream is open ({what}) and no producer registered yet; "
                "is the producer running, and writing to this ledger? (a mistyped ledger path is a new, "
                "empty ledger)")
    names = "; ".join(describe(p) for p in open_)
    fix = " / ".join(f"torch-dataflow close-stream {uri} --producer {p['name']}" for p in open_)
    return (f"{why} while the stream is open ({what}); silent producer(s): {names}. Restart it under the "
            f"same name with FeatureWriter(..., resume=True), or end the stream: {fix}")


def _row(name: str, done: Any, host: Any, pid: Any, last_seen: Any, info: Any, now: float) -> dict[str, Any]:
    last = None if last_seen in (None, "") else float(last_seen)
    return {"name": name, "done": bool(int(done)), "host": host or None, "pid": int(pid) if pid else None,
            "last_seen": last, "age_s": None if last is None else round(max(0.0, now - last), 3),
            "info": json.loads(info) if info else {}}


class SQLiteProducers:
    """Mixed into :class:`~torch_dataflow.ledger.sqlite.SQLiteLedger`."""

    _tx: Any

    @staticmethod
    def _beat(con: sqlite3.Connection, name: str, info: Mapping[str, Any] | None, now: float, *,
              register: bool) -> None:
        host, pid, extra = identity(info)
        if register:
            con.execute("INSERT INTO producer_beats VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                        "host=excluded.host, pid=excluded.pid, last_seen=excluded.last_seen, info=excluded.info",
                        (name, host, pid, now, extra))
        else:
            con.execute("INSERT INTO producer_beats VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                        "last_seen=excluded.last_seen", (name, host, pid, now, extra))

    def claim_producer(self, name: str, info: Mapping[str, Any] | None, expect: str) -> bool:
        """Register ``name`` (as :meth:`register_producer`) only if its holder is still the one
        ``expect`` (:func:`holder_key`) names, in one transaction; ``False``: someone registered
        it since, and nothing changed. Two producers started at once under one name: one wins."""
        import time

        with self._tx() as con:
            row = con.execute("SELECT p.done, b.host, b.pid FROM producers p LEFT JOIN producer_beats b "
                              "ON b.name=p.name WHERE p.name=?", (name,)).fetchone()
            now = None if row is None else holder_key({"done": row[0], "host": row[1], "pid": row[2]})
            if (now or "-") != expect:
                return False
            con.execute("INSERT INTO producers VALUES (?, 0) ON CONFLICT(name) DO UPDATE SET done=0", (name,))
            self._beat(con, name, info, time.time(), register=True)
        return True

    def producer_heartbeat(self, name: str) -> None:
        import time

        with self._tx() as con:
            self._beat(con, name, None, time.time(), register=False)

    def producers(self) -> list[dict[str, Any]]:
        import time

        with self._tx() as con:
            rows = con.execute("SELECT p.name, p.done, b.host, b.pid, b.last_seen, b.info FROM producers p "
                               "LEFT JOIN producer_beats b ON b.name=p.name ORDER BY p.name").fetchall()
        now = time.time()
        return [_row(*r, now=now) for r in rows]

    def committed_refs(self, sample_ids: Sequence[str]) -> dict[str, SampleRef]:
        from ._sqlite_schema import _chunks
        from .base import SampleStatus

        ids = list(dict.fromkeys(sample_ids))
        out: dict[str, SampleRef] = {}
        with self._tx() as con:
            for chunk in _chunks(ids):
                q = (f"SELECT sample_id, ref FROM samples WHERE sample_id IN ({','.join('?' * len(chunk))}) "
                     "AND committed>0 AND ref IS NOT NULL AND status!=?")
                out.update((s, SampleRef.from_json(r)) for s, r in con.execute(q, (*chunk, int(SampleStatus.ABORTED))))
        return out


# ARGV[5]=mode ('reg' | 'beat') ARGV[6]=name ARGV[7]=host ARGV[8]=pid ARGV[9]=info json
_BEAT = r"""
local name = ARGV[6]
local cur = redis.call('HGET', P..'hb', name)
local rec
if ARGV[5] == 'reg' or not cur then
  rec = {host = ARGV[7], pid = ARGV[8], info = ARGV[9]}
  if ARGV[5] == 'reg' then redis.call('HSET', P..'prod', name, '0') end
else
  rec = cjson.decode(cur)
end
rec.ls = string.format('%.6f', NOW)
redis.call('HSET', P..'hb', name, cjson.encode(rec))
return 1
"""

# ARGV[5]=name ARGV[6]=host ARGV[7]=pid ARGV[8]=info json ARGV[9]=expected holder key (heartbeats.holder_key)
_CLAIM = r"""
local name = ARGV[5]
local d = redis.call('HGET', P..'prod', name)
local key = '-'
if d then
  local host, pid = '', ''
  local cur = redis.call('HGET', P..'hb', name)
  if cur then
    local rec = cjson.decode(cur)
    host, pid = rec.host or '', rec.pid or ''
  end
  key = (d == '1' and '1' or '0')..'|'..host..'|'..pid
end
if key ~= ARGV[9] then return 0 end
redis.call('HSET', P..'prod', name, '0')
redis.call('HSET', P..'hb', name, cjson.encode({host = ARGV[6], pid = ARGV[7], info = ARGV[8],
                                                ls = string.format('%.6f', NOW)}))
return 1
"""

_PRODUCERS = r"""
return {string.format('%.6f', NOW), redis.call('HGETALL', P..'prod'), redis.call('HGETALL', P..'hb')}
"""

# ARGV[5..]=sample ids: the committed ref of each (status not ABORTED), or ''
_COMMITTED = r"""
local out = {}
for i = 5, #ARGV do
  local r = redis.call('HMGET', P..'s:'..ARGV[i], 'c', 'st', 'ref')
  if r[1] and tonumber(r[1]) > 0 and r[2] ~= '1' and r[3] then out[#out + 1] = r[3] else out[#out + 1] = '' end
end
return out
"""

REDIS_SCRIPTS = {"producer_beat": _BEAT, "producer_claim": _CLAIM, "producers": _PRODUCERS,
                 "committed_refs": _COMMITTED}


class RedisProducers:
    """Mixed into :class:`~torch_dataflow.ledger.redis.RedisLedger`: heartbeats in the ``P hb`` hash
    (producer -> JSON ``{host, pid, info, ls}``, ``ls`` on the ledger's clock)."""

    _run: Any

    def _register_beat(self, name: str, info: Mapping[str, Any] | None) -> None:
        self._run("producer_beat", ["reg", name, *map(str, identity(info))])

    def claim_producer(self, name: str, info: Mapping[str, Any] | None, expect: str) -> bool:
        """See :meth:`SQLiteProducers.claim_producer`: one Lua script, compare and register."""
        return bool(self._run("producer_claim", [name, *map(str, identity(info)), expect]))

    def producer_heartbeat(self, name: str) -> None:
        self._run("producer_beat", ["beat", name, *map(str, identity(None))])

    def producers(self) -> list[dict[str, Any]]:
        now, prod, hb = self._run("producers", [])
        beats = {hb[i]: json.loads(hb[i + 1]) for i in range(0, len(hb), 2)}
        out = []
        for i in range(0, len(prod), 2):
            name, b = prod[i], beats.get(prod[i], {})
            out.append(_row(name, prod[i + 1], b.get("host"), b.get("pid"), b.get("ls"), b.get("info"),
                            now=float(now)))
        return sorted(out, key=lambda p: p["name"])

    def committed_refs(self, sample_ids: Sequence[str]) -> dict[str, SampleRef]:
        ids = list(dict.fromkeys(sample_ids))
        out: dict[str, SampleRef] = {}
        for i in range(0, len(ids), 1000):
            chunk = ids[i : i + 1000]
            for sid, text in zip(chunk, self._run("committed_refs", chunk), strict=True):
                if text:
                    out[sid] = SampleRef.from_json(text)
        return out
