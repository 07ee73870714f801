"""Schema and small helpers of the SQLite ledger (see :mod:`torch_dataflow.ledger.sqlite`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import xxhash

from .base import DeliveryState

__all__ = ["SCHEMA_VERSION"]

SCHEMA_VERSION = "torch_dataflow.ledger/1"
P, L, T, D = (int(s) for s in DeliveryState)
_CHUNK = 500  # stay under SQLite's host-parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples(
  sample_id TEXT PRIMARY KEY, gen INTEGER NOT NULL, committed INTEGER NOT NULL DEFAULT 0,
  tomb INTEGER NOT NULL DEFAULT 0, status INTEGER NOT NULL, ref TEXT, seq INTEGER, reason TEXT);
CREATE TABLE IF NOT EXISTS deliveries(
  epoch INTEGER NOT NULL, sample_id TEXT NOT NULL, gen INTEGER NOT NULL, state INTEGER NOT NULL,
  ord INTEGER NOT NULL, owner TEXT, nonce TEXT, deadline REAL, step INTEGER, slot TEXT,
  PRIMARY KEY(epoch, sample_id));
CREATE INDEX IF NOT EXISTS d_slot ON deliveries(slot) WHERE slot IS NOT NULL;
CREATE INDEX IF NOT EXISTS d_sample ON deliveries(sample_id);
CREATE TABLE IF NOT EXISTS plans(key TEXT PRIMARY KEY, next_step INTEGER NOT NULL, end_step INTEGER);
CREATE TABLE IF NOT EXISTS claims(key TEXT NOT NULL, step INTEGER NOT NULL, rank INTEGER NOT NULL,
  PRIMARY KEY(key, step, rank));
CREATE TABLE IF NOT EXISTS producers(name TEXT PRIMARY KEY, done INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS producer_beats(name TEXT PRIMARY KEY, host TEXT, pid INTEGER,
  last_seen REAL NOT NULL, info TEXT);
"""

# One partial index per state that is searched (issue 14 item 5): a state change touches
# only the indexes of the two states it leaves and enters, not every index on state.
STATE_INDEXES = (
    f"CREATE INDEX IF NOT EXISTS d_pend ON deliveries(epoch, ord) WHERE state={P}",
    f"CREATE INDEX IF NOT EXISTS d_lease ON deliveries(deadline) WHERE state={L}",
    f"CREATE INDEX IF NOT EXISTS d_trained ON deliveries(step) WHERE state={T}",
    f"CREATE INDEX IF NOT EXISTS d_durable ON deliveries(step) WHERE state={D}",
)
OLD_INDEXES = ("d_pending", "d_leased", "d_step")  # replaced by STATE_INDEXES in ledgers made before them

_CLEAR_LEASE = "owner=NULL, nonce=NULL, deadline=NULL, slot=NULL"


def _td_ord(seed: int, epoch: int, sample_id: str) -> int:
    # Signed 64-bit, as SQLite stores integers.
    return xxhash.xxh3_64_intdigest(f"{seed}:{epoch}:{sample_id}".encode()) - (1 << 63)


def _chunks(seq: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), _CHUNK):
        yield seq[i : i + _CHUNK]


