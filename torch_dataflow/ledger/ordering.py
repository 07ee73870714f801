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

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from ..refs import SampleRef
from ._sqlite_schema import P

__all__ = ["RedisOrdering", "SQLiteOrdering", "check_order", "length_of", "sample_length"]


def sample_length(ref: SampleRef, key: str = "input_ids") -> int:
    """A sample's length from its ref alone: ``ref.metadata[key]`` if it is an int,
    else the element count of the tensor named ``key`` (``[S]`` and ``[1, S]`` give ``S``).

    Raises:
        ConfigError: neither exists; the message lists the tensors and metadata keys.

    Example:
        >>> from torch_dataflow.refs import FeatureSpec, SampleRef
        >>> spec = FeatureSpec(name="input_ids", dtype="int64", shape=(1, 37), nbytes=296)
        >>> sample_length(SampleRef("s", 1, "memory://", (spec,), 296, "0"))
        37
    """
    value = ref.metadata.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    for spec in ref.specs:
        if spec.name == key:
            return math.prod(spec.shape)
    ints = sorted(k for k, v in ref.metadata.items() if isinstance(v, int) and not isinstance(v, bool))
    raise ConfigError(
        f"sample {ref.sample_id!r} has no length under {key!r}: its tensors are {sorted(s.name for s in ref.specs)}, "
        f"its int metadata {ints}; pass length_key= one of those (the tensor's element count is the length)"
    )


def length_of(ref: Mapping[str, Any], key: str = "input_ids") -> int:
    """:func:`sample_length` of a ref as the ledger stores it (``SampleRef.to_dict()``),
    without building the ref: what ledgers use to list an epoch's lengths fast."""
    value = ref.get("metadata", {}).get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    for spec in ref["specs"]:
        if spec["name"] == key:
            return math.prod(spec["shape"])
    return sample_length(SampleRef.from_dict(ref), key)  # raises, naming what the ref has


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

    def pending_lengths(self, epoch: int, key: str) -> list[tuple[str, int]]:
        """``(sample_id, length)`` of the pending deliveries in order, without building refs."""
        with self._tx() as con:  # type: ignore[attr-defined]
            rows = con.execute(
                "SELECT s.ref FROM deliveries d JOIN samples s ON s.sample_id=d.sample_id "
                f"WHERE d.epoch=? AND d.state={P} ORDER BY d.ord", (int(epoch),)).fetchall()
        return [(d["sample_id"], length_of(d, key)) for d in (json.loads(r[0]) for r in rows)]

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

    def pending_lengths(self, epoch: int, key: str) -> list[tuple[str, int]]:
        """``(sample_id, length)`` of the pending deliveries in order, without building refs."""
        ids = self._cmd(lambda c: c.zrange(f"{self._prefix}p:{int(epoch)}", 0, -1))  # type: ignore[attr-defined]
        out = []
        for i in range(0, len(ids), 1000):
            chunk = ids[i : i + 1000]
            for sid, text in zip(chunk, self._run("committed_refs", chunk), strict=True):  # type: ignore[attr-defined]
                if text:
                    out.append((sid, length_of(json.loads(text), key)))
        return out

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
