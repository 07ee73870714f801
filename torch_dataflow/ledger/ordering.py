"""Reordering an epoch's pending deliveries, for length-aware plans.

A plan (:meth:`~torch_dataflow.ledger.base.Ledger.claim_step`) takes the next
``world × batch`` pending deliveries *in the epoch's order*. Length-aware
batching (:mod:`torch_dataflow.length_batching`) computes a better order from
the committed refs and writes it here, once per plan:

* :meth:`pending_refs` lists the epoch's pending deliveries (refs only);
* :meth:`order_pending` gives them a new order in one atomic step, only if the
  list is exactly the pending set (else ``"stale"``: a delivery came or went
  since the listing, nothing changed, list again) and only the first time for
  a key (later calls answer ``"done"``): every rank computes the same order,
  and a rank that computes it after another rank started claiming cannot
  rewrite what the plan already relies on.

Mixed into :class:`~torch_dataflow.ledger.sqlite.SQLiteLedger` (and so the
memory ledger) and :class:`~torch_dataflow.ledger.redis.RedisLedger`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from ..refs import SampleRef
from ._sqlite_schema import P

__all__ = ["RedisOrdering", "SQLiteOrdering", "check_order"]


def check_order(sample_ids: Sequence[str], once: str) -> list[str]:
    """The order as a list, refusing repeats and an empty key."""
    ids = [str(s) for s in sample_ids]
    if len(set(ids)) != len(ids):
        raise ConfigError("order_pending got the same sample id twice")
    if not isinstance(once, str) or not once:
        raise ConfigError(f"order_pending needs a non-empty key, got {once!r}")
    return ids


class _Stale(Exception):
    pass


class SQLiteOrdering:
    """:meth:`pending_refs` / :meth:`order_pending` on the SQLite schema."""

    def pending_refs(self, epoch: int) -> list[SampleRef]:
        with self._tx() as con:  # type: ignore[attr-defined]
            rows = con.execute(
                "SELECT s.ref FROM deliveries d JOIN samples s ON s.sample_id=d.sample_id "
                f"WHERE d.epoch=? AND d.state={P} ORDER BY d.ord", (int(epoch),)).fetchall()
        return [SampleRef.from_json(r[0]) for r in rows]

    def order_pending(self, epoch: int, sample_ids: Sequence[str], once: str) -> str:
        ids, key = check_order(sample_ids, once), "o:" + once
        try:
            with self._tx() as con:  # type: ignore[attr-defined]
                if self._meta(con, key) is not None:  # type: ignore[attr-defined]
                    return "done"
                n = con.execute(f"SELECT count(*) FROM deliveries WHERE epoch=? AND state={P}",
                                (int(epoch),)).fetchone()[0]
                if n != len(ids):
                    return "stale"
                cur = con.executemany(f"UPDATE deliveries SET ord=? WHERE epoch=? AND sample_id=? AND state={P}",
                                      [(i, int(epoch), s) for i, s in enumerate(ids)])
                if cur.rowcount != len(ids):
                    raise _Stale  # rolls the transaction back
                self._set_meta(con, key, "1")  # type: ignore[attr-defined]
        except _Stale:
            return "stale"
        return "ordered"


class RedisOrdering:
    """:meth:`pending_refs` / :meth:`order_pending` on the Redis layout (``p:{epoch}``
    holds the pending ids scored by order; each delivery keeps its order in ``o``)."""

    def pending_refs(self, epoch: int) -> list[SampleRef]:
        ids = self._cmd(lambda c: c.zrange(f"{self._prefix}p:{int(epoch)}", 0, -1))  # type: ignore[attr-defined]
        refs = self.committed_refs(ids)  # type: ignore[attr-defined]
        return [refs[s] for s in ids if s in refs]

    def order_pending(self, epoch: int, sample_ids: Sequence[str], once: str) -> str:
        ids = check_order(sample_ids, once)
        pre = self._prefix  # type: ignore[attr-defined]
        pq, meta, field = f"{pre}p:{int(epoch)}", pre + "meta", "o:" + once

        def write(pipe: Any) -> str:
            # WATCH on both keys: any claim, lease, reclaim or ordering in between aborts and retries.
            if pipe.hexists(meta, field):
                return "done"
            pending = pipe.zrange(pq, 0, -1)
            if len(pending) != len(ids) or set(pending) != set(ids):
                return "stale"
            pipe.multi()
            if ids:
                pipe.zadd(pq, {s: i for i, s in enumerate(ids)}, xx=True)
            for i, s in enumerate(ids):
                pipe.hset(f"{pre}d:{int(epoch)}:{s}", "o", i)
            pipe.hset(meta, field, "1")
            return "ordered"

        return str(self._cmd(lambda c: c.transaction(write, pq, meta, value_from_callable=True)))  # type: ignore[attr-defined]
