"""Read-only queries of the SQLite ledger (status displays, audits, tests)."""

from __future__ import annotations

import sqlite3
from typing import Any

from ..refs import Lease, SampleRef
from ._refcodec import ref_from_json
from ._sqlite_schema import D, L, T
from .base import SampleStatus, format_lease_id

__all__ = ["SQLiteQueries"]


class SQLiteQueries:
    """Mixed into :class:`~torch_dataflow.ledger.sqlite.SQLiteLedger`."""

    _tx: Any  # () -> context manager yielding the connection, in one transaction

    @staticmethod
    def _meta(con: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
        row = con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    @staticmethod
    def _metas(con: sqlite3.Connection, *keys: str) -> dict[str, str]:
        """``key -> value`` of those of ``keys`` that are set: one query for several."""
        return dict(con.execute(f"SELECT key, value FROM meta WHERE key IN ({','.join('?' * len(keys))})", keys))

    @staticmethod
    def _closed(con: sqlite3.Connection) -> bool:
        n, done = con.execute("SELECT count(*), coalesce(sum(done), 0) FROM producers").fetchone()
        return n > 0 and n == done

    @staticmethod
    def _leases(con: sqlite3.Connection, rows: Any) -> list[Lease]:
        del con
        return [Lease(format_lease_id(e, g, n, s), e, o, dl, ref_from_json(ref)) for e, s, g, n, o, dl, ref in rows]

    def attempt(self) -> int:
        with self._tx() as con:
            return int(self._meta(con, "attempt", "0") or 0)

    def get_ref(self, sample_id: str) -> SampleRef | None:
        with self._tx() as con:
            row = con.execute("SELECT ref FROM samples WHERE sample_id=?", (sample_id,)).fetchone()
        return ref_from_json(row[0]) if row and row[0] else None

    def leases(self, owner_prefix: str = "") -> list[Lease]:
        with self._tx() as con:
            rows = con.execute(
                "SELECT d.epoch, d.sample_id, d.gen, d.nonce, d.owner, d.deadline, s.ref FROM deliveries d "
                f"JOIN samples s ON s.sample_id=d.sample_id WHERE d.state={L} AND d.owner LIKE ? ESCAPE '\\' "
                "ORDER BY d.deadline",
                (owner_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",)).fetchall()
            return self._leases(con, rows)

    def quarantined(self) -> list[tuple[SampleRef | None, str]]:
        with self._tx() as con:
            rows = con.execute("SELECT ref, reason FROM samples WHERE status=?",
                               (int(SampleStatus.QUARANTINED),)).fetchall()
        return [(ref_from_json(r) if r else None, reason or "") for r, reason in rows]

    def trained_steps(self, epoch: int | None = None) -> dict[str, int]:
        where, args = ("AND epoch=?", (epoch,)) if epoch is not None else ("", ())
        with self._tx() as con:
            return dict(con.execute(f"SELECT sample_id, step FROM deliveries WHERE state IN ({T},{D}) {where}", args))

