"""Make a store hold exactly the bytes its ledger still needs.

:func:`drain_deletes` executes the ledger's durable delete queue (see
:mod:`torch_dataflow.ledger.free_queue`) idempotently; :func:`collect` also
finds bytes no ledger entry needs — generations written but never committed
(a producer killed between the two), superseded generations, the leftovers of
refused puts — and removes them once they are older than a grace period, so a
put in flight in another process is never deleted from under it. Both back
``torch-dataflow gc STORE LEDGER [--dry-run] [--grace SECONDS]``.

Example:
    >>> import tempfile, torch
    >>> from torch_dataflow import FeatureWriter
    >>> from torch_dataflow.gc import collect
    >>> d = tempfile.mkdtemp()
    >>> store, ledger = f"file://{d}/s", f"sqlite://{d}/l.db"
    >>> with FeatureWriter(store, ledger) as w:
    ...     _ = w.put("a", {"x": torch.zeros(2)})
    >>> collect(store, ledger, grace_s=0).orphans
    0
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .binding import check_store
from .ledger import Ledger, open_ledger
from .ledger.base import SampleStatus
from .refs import SampleRef
from .stores import FeatureStore, open_store

__all__ = ["GcReport", "collect", "drain_deletes"]

log = logging.getLogger(__name__)


def drain_deletes(ledger: Ledger, store: FeatureStore, refs: Iterable[SampleRef] | None = None, *,
                  limit: int | None = None, force: bool = False) -> tuple[int, int]:
    """Delete queued refs (``refs``: just these, else the queue) and confirm each delete
    that finished; a failed or parked one stays queued for the next drain (``force``:
    removals are not parked behind read leases, see :meth:`FeatureStore.settle`).
    Never raises for a delete error. Returns ``(confirmed, still_queued)``."""
    todo = list(refs) if refs is not None else ledger.pending_deletes(limit)
    done, left = [], 0
    for ref in todo:
        if ref.store and ref.store != store.uri and not _same_store(ref, store):
            left += 1  # written to another store (a mixed ledger): its own store's drain handles it
            continue
        try:
            gone = store.settle(ref, force=force)
        except Exception as e:  # noqa: BLE001 - logged; the queue keeps it
            log.warning("delete of %s generation %d in %s failed (%s); it stays queued and is retried",
                        ref.sample_id, ref.generation, store.uri, e)
            gone = False
        if gone:
            done.append(ref)
        else:
            left += 1
    if done:
        ledger.confirm_deleted(done)
    return len(done), left


def _same_store(ref: SampleRef, store: FeatureStore) -> bool:
    # A ref records the URI its writer used; options (?segment_size=...) may differ from ours.
    return ref.store.split("?", 1)[0].rstrip("/") == store.uri.split("?", 1)[0].rstrip("/")


@dataclass
class GcReport:
    """What :func:`collect` did (or, with ``dry_run``, would do)."""

    queued_deleted: int = 0
    queued_left: int = 0
    orphans: int = 0
    orphan_bytes: int = 0
    young: int = 0  # unneeded but younger than the grace period: kept for now
    temp_files: int = 0  # temporary files of writers killed mid-write, older than the grace period
    removed: list[tuple[str, int]] = field(default_factory=list)
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"queued_deleted": self.queued_deleted, "queued_left": self.queued_left, "orphans": self.orphans,
                "orphan_bytes": self.orphan_bytes, "young": self.young, "temp_files": self.temp_files, "dry_run": self.dry_run}


def collect(store: str | FeatureStore, ledger: str | Ledger, *, grace_s: float = 3600.0,
            dry_run: bool = False) -> GcReport:
    """Drain the delete queue, then remove every stored generation the ledger does not
    need (not the committed LIVE/QUARANTINED generation of its id) that is older than
    ``grace_s`` seconds (file stores: the file's mtime; stores without ages: only
    with ``grace_s=0``). A generation older than its id's committed one (a writer
    killed between its put and its commit, then resumed) goes at once: no commit of
    it can succeed any more.

    Raises:
        ConfigError: the store is not the ledger's store (nothing is deleted).
    """
    st = store if isinstance(store, FeatureStore) else open_store(store, create=False) \
        if store.split("://", 1)[0] == "file" else open_store(store)
    led = ledger if isinstance(ledger, Ledger) else open_ledger(ledger)
    check_store(st, led, unchanged="Nothing was deleted")  # a mistyped path deletes nothing
    rep = GcReport(dry_run=dry_run)
    queue = led.pending_deletes()
    if dry_run:
        rep.queued_left = len(queue)
    else:
        rep.queued_deleted, rep.queued_left = drain_deletes(led, st, queue, force=True)
    keys = st.keys()
    if dry_run:  # the queued deletes are counted above: not again as orphans or young ones
        queued = {(r.sample_id, r.generation) for r in queue}
        keys = [k for k in keys if k not in queued]
    ids = sorted({sid for sid, _ in keys})
    committed = led.committed_refs(ids)
    needed = _needed(led, ids, committed)
    now = time.time()
    for sid, gen in keys:
        if needed.get(sid) == gen:
            continue
        # Older than its id's committed generation: a writer killed before its commit (the
        # ledger would refuse that commit as stale now), so no grace is needed.
        superseded = sid in committed and gen < committed[sid].generation
        age = _age(st, sid, gen, now)
        if grace_s > 0 and not superseded and (age is None or age < grace_s):
            rep.young += 1
            continue
        rep.orphans += 1
        rep.orphan_bytes += _size(st, sid, gen)
        if not dry_run:
            st.delete(SampleRef(sid, gen, st.uri, (), 0, ""))
        rep.removed.append((sid, gen))
    sweep = getattr(st, "sweep_temp", None)  # file stores: half-written files of a killed writer
    if sweep is not None:
        rep.temp_files = sweep(older_than_s=grace_s, dry_run=dry_run)
    return rep


def _needed(ledger: Ledger, ids: list[str], committed: dict[str, SampleRef] | None = None) -> dict[str, int]:
    """``sample_id -> generation`` whose bytes the ledger needs (LIVE or QUARANTINED)."""
    keep = (SampleStatus.LIVE, SampleStatus.QUARANTINED)
    status = ledger.sample_statuses(ids)
    refs = ledger.committed_refs(ids) if committed is None else committed
    return {sid: ref.generation for sid, ref in refs.items() if status.get(sid) in keep}


def _age(store: FeatureStore, sid: str, gen: int, now: float) -> float | None:
    path_of = getattr(store, "path_of", None)
    if path_of is None:
        return None
    try:
        return now - os.stat(path_of(sid, gen)).st_mtime
    except FileNotFoundError:
        return None


def _size(store: FeatureStore, sid: str, gen: int) -> int:
    path_of = getattr(store, "path_of", None)
    if path_of is None:
        return 0
    try:
        return os.stat(path_of(sid, gen)).st_size
    except FileNotFoundError:
        return 0
