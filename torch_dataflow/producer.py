"""Producer side: :class:`FeatureWriter` writes bytes, then commits the ref.

Example:
    >>> import torch
    >>> from torch_dataflow import FeatureWriter
    >>> with FeatureWriter(store="memory://w-doc", ledger="memory://w-doc") as w:
    ...     ref = w.put("sample-0", {"x": torch.ones(2)})
    >>> ref.generation
    1
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .binding import bind_store, note_writer
from .errors import BackendUnavailable, ConfigError, SampleAborted, StoreFull
from .gc import drain_deletes
from .ledger import Ledger, open_ledger
from .metrics import _record as _metrics
from .refs import SampleRef, validate_sample_id
from .stores import FeatureStore, open_store

__all__ = ["FeatureWriter"]

log = logging.getLogger(__name__)


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Size of a sample's tensors; a ``TypeError`` before anything is reserved or written."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"a sample is a Mapping[str, Tensor], got {type(tensors).__name__}")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sample value {name!r} is a {type(t).__name__}, not a torch.Tensor")
    return sum(int(t.numel()) * t.element_size() for t in tensors.values())


class FeatureWriter:
    """Put samples into a store and commit them to a ledger, with backpressure.

    Each :meth:`put` reserves the next generation of the sample id, writes the
    encoded tensors to the store (invisible until complete), then commits the
    ref: a consumer can never see a ref whose bytes are not all there. If the
    id was aborted while the bytes were in flight, the bytes are deleted and
    :class:`~torch_dataflow.errors.SampleAborted` is raised.

    Backpressure (DESIGN invariant 8): while the store holds more than
    ``max_resident_bytes`` or the ledger more than ``max_pending`` undelivered
    samples, ``put`` waits (polling every ``poll`` seconds) and raises
    :class:`~torch_dataflow.errors.StoreFull` after ``put_timeout`` seconds —
    it never drops data and never grows without bound.

    Args:
        store: a store URI or instance.
        ledger: a ledger URI or instance.
        name: this producer's name; the stream closes when every registered
            producer has called :meth:`close`. Give a stable name per producer
            role (``"producer-0"``): a producer restarted after a crash then
            re-registers under the same name and its ``close()`` closes the
            stream. With the default (unique per writer), a crashed producer
            stays registered and online consumers wait for it until their
            ``idle_timeout`` (or at once if its process is provably gone) and
            raise :class:`~torch_dataflow.errors.ProducerSilent`;
            ``torch-dataflow close-stream LEDGER --producer NAME`` ends it.
        max_resident_bytes: store budget in bytes (``None``: the store's own
            ``max_bytes`` setting, e.g. ``file:///dir?max_bytes=64GiB``, else unbounded).
        max_pending: ledger budget of pending + leased samples (``None``: unbounded).
        put_timeout: seconds ``put`` may wait for room before ``StoreFull``.
        resume: skip ids already committed (LIVE, FREED or QUARANTINED; not
            aborted): :meth:`put` returns the existing ref and writes nothing, so
            a producer restarted under the same ``name`` never puts (and its
            consumers never train) a sample twice. :meth:`missing` tells which
            ids still need generating. Costs one ledger lookup per put.
        heartbeat_every: seconds between heartbeats sent on puts (and while
            waiting for room); consumers name a producer silent for longer
            than their ``producer_ttl``.
        takeover: start even though a producer of the same ``name`` looks
            alive (see below).

    A producer started twice by mistake would write every sample twice, and the
    second commit of a trained sample trains it again: a writer whose ``name``
    is held by a live producer (on this host, its process runs; elsewhere, its
    heartbeat is younger than 60 s) raises
    :class:`~torch_dataflow.errors.SessionConflict` at its first
    :meth:`missing` or put, naming the holder. ``takeover=True`` starts anyway
    (the other one is known to be gone).
    """

    def __init__(
        self,
        store: str | FeatureStore,
        ledger: str | Ledger,
        *,
        name: str | None = None,
        max_resident_bytes: int | None = None,
        max_pending: int | None = None,
        put_timeout: float = 600.0,
        poll: float = 0.05,
        resume: bool = False,
        heartbeat_every: float = 5.0,
        takeover: bool = False,
    ) -> None:
        self.store = open_store(store)
        self.ledger = open_ledger(ledger)
        # Connections this writer opened from URIs are its to release; instances belong to the caller.
        self._owned = [x for x, given in ((self.store, store), (self.ledger, ledger)) if isinstance(given, str)]
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.max_resident_bytes = (max_resident_bytes if max_resident_bytes is not None
                                   else getattr(self.store, "max_bytes", None))
        self.max_pending = max_pending
        self.put_timeout = put_timeout
        self.poll = poll
        self.written = 0
        self.bytes_written = 0
        self.waited_s = 0.0
        self._registered = False
        self._closed = False
        self._credit: tuple[int | None, int | None] = (None, None)
        self.resume = resume
        self.heartbeat_every = heartbeat_every
        self.skipped = 0  # puts answered with an already committed ref (resume)
        self.takeover = takeover
        self._refused = False
        self._beat_at = 0.0
        self._bound = False
        note_writer(self)

    def _bind(self) -> None:
        """Before the first byte: record this store in the ledger (or refuse another one)."""
        if not self._bound:
            bind_store(self.store, self.ledger)
            self._bound = True
            sweep = getattr(self.store, "sweep_dead_writers", None)  # a killed writer's half-written files
            if sweep is not None:
                n = sweep()
                if n:
                    log.info("removed %d temporary files of writers killed mid-write in %s", n, self.store.uri)
            # Finish deletes an earlier process queued but did not complete (bounded: one batch).
            drain_deletes(self.ledger, self.store, limit=1024)

    def _refuse_oversize(self, largest: int) -> None:
        """A sample larger than the whole byte budget can never fit: refuse it now."""
        if self.max_resident_bytes is not None and largest > self.max_resident_bytes:
            raise StoreFull(f"producer {self.name}: a sample of {largest} bytes is larger than the whole byte "
                            f"budget of {self.max_resident_bytes} bytes of store {self.store.uri}; it can never fit "
                            "(raise max_resident_bytes / max_bytes, or split the sample)")

    HOLDER_TTL = 60.0  # a same-name producer on another host counts as live while its heartbeat is this young

    def _check_name(self) -> str | None:
        """Refuse to run beside a live producer of the same name (started twice by mistake).
        Returns who holds the name now (:func:`~torch_dataflow.ledger.heartbeats.holder_key`),
        for the registration that must find it unchanged."""
        if self._registered or self.takeover:
            return None
        from .errors import SessionConflict
        from .ledger.heartbeats import describe, holder_key, pid_gone

        seen = holder_key(None)
        for p in self.ledger.producers():
            if p["name"] != self.name:
                continue
            seen = holder_key(p)
            if p["done"]:
                continue
            here = p.get("host") == socket.gethostname()
            if here and p.get("pid") == os.getpid():
                continue  # an earlier writer of this process
            live = not pid_gone(p.get("host"), p.get("pid")) if here and p.get("pid") else \
                p.get("age_s") is not None and p["age_s"] <= self.HOLDER_TTL
            if live:
                self._refused = True
                raise SessionConflict(
                    f"producer {describe(p)} is already running on ledger {self.ledger.uri} under the name "
                    f"{self.name!r}: two producers of one name would write every sample twice (a sample trained "
                    "in between is trained again). Stop the other one, give this one its own name, or pass "
                    "takeover=True (torch-dataflow import: --takeover) if the other is known to be gone")
        return seen

    def _register(self) -> None:
        if not self._registered:
            budget = {"max_resident_bytes": self.max_resident_bytes} if self.max_resident_bytes else None
            claim = getattr(self.ledger, "claim_producer", None)
            for _ in range(5):
                seen = self._check_name()
                if seen is None or claim is None:
                    self.ledger.register_producer(self.name, budget)  # the budget: for stall diagnoses
                    break
                # Check and register as one step: of two producers started at once under one name,
                # the second finds the first's record instead of the one it checked, checks again, and
                # is refused (SessionConflict) while the first runs.
                if claim(self.name, budget, seen):
                    break
            else:
                raise BackendUnavailable(f"ledger {self.ledger.uri}: the producer name {self.name!r} changed "
                                         "hands five times while this writer registered it")
            self._registered = True
            self._beat_at = time.monotonic()

    def _heartbeat(self) -> None:
        """Tell the ledger this producer is alive, at most every ``heartbeat_every`` seconds."""
        if time.monotonic() - self._beat_at >= self.heartbeat_every:
            self.ledger.producer_heartbeat(self.name)
            self._beat_at = time.monotonic()

    def missing(self, sample_ids: Iterable[str]) -> list[str]:
        """The ids not yet committed (in input order): what a resumed producer
        still has to generate. One ledger lookup for the batch."""
        ids = list(sample_ids)
        self._check_name()  # a second producer of this name is refused before it plans any work
        self._bind()  # a store other than the ledger's is refused here, not only at the first put
        done = self._kept(self.ledger.committed_refs(ids))
        return [s for s in ids if s not in done]

    def _kept(self, committed: dict[str, SampleRef]) -> dict[str, SampleRef]:
        """The committed refs a resumed producer may skip: all but those whose bytes
        the store lost before they were trained (e.g. objects in the Mooncake segment
        of a producer that died), which must be put again, else they never train."""
        from .ledger.base import SampleStatus

        if not committed:
            return committed
        statuses = self.ledger.sample_statuses(list(committed))
        unread = (SampleStatus.LIVE, SampleStatus.QUARANTINED)  # FREED: trained, gone on purpose
        gone = [sid for sid, ref in committed.items() if statuses.get(sid) in unread and not self._has(ref)]
        if not gone:
            return committed
        # Trained already: putting it again would train it twice. An offline pool is read again every
        # epoch, so there only the current epoch counts: a sample trained in an earlier one needs its bytes.
        from .finish import MODE_KEY

        epoch = None
        if self.ledger.get_meta(MODE_KEY) == "offline":
            epoch = max(self.ledger.counts().extra.get("epochs") or [0])
        trained = self.ledger.trained_steps(epoch)
        lost = {sid for sid in gone if sid not in trained}
        if lost:
            log.warning("%d committed samples of %s lost their bytes before training (first: %s); putting them "
                        "again", len(lost), self.store.uri, sorted(lost)[0])
        return {sid: ref for sid, ref in committed.items() if sid not in lost}

    def _has(self, ref: SampleRef) -> bool:
        from .gc import _same_store

        if ref.store and ref.store != self.store.uri and not _same_store(ref, self.store):
            return True  # another store's bytes (a mixed ledger): not this writer's to judge
        try:
            return self.store.readable(ref)
        except Exception:  # noqa: BLE001 - unknown is not lost: never re-put on a doubt
            return True

    def _over_budget(self, incoming: int) -> str | None:
        """Ask the store and ledger; on room, keep the margin as credit for later puts."""
        room_bytes = room_samples = None
        if self.max_resident_bytes is not None:
            resident = self._resident()
            if resident > 0 and resident + incoming > self.max_resident_bytes:
                return f"store holds {resident} bytes, budget {self.max_resident_bytes}"
            room_bytes = self.max_resident_bytes - resident
        if self.max_pending is not None:
            c = self.ledger.counts(epoch=None)
            if c.pending + c.leased >= self.max_pending:
                return f"ledger has {c.pending + c.leased} undelivered samples, budget {self.max_pending}"
            room_samples = self.max_pending - c.pending - c.leased
        self._credit = (room_bytes, room_samples)
        return None

    def _resident(self) -> int:
        """Bytes resident in the store, across every process: the store's own count where
        it sees all writers (file://: a directory scan; memory://), else (Mooncake, whose
        client sees only its own writes) the ledger's byte accounting: committed
        generations not yet confirmed deleted."""
        if getattr(self.store, "health_is_local", False):
            return self.ledger.resident_bytes()
        return self.store.health().resident_bytes

    def _has_credit(self, incoming: int, samples: int = 1) -> bool:
        """Whether room measured earlier still covers this put: health() scans a
        directory and counts() a table, too slow to run on every put. Consumers
        only ever make more room; other producers can overshoot a budget by at
        most the room each of them last measured."""
        room_bytes, room_samples = self._credit
        if self.max_resident_bytes is not None and (room_bytes is None or room_bytes < incoming):
            return False
        return self.max_pending is None or (room_samples is not None and room_samples >= samples)

    def _charge(self, nbytes: int, samples: int) -> None:
        """Spend credit on what was really written (encoded size, header included)."""
        room_bytes, room_samples = self._credit
        self._credit = (None if room_bytes is None else room_bytes - nbytes,
                        None if room_samples is None else room_samples - samples)

    def wait_for_room(self, incoming: int = 0, samples: int = 1) -> None:
        """Block until the store and ledger are under budget, or raise ``StoreFull``."""
        if self.max_resident_bytes is None and self.max_pending is None:
            return
        if self._has_credit(incoming, samples):
            return
        start = drained = time.monotonic()
        while (why := self._over_budget(incoming)) is not None:
            waited = time.monotonic() - start
            if time.monotonic() - drained > 0.5:
                # Deletes the consumers queued but could not finish (e.g. a Mooncake removal parked
                # behind their own read lease) are room too: finish them from here.
                drain_deletes(self.ledger, self.store, limit=256)
                drained = time.monotonic()
            if waited > self.put_timeout:
                self.waited_s += waited
                _metrics.backpressure(waited)
                raise StoreFull(f"producer {self.name} waited {waited:.1f}s for room for {incoming} bytes "
                                f"({samples} samples): {why}")
            self._heartbeat()  # waiting for room is not silence
            time.sleep(self.poll)
        self.waited_s += time.monotonic() - start
        _metrics.backpressure(time.monotonic() - start)

    def put(
        self, sample_id: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None,
        *, if_absent: bool | None = None,
    ) -> SampleRef:
        """Write one sample and commit it; returns the committed ref.

        With ``if_absent`` (default: the writer's ``resume``) an id already
        committed is not written again: the existing ref is returned.

        Raises:
            TypeError / ConfigError: bad tensors, metadata or sample id (nothing
                written), or a store other than the one the ledger records.
            StoreFull: no room within ``put_timeout``, or (at once) a sample
                larger than the whole byte budget; the message gives both sizes.
            SampleAborted: the id was aborted while its bytes were in flight.
        """
        if self._closed:
            raise RuntimeError(f"FeatureWriter {self.name} is closed")
        validate_sample_id(sample_id)
        incoming = _nbytes(tensors)
        self._refuse_oversize(incoming)
        self._register()
        absent = self.resume if if_absent is None else if_absent
        if absent:
            self._bind()
            committed = self.ledger.committed_refs([sample_id])
            existing = self._kept(committed).get(sample_id)
            if existing is not None:
                self.skipped += 1
                self._heartbeat()
                return existing
            absent = sample_id not in committed  # committed but its bytes lost: rewritten on purpose (supersedes)
        self.wait_for_room(incoming)
        self._bind()
        [gen] = self.ledger.reserve([sample_id])
        self._warn_rewrite(sample_id, gen)
        ref = self.store.put(sample_id, gen, tensors, metadata)
        try:
            # if_absent: another writer may have committed the id since the check above (first commit wins)
            superseded = self.ledger.commit([ref], if_absent=True) if absent else self.ledger.commit([ref])
        except (SampleAborted, ConfigError, TypeError):
            # Certainly not committed: nobody will ever read these bytes.
            self.store.delete(ref)
            raise
        if getattr(superseded, "refused", None):
            self.store.delete(ref)  # refused: certainly not committed, nothing leaks
            self.skipped += 1
            self._heartbeat()
            return superseded.existing.get(sample_id) or self.ledger.committed_refs([sample_id])[sample_id]
        # Any other failure (a connection lost after the server ran the commit,
        # an interrupt) leaves the outcome unknown: keep the bytes, never a
        # committed ref without them.
        if superseded:
            drain_deletes(self.ledger, self.store, superseded)
        self._drop_orphans([ref], superseded)
        self._charge(ref.nbytes, 1)
        self.written += 1
        self.bytes_written += ref.nbytes
        _metrics.put(1, ref.nbytes)
        self._heartbeat()
        return ref

    def put_many(
        self, items: Iterable[tuple[str, Mapping[str, torch.Tensor]] | tuple[str, Mapping[str, torch.Tensor], Any]]
    ) -> list[SampleRef]:
        """``put`` several samples with one reserve and one commit (with ``resume``,
        ids already committed keep their existing refs; refs come back in input order)."""
        batch = [(it[0], it[1], it[2] if len(it) > 2 else None) for it in items]
        if not batch:
            return []
        sizes = [_nbytes(ts) for sid, ts, _ in batch if validate_sample_id(sid)]
        self._refuse_oversize(max(sizes))
        incoming = sum(sizes)
        self._register()
        lost: set[str] = set()
        if self.resume:
            self._bind()
            committed = self.ledger.committed_refs([sid for sid, _, _ in batch])
            existing = self._kept(committed)
            lost = set(committed) - set(existing)  # committed but their bytes lost: rewritten on purpose
            if existing:
                todo = [b for b in batch if b[0] not in existing]
                self.skipped += len(batch) - len(todo)
                new = {r.sample_id: r for r in (self._put_batch(todo, lost=lost) if todo else [])}
                self._heartbeat()
                return [existing.get(sid) or new[sid] for sid, _, _ in batch]
        return self._put_batch(batch, incoming, lost=lost)

    def _put_batch(self, batch: list[tuple[str, Mapping[str, torch.Tensor], Any]],
                   incoming: int | None = None, lost: set[str] | frozenset[str] = frozenset()) -> list[SampleRef]:
        if incoming is None:
            incoming = sum(_nbytes(ts) for _, ts, _ in batch)
        self.wait_for_room(incoming, len(batch))
        self._bind()
        gens = self.ledger.reserve([sid for sid, _, _ in batch])
        if max(gens, default=0) > 1:
            sid, g = next((sid, g) for (sid, _, _), g in zip(batch, gens, strict=True) if g > 1)
            self._warn_rewrite(sid, g)
        refs = self.store.put_many([(sid, g, ts, meta) for (sid, ts, meta), g in zip(batch, gens, strict=True)])
        superseded: list[SampleRef] = []
        refused: list[SampleRef] = []
        theirs: dict[str, SampleRef] = {}
        # with resume: first commit wins (see put), except for the ids rewritten on purpose (lost bytes)
        for part, absent in (([r for r in refs if r.sample_id not in lost], self.resume),
                             ([r for r in refs if r.sample_id in lost], False)):
            if not part:
                continue
            try:
                res = self.ledger.commit(part, if_absent=True) if absent else self.ledger.commit(part)
            except (SampleAborted, ConfigError, TypeError):
                for r in part:  # certainly not committed (see put)
                    self.store.delete(r)
                raise
            superseded += res
            refused += getattr(res, "refused", ())
            theirs.update(getattr(res, "existing", {}))
        out = refs
        if refused:  # keep input order: a refused id gets the ref the ledger has
            for r in refused:
                self.store.delete(r)  # certainly not committed: nothing leaks
            self.skipped += len(refused)
            gone = {r.key for r in refused}
            theirs.update(self.ledger.committed_refs([r.sample_id for r in refused if r.sample_id not in theirs]))
            out = [theirs[r.sample_id] if r.key in gone else r for r in refs]
            refs = [r for r in refs if r.key not in gone]
        if superseded:
            drain_deletes(self.ledger, self.store, superseded)
        self._drop_orphans(refs, superseded)
        self._charge(sum(r.nbytes for r in refs), len(refs))
        self.written += len(refs)
        self.bytes_written += sum(r.nbytes for r in refs)
        _metrics.put(len(refs), sum(r.nbytes for r in refs))
        self._heartbeat()
        return out

    def _warn_rewrite(self, sample_id: str, generation: int) -> bool:
        """Once per writer without ``resume``: say that an id written before is written
        (and so trained) again, which is what a restarted producer without
        ``resume=True`` does by mistake. Returns whether it warned."""
        if generation <= 1 or self.resume or self.__dict__.get("_rewrite_warned"):
            return False
        self._rewrite_warned = True
        log.warning("producer %s: sample %r was written before (this is generation %d), so it is written and "
                    "trained again; a restarted producer should pass resume=True to skip what is committed "
                    "(this warning is logged once per writer)", self.name, sample_id, generation)
        return True

    ORPHAN_SCAN = 8  # generations below a re-put's own that it looks for (a writer's crashes in a row)

    def _drop_orphans(self, refs: Sequence[SampleRef], superseded: Sequence[SampleRef]) -> None:
        """Delete older generations of just-committed ids that were written but never
        committed (a writer killed between its put and its commit): no commit of them
        can succeed after ours, and nothing else would remove them before ``gc``."""
        done = {r.key for r in superseded}
        for ref in refs:
            for gen in range(max(1, ref.generation - self.ORPHAN_SCAN), ref.generation):
                if (ref.sample_id, gen) in done:
                    continue
                try:
                    self.store.delete(SampleRef(ref.sample_id, gen, self.store.uri, (), 0, ""))
                except Exception as e:  # noqa: BLE001 - best effort: gc finds what is left
                    log.debug("could not drop orphan %s@%d: %s", ref.sample_id, gen, e)

    def abort(self, sample_ids: Iterable[str]) -> int:
        """Tombstone sample ids and free their bytes; returns how many were freed."""
        refs = self.ledger.abort(list(sample_ids))
        drain_deletes(self.ledger, self.store, refs)
        return len(refs)

    def close(self) -> None:
        """Mark this producer finished (consumers stop when all producers are) and
        release the connections it opened from URIs (they reopen if used again)."""
        if not self._closed and not self._refused:  # a refused writer never closes the live holder's stream
            self._register()
            self.ledger.producer_done(self.name)
            self._closed = True
            self._warn_segment()
        for backend in self._owned:
            backend.close()

    def _segment_bound(self) -> bool:
        """Whether this writer's bytes live in its own process (a Mooncake segment) and die with it."""
        cfg = getattr(self.store, "cfg", None)  # a Mooncake writer at segment_size=0 puts into a store server
        return self.written > 0 and self.store.uri.split("://", 1)[0].lower() == "mooncake" and \
            getattr(cfg, "segment_size", 1) > 0

    def _unconsumed(self) -> tuple[int, bool]:
        """``(samples pending or leased, a trainer session is live)`` on the ledger now."""
        c = self.ledger.counts()
        session = self.ledger.session()
        return c.pending + c.leased, bool(session and session.get("live"))

    def _warn_segment(self) -> None:
        if not self._segment_bound() or self.__dict__.get("_quiet_close"):
            return
        with contextlib.suppress(Exception):  # a warning must never turn a clean close into an error
            left, live = self._unconsumed()
            if left or live:
                log.warning(
                    "producer %s closed while %d samples are not trained yet%s; their bytes live in this process's "
                    "Mooncake segment of %s and become unreadable (quarantined) when it exits. Keep the producer "
                    "running until they are trained: call wait_consumed() before the process ends", self.name,
                    left, " and a trainer still runs" if live else "", self.store.uri)

    def wait_consumed(self, timeout: float | None = None, poll: float = 1.0) -> bool:
        """Close this writer (online consumers finish once the stream ends), then
        wait until nothing is pending or leased on the ledger and no trainer
        session is live: what a producer whose bytes die with it (a Mooncake
        segment) must do before its process exits. Returns ``False`` on timeout.

        Example:
            >>> import tempfile, torch
            >>> d = tempfile.mkdtemp()
            >>> w = FeatureWriter(f"file://{d}/s", f"sqlite://{d}/l.db")
            >>> w.wait_consumed(timeout=0)     # nothing was put: nothing to wait for
            True
        """
        if not self._closed:
            self._quiet_close = True  # waiting is what the close-time warning asks for
            self.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left, live = self._unconsumed()
            if not left and not live:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll)

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # A producer that dies with an exception does not close the stream:
        # consumers must not mistake a crash for the end of the data.
        if exc_type is None:
            self.close()
