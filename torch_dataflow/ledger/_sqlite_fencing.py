"""SQLite side of sessions, fences and checkpoint retention (see :mod:`.fencing`, :mod:`.retention`).

Meta keys: ``session`` (the holder record, JSON), ``sbeat`` (its last heartbeat),
``marks`` (recent durable checkpoint steps, JSON), ``horizon`` (every DURABLE
delivery at or below it was considered for freeing).
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from . import fencing, retention
from ._sqlite_schema import D, L
from .base import SampleStatus

__all__ = ["SQLiteFencing"]


class SQLiteFencing:
    """Mixed into :class:`~torch_dataflow.ledger.sqlite.SQLiteLedger`."""

    uri: str
    _tx: Any
    _meta: Any
    _metas: Any
    _set_meta: Any

    # ------------------------------------------------------------ sessions
    def _session_row(self, con: sqlite3.Connection) -> tuple[dict[str, Any] | None, float | None, int]:
        m = self._metas(con, "session", "sbeat", "attempt")
        beat = m.get("sbeat")
        return fencing.parse_record(m.get("session")), (float(beat) if beat else None), int(m.get("attempt") or 0)

    def _lease_expiry(self, con: sqlite3.Connection) -> float | None:
        return con.execute(f"SELECT max(deadline) FROM deliveries WHERE state={L}").fetchone()[0]

    def _gate(self, con: sqlite3.Connection, fence: int | None, what: str) -> None:
        """Refuse a stale fence (:class:`Fenced`), or a fence-less call while another
        process holds a live session (:class:`SessionConflict`)."""
        rec, beat, attempt = self._session_row(con)
        if fence is not None:
            if int(fence) != attempt:
                raise fencing.fenced(self.uri, int(fence), attempt, rec, what)
            return
        now = time.time()
        if rec and rec.get("me") != fencing.me() and fencing.is_live(rec, beat, attempt, now):
            raise fencing.conflict(self.uri, rec, beat, now, self._lease_expiry(con), what)

    def _open_session(self, con: sqlite3.Connection, session: dict[str, Any] | None, takeover: bool) -> None:
        """The gate of a reconcile: refuse while another process holds a live session."""
        rec, beat, attempt = self._session_row(con)
        now = time.time()
        if takeover or not rec or rec.get("me") == fencing.me():
            return
        if fencing.is_live(rec, beat, attempt, now):
            what = "reconcile" + (" (opening a trainer session)" if session is not None else "")
            raise fencing.conflict(self.uri, rec, beat, now, self._lease_expiry(con), what)

    def _record_session(self, con: sqlite3.Connection, session: dict[str, Any] | None, fence: int,
                        ttl: float) -> None:
        if session is None:
            con.execute("DELETE FROM meta WHERE key IN ('session', 'sbeat')")
            return
        self._set_meta(con, "session", json.dumps(fencing.holder_record(session, fence, ttl), sort_keys=True))
        self._set_meta(con, "sbeat", repr(time.time()))

    def session(self) -> dict[str, Any] | None:
        with self._tx() as con:
            rec, beat, attempt = self._session_row(con)
        if rec is None:
            return None
        now = time.time()
        return {**rec, "last_beat": beat, "age_s": None if beat is None else round(max(0.0, now - beat), 3),
                "live": fencing.is_live(rec, beat, attempt, now), "current": int(rec["fence"]) == attempt}

    def session_heartbeat(self, fence: int) -> None:
        with self._tx() as con:
            self._gate(con, int(fence), "session heartbeat")
            self._set_meta(con, "sbeat", repr(time.time()))

    def close_session(self, fence: int) -> None:
        with self._tx() as con:
            rec, _, attempt = self._session_row(con)
            if rec and int(rec.get("fence", -1)) == int(fence) == attempt:
                con.execute("DELETE FROM meta WHERE key IN ('session', 'sbeat')")

    # ------------------------------------------------------------ checkpoint retention
    def _marks(self, con: sqlite3.Connection) -> list[int]:
        return json.loads(self._meta(con, "marks") or "[]")

    def _refuse_old(self, con: sqlite3.Connection, resume_step: int | None) -> None:
        """:class:`CheckpointTooOld` if a DURABLE delivery after ``resume_step`` lost its bytes."""
        lo = -1 if resume_step is None else int(resume_step)
        row = con.execute(
            "SELECT count(*), min(d.step), max(d.step) FROM deliveries d JOIN samples s ON s.sample_id=d.sample_id "
            f"WHERE d.state={D} AND d.step>? AND s.status=?", (lo, int(SampleStatus.FREED))).fetchone()
        if row[0]:
            raise retention.too_old(self.uri, resume_step, row[0], row[1], row[2], self._marks(con))

    def checkpoints(self) -> list[int]:
        with self._tx() as con:
            return self._marks(con)
