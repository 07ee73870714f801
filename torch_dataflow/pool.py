"""The map-style face of a committed feature pool: :class:`FeaturePool`.

A pool gives every committed sample an index (``0 .. len(pool) - 1``) so a
``torch.utils.data.Sampler`` can hand out indices the way training scripts
expect. Reading an index is a pure byte read from the store: DataLoader
workers never lease, ack or plan. Leases are taken in the main process by
:class:`~torch_dataflow.sampler.ReshardingSampler`, which yields
:class:`PoolIndex` values (``int`` subclasses carrying the lease id and the
committed ref); ``pool[index]`` then returns the sample's tensors plus
``"__lease__"`` and ``"__sample_id__"``, exactly as
:class:`~torch_dataflow.FeatureStoreDataset` does, so every acking path
(Lightning, Fabric, plain loops) works unchanged.

Example:
    >>> import tempfile, torch
    >>> from torch_dataflow import FeatureWriter
    >>> d = tempfile.mkdtemp()
    >>> store, ledger = f"file://{d}/features", f"sqlite://{d}/ledger.db"
    >>> with FeatureWriter(store, ledger) as w:
    ...     for i in range(3):
    ...         _ = w.put(f"s{i}", {"x": torch.full((2,), i)})
    >>> pool = FeaturePool(store, ledger)
    >>> len(pool), pool.sample_id(2), pool[2]["x"].tolist()
    (3, 's2', [2, 2])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from .binding import check_store, consumer_store, existing_ledger
from .dataset import LEASE_KEY, SAMPLE_ID_KEY, ack_batch, lease_ids_of
from .errors import ConfigError, CorruptSample, LeaseLost, SampleUnavailable
from .fields import check_fields_arg, selected_specs
from .ledger import Ledger, ReconcileReport, open_ledger
from .ledger.base import parse_lease_id
from .refs import Lease, SampleRef, validate_sample_id
from .session import SessionMember
from .stores import FeatureStore, open_store

__all__ = ["FeaturePool", "PoolIndex"]

log = logging.getLogger(__name__)


class PoolIndex(int):
    """A pool index that carries the lease it was handed out under.

    It *is* an ``int`` (code that does arithmetic on sampler output keeps
    working) and pickles small: the index, the lease id and the committed
    ref as JSON, so a DataLoader worker can read the bytes without asking
    the ledger anything. ``lease_id`` is ``""`` for a padded slot that no
    lease backs (see :class:`~torch_dataflow.sampler.ReshardingSampler`).

    Example:
        >>> i = PoolIndex(3, "0:1:ab:s3", "{}")
        >>> i + 1, i.lease_id
        (4, '0:1:ab:s3')
    """

    lease_id: str
    ref_json: str

    def __new__(cls, index: int, lease_id: str, ref_json: str) -> PoolIndex:
        obj = super().__new__(cls, index)
        obj.lease_id = lease_id
        obj.ref_json = ref_json
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (PoolIndex, (int(self), self.lease_id, self.ref_json))

    def __repr__(self) -> str:
        return f"PoolIndex({int(self)}, lease_id={self.lease_id!r})"


def _require_imported(root: Any, ids: Sequence[str], store: FeatureStore, ledger: Ledger) -> None:
    """Refuse a copied pool whose files were never imported (it would list them and deliver nothing)."""
    from .ledger.base import SampleStatus

    statuses = ledger.sample_statuses(ids)
    missing = [sid for sid in ids if statuses.get(sid, SampleStatus.RESERVED) == SampleStatus.RESERVED]
    if missing:
        raise ConfigError(
            f"{len(missing)} of {len(ids)} files of {root} are not committed to {ledger.uri} "
            f"(first: {missing[0]!r}): import the directory first, "
            f"import_directory({str(root)!r}, {store.uri!r}, {ledger.uri!r}), or read it in place "
            "with FeaturePool.from_specforge(directory, ledger=...)"
        )


MAX_SLOTS = 64  # each slot reserves 4 GiB of address space (memory only where batches land)


class FeaturePool(SessionMember, Dataset):
    """Committed samples of a store + ledger as a map-style dataset.

    **Index space.** ``sample_ids`` fixes it (index ``i`` is ``sample_ids[i]``);
    give it in the order your legacy dataset used, or in commit order, so a
    non-shuffled :class:`~torch_dataflow.sampler.ReshardingSampler` hands out
    the same index partition as ``DistributedSampler`` (the ledger's
    unshuffled order is commit order). Without it, the pool lists the store
    and keeps every id whose latest stored generation is the ledger's
    committed one, sorted by id (one ledger query per id: pass ``sample_ids``
    for pools of millions). Use :meth:`from_specforge` for a SpecForge
    directory, in place or imported (its file order).

    **Reading.** ``pool[k]`` accepts a :class:`PoolIndex` (from the sampler:
    the sample plus its ``"__lease__"``), a plain ``int`` (no lease: reading
    only, nothing to ack) or a lease id string. A corrupt or vanished sample
    that was leased is quarantined in the ledger (never delivered again) and
    the error is raised: a map-style face cannot swap in another sample
    inside a worker without changing the batch.

    Args:
        store: store URI or instance. ledger: ledger URI or instance.
        sample_ids: the index space (see above).
        zero_copy: return views into store memory instead of owned tensors.
        fields: read only these tensors of each sample (their byte ranges and the
            header, on the per-sample and the batch-direct path; see
            :mod:`torch_dataflow.fields`); ``None`` reads all.
        worker_slots: reusable shared-memory batch slots for DataLoader workers on the
            batch-direct path (created here, before workers start; sparse: memory only
            where batches land; see :mod:`torch_dataflow._shm_slots`); ``0``: every
            worker batch in fresh shared memory; at most 64.

    Raises:
        ConfigError: a sample id appears twice, or is invalid; a name in ``fields``
            the first sample does not hold (the message lists the ones it holds);
            no ledger at a ``sqlite://`` path or Redis namespace (a typo: never created).
    """

    def __init__(
        self,
        store: str | FeatureStore,
        ledger: str | Ledger,
        *,
        sample_ids: Sequence[str] | None = None,
        zero_copy: bool = False,
        fields: Sequence[str] | None = None,
        worker_slots: int = 8,
    ) -> None:
        self.store = consumer_store(store)  # a file:// directory is never created by a consumer
        if isinstance(ledger, str) and ledger.split("://", 1)[0].lower() in ("sqlite", "redis", "rediss"):
            # The pool indexes what is committed now: a ledger that does not exist is a typo, never created
            self.ledger = existing_ledger(ledger, who="a FeaturePool (it indexes committed samples)")
        else:
            self.ledger = open_ledger(ledger)
        self.zero_copy = bool(zero_copy)
        self.fields = check_fields_arg(fields)
        if isinstance(worker_slots, bool) or not isinstance(worker_slots, int) or not 0 <= worker_slots <= MAX_SLOTS:
            raise ConfigError(f"worker_slots must be an int from 0 (slots off) to {MAX_SLOTS} (batches in flight "
                              f"and kept at once; past them a batch takes fresh memory), got {worker_slots!r}")
        from ._shm_slots import SlotRing

        self._slots = SlotRing.create(slots=worker_slots) if worker_slots else None
        self._store_checked = 0
        self._verify_store()  # before the sampler leases anything
        ids = list(sample_ids) if sample_ids is not None else self._discover()
        for sid in ids:
            validate_sample_id(sid)
        self._ids = ids
        self._index = {sid: i for i, sid in enumerate(ids)}
        if len(self._index) != len(ids):
            raise ConfigError("sample_ids holds the same id twice: a pool index must name one sample")
        first = self.ledger.get_ref(ids[0]) if self.fields is not None and ids else None
        if first is not None:  # a wrong name fails here, before the sampler leases anything
            selected_specs(first, self.fields)

    @classmethod
    def from_specforge(
        cls,
        directory: Any,
        store: str | FeatureStore | None = None,
        ledger: str | Ledger | None = None,
        *,
        copy: bool | None = None,
        zero_copy: bool = False,
        progress: bool = False,
        fields: Sequence[str] | None = None,
    ) -> FeaturePool:
        """A pool over a SpecForge offline directory, indexed in the directory's
        own (SpecForge's) file order.

        In place (``copy=False``; the default when ``store`` is ``None`` or a
        ``specforge://`` store): the files are registered in ``ledger`` with
        :func:`~torch_dataflow.specforge.register_directory`
        (idempotent, safe on every rank) and read where they are. Copied
        (``copy=True``; the default for any other ``store``): the directory was
        imported into ``store`` with :func:`~torch_dataflow.eagle3.import_directory`.

        Args:
            directory: the directory or an open ``SpecForgeDirectory``.
            store: ``None`` / ``specforge:///dir`` (in place), or where it was imported.
            ledger: the ledger URI or instance (required).
            copy: force one of the two modes (see above).
            zero_copy, fields: see :class:`FeaturePool`.
            progress: a progress bar while registering in place.

        Raises:
            ConfigError: no ledger, ``copy=True`` without a store, or an in-place
                store that is not this directory.

        Example:
            >>> pool = FeaturePool.from_specforge("/data/hs", ledger="sqlite:///data/l.db")  # doctest: +SKIP
            >>> from torch_dataflow.eagle3 import import_directory
            >>> import_directory("/data/hs", "file:///data/feat", "sqlite:///data/l2.db")  # doctest: +SKIP
            >>> pool = FeaturePool.from_specforge("/data/hs", "file:///data/feat", "sqlite:///data/l2.db")  # doctest: +SKIP
        """
        from .specforge.directory import SpecForgeDirectory
        from .specforge.store import SpecForgeDirStore, register_directory

        if ledger is None:
            raise ConfigError("from_specforge needs a ledger (e.g. ledger='sqlite:///data/ledger.db')")
        ds = directory if isinstance(directory, SpecForgeDirectory) else SpecForgeDirectory(directory)
        opened = None if store is None else open_store(store)
        if copy is None:
            copy = opened is not None and not isinstance(opened, SpecForgeDirStore)
        if not copy:
            in_place = SpecForgeDirStore(os.path.abspath(ds.root))
            if opened is not None and opened.uri != in_place.uri:
                raise ConfigError(f"copy=False reads {ds.root} in place: store must be None or {in_place.uri}")
            ledger = open_ledger(ledger)
            register_directory(ds, ledger, progress=progress)
            opened = in_place
        elif opened is None:
            raise ConfigError("copy=True needs the store the directory was imported into")
        ids = [ds.sample_id(i) for i in range(len(ds))]
        if copy:
            ledger = open_ledger(ledger)
            _require_imported(ds.root, ids, opened, ledger)
        return cls(opened, ledger, sample_ids=ids, zero_copy=zero_copy, fields=fields)

    def _discover(self) -> list[str]:
        latest: dict[str, int] = {}
        for sid, gen in self.store.keys():  # noqa: SIM118 - a store, not a dict
            latest[sid] = max(gen, latest.get(sid, 0))
        ids = []
        for sid in sorted(latest):
            ref = self.ledger.get_ref(sid)
            if ref is not None and ref.generation == latest[sid]:
                ids.append(sid)  # committed; uncommitted or orphaned bytes are not samples
        return ids

    # ------------------------------------------------------------ index space
    def __len__(self) -> int:
        """Number of committed samples in the pool (the map-style index space)."""
        return len(self._ids)

    @property
    def sample_ids(self) -> list[str]:
        """The index space: ``sample_ids[i]`` is index ``i`` (a copy)."""
        return list(self._ids)

    def sample_id(self, index: int) -> str:
        """The sample id at ``index``."""
        return self._ids[int(index)]

    def index_of(self, sample_id: str) -> int:
        """The index of ``sample_id``.

        Raises:
            KeyError: the id is not in this pool (committed after it was built?).
        """
        try:
            return self._index[sample_id]
        except KeyError:
            raise KeyError(
                f"sample {sample_id!r} is not in this pool of {len(self)} samples "
                "(committed after the pool was built? build a new FeaturePool)"
            ) from None

    def leased_index(self, lease: Lease) -> PoolIndex:
        """The :class:`PoolIndex` that carries ``lease`` (used by the sampler). A sample
        committed after the pool was built (a producer still running) is appended to the
        index: it is delivered like the others, never left leased by a failed lookup."""
        index = self._index.get(lease.sample_id)
        if index is None:
            index = self._ids_grown(lease.sample_id)
        return PoolIndex(index, lease.lease_id, lease.ref.to_json())

    def _ids_grown(self, sample_id: str) -> int:
        validate_sample_id(sample_id)
        if not self.__dict__.get("_grew"):
            self._grew = True
            log.info("%s: samples committed after the pool was built are appended to its index (first: %r)",
                     self, sample_id)
        self._index[sample_id] = len(self._ids)
        self._ids.append(sample_id)
        return self._index[sample_id]

    def padding_index(self, index: int) -> PoolIndex:
        """A :class:`PoolIndex` for ``index`` that no lease backs (a padded slot)."""
        ref = self.ledger.get_ref(self.sample_id(index))
        if ref is None:
            raise SampleUnavailable(f"sample {self.sample_id(index)!r} has no committed ref")
        return PoolIndex(index, "", ref.to_json())

    # ------------------------------------------------------------ reading
    def __getitem__(self, key: int | str) -> dict[str, Any]:
        """Read one sample: its tensors, ``"__sample_id__"`` and, when it was
        leased, ``"__lease__"``.

        Raises:
            IndexError: an int outside the pool.
            LeaseLost: a string that is not a lease id.
            SampleUnavailable: the bytes are gone (freed, aborted, superseded).
            CorruptSample: the bytes fail their checksum (the lease is quarantined).
        """
        ref, lease_id = self._resolve(key)
        self._verify_store()  # once per DataLoader worker
        try:
            tensors = self._read(ref)
        except (CorruptSample, SampleUnavailable) as e:
            self._unreadable(ref, lease_id, e)
            raise
        sample: dict[str, Any] = dict(tensors)
        if lease_id is not None:
            sample[LEASE_KEY] = lease_id
        sample[SAMPLE_ID_KEY] = ref.sample_id
        return sample

    def __getitems__(self, keys: Sequence[Any]) -> Any:
        """The samples of one DataLoader batch as a :class:`~torch_dataflow.batch_read.LazyBatch`:
        a plain ``collate_fn`` reads it as the list of ``pool[k]``; a collator that declares
        its layout (``Eagle3Collator``) reads the whole batch straight into its rows."""
        from .batch_read import LazyBatch

        return LazyBatch(self, keys)

    def _worker_buffers(self) -> Any:
        """In a DataLoader worker: the batch buffers over this pool's shared slots (``None``: fresh memory)."""
        ring = self.__dict__.get("_slots")
        if ring is None or torch.utils.data.get_worker_info() is None:
            return None
        from ._shm_slots import SlotBuffers

        return SlotBuffers(ring)

    def _unreadable(self, ref: SampleRef, lease_id: str | None, e: Exception) -> None:
        if lease_id:
            # Invariant 7: never train on it, never deliver it again; report it.
            self.ledger.fail([lease_id], retryable=False, reason=f"unreadable in worker {os.getpid()}: {e}")
            log.error("quarantined %s: %s", ref.sample_id, e)

    def _resolve(self, key: Any) -> tuple[SampleRef, str | None]:
        """The committed ref and lease id (``None``: not leased) a pool key names."""
        if isinstance(key, PoolIndex):
            ref, lease_id = SampleRef.from_json(key.ref_json), key.lease_id
        elif isinstance(key, str):
            _epoch, gen, _nonce, sid = parse_lease_id(key)
            ref = self._ref(sid)
            if ref.generation != gen:
                raise LeaseLost(f"lease {key!r} is for generation {gen}; generation {ref.generation} is committed")
            lease_id = key
        elif isinstance(key, (int, torch.Tensor)) and not isinstance(key, bool):
            index = int(key)
            if not -len(self) <= index < len(self):
                raise IndexError(f"index {index} is outside a pool of {len(self)} samples")
            ref, lease_id = self._ref(self._ids[index]), None
        else:
            raise TypeError(f"a pool index is an int, a PoolIndex or a lease id, got {type(key).__name__}")
        return ref, lease_id

    def _verify_store(self) -> None:
        """The store is the one the ledger's samples were committed to (once per process)."""
        if self._store_checked != os.getpid() and check_store(self.store, self.ledger):
            self._store_checked = os.getpid()

    def _ref(self, sample_id: str) -> SampleRef:
        ref = self.ledger.get_ref(sample_id)
        if ref is None:
            raise SampleUnavailable(f"sample {sample_id!r} is not committed to {self.ledger.uri}")
        return ref

    def _read(self, ref: SampleRef) -> dict[str, torch.Tensor]:
        """The bytes of ``ref`` as tensors (subclasses may read elsewhere)."""
        if self.fields is None:
            return self.store.get(ref, zero_copy=self.zero_copy)
        return self.store.get_fields(ref, self.fields, zero_copy=self.zero_copy)

    # ------------------------------------------------------------ acks
    def ack(self, batch: Any, step: int, *, strict: bool = False) -> list[str]:
        """Mark the samples of ``batch`` trained at optimizer step ``step``
        (for hand-written loops; the Lightning / Fabric callbacks do the same
        from the batch's ``"__lease__"`` list). Padded slots (``""``) are
        skipped; acking a padded repeat of a leased sample twice is a no-op.

        Returns:
            The lease ids that were lost (expired and taken elsewhere, aborted).

        Raises:
            LeaseLost: with ``strict``, if any was lost.
        """
        return ack_batch(self.ledger, batch, step, strict=strict,
                         on_lost=lambda lost: self._check_fence(lost, f"ack of step {step}"))

    def fail(self, batch: Any, *, retryable: bool = True, reason: str = "") -> list[str]:
        """Give the samples of ``batch`` (a batch, or lease ids) back to PENDING (``retryable``)
        or quarantine them; padded slots are skipped. Returns the lease ids already lost."""
        return self.ledger.fail(lease_ids_of(batch), retryable=retryable, reason=reason)

    def renew(self, batch: Any, ttl: float | None = None) -> list[str]:
        """Extend the leases of ``batch`` by ``ttl`` seconds (default: the longest
        ``lease_ttl`` of this pool's samplers); returns the ids already lost."""
        if ttl is None:
            from .sampler import samplers_of

            ttl = max((s.lease_ttl for s in samplers_of(self)), default=300.0)
        return self.ledger.renew(lease_ids_of(batch), ttl)

    def mark_durable(self, step: int, *, final: bool = False) -> None:
        """A checkpoint covering ``step`` is written: trained deliveries become
        DURABLE. Bytes are kept: an offline pool is read again next epoch
        (``final`` is accepted for symmetry with the dataset and changes nothing)."""
        del final
        self._record_mode()
        self.ledger.mark_durable(step, free=False, fence=self._fence)

    def _record_mode(self) -> None:
        if not self.__dict__.get("_mode_recorded"):
            from .finish import record_mode

            record_mode(self.ledger, "offline")  # a pool is read again every epoch: its bytes stay
            self._mode_recorded = True

    def reconcile(self, resume_step: int | None, *, session: Mapping[str, Any] | None = None,
                  takeover: bool = False, strict: bool = True) -> ReconcileReport:
        """Restart rule, run by one process before any rank starts (see
        :meth:`~torch_dataflow.ledger.base.Ledger.reconcile`); keeps the bytes.
        ``session`` opens the ledger's trainer session (see :mod:`torch_dataflow.session`)."""
        self._record_mode()
        report = self.ledger.reconcile(resume_step, free=False, strict=strict,
                                       session=None if session is None else dict(session), takeover=takeover,
                                       session_ttl=self.session_ttl)
        if session is not None:
            self._adopt(report.attempt)
        return report

    def __repr__(self) -> str:
        return f"FeaturePool({self.store.uri!r}, {self.ledger.uri!r}, n={len(self)})"
