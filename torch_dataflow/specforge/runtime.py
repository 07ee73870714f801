"""SpecForge's DataFlow runtime (``specforge.runtime``) on torch_dataflow's stores and ledgers.

SpecForge 0.2.0 trains from its own runtime: a ``FeatureStore`` (bytes), a
``MetadataStore`` (committed refs and the durable ack marker), a queue of refs,
its ``FeatureDataLoader`` and its ``DPAckController``. :class:`SpecForgeBackend`
gives that runtime one of our stores (``memory://``, ``file://``,
``mooncake://``) and one of our ledgers (``sqlite://``, ``redis://``):

* :attr:`SpecForgeBackend.feature_store` implements SpecForge's ``FeatureStore``
  contract (``put``/``get``/``release``/``abort``/``health``/``gc``);
* :attr:`SpecForgeBackend.metadata_store` implements its ``MetadataStore``
  contract (``commit_sample(s)``, ``is_committed``, ``get_committed``,
  ``committed_count``, ``all_committed_ids``, ``record_train_ack``,
  ``durable_marker``);
* :meth:`SpecForgeBackend.ref_queue` replaces the controller's in-process
  ``SampleRefQueue`` by leases of the shared ledger, so ranks on several hosts
  take disjoint samples without SpecForge's inbox files.

SpecForge's classes run unchanged on them; what the ledger adds is that every
state lives in it (any host sees it), a restarted trainer fences the old one
out (:meth:`SpecForgeBackend.resume`), and a restart may use another DP width.

Deliberate differences, each so that nothing is lost or trained twice: bytes
are freed by the ledger (after a durable ack), never by ``release``; a re-put
of a committed sample id returns the committed ref instead of replacing its
bytes; the durable marker reports only what an optimizer-durable ack covered.

Example:
    >>> import torch
    >>> from specforge.runtime.control_plane import DPAckController
    >>> from specforge.runtime.data_plane.feature_dataloader import FeatureDataLoader
    >>> from torch_dataflow.specforge.runtime import SpecForgeBackend
    >>> be = SpecForgeBackend("memory://sfrt-doc", "memory://sfrt-doc")
    >>> ctl = DPAckController("run", metadata_store=be.metadata_store, feature_store=be.feature_store)
    >>> ctl.sample_queue = be.ref_queue("rank0")
    >>> refs = [be.feature_store.put({"x": torch.ones(2)}, sample_id=f"s{i}", metadata={}) for i in range(4)]
    >>> len(ctl.commit_samples("producer", refs))
    4
    >>> for batch in FeatureDataLoader(be.feature_store, queue=ctl.sample_queue, batch_size=2):
    ...     ctl.ack_train_refs("t0", batch.sample_ids, global_step=1, optimizer_durable=True)
    >>> sorted(be.metadata_store.durable_marker()["acked"])
    ['s0', 's1', 's2', 's3']
    >>> be.store.keys()  # acked durably: the ledger freed the bytes
    []
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

try:
    from specforge.runtime.contracts import FeatureHandle
    from specforge.runtime.contracts import SampleRef as SFSampleRef
    from specforge.runtime.control_plane.metadata_store import MetadataStore  # noqa: F401 - for _runtime_control
    from specforge.runtime.data_plane.feature_store import FeatureStore as SFFeatureStore
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("torch_dataflow.specforge.runtime needs SpecForge's runtime: "
                      "`pip install --no-deps specforge==0.2.0` (it imports only torch)") from e

from ..binding import bind_store
from ..errors import BackendUnavailable, ConfigError, SampleUnavailable
from ..gc import drain_deletes
from ..ledger import Ledger, open_ledger
from ..ledger.base import ReconcileReport, SampleStatus
from ..refs import SampleRef
from ..stores import FeatureStore, open_store
from ._runtime_control import LedgerMetadataStore, LedgerRefQueue
from ._runtime_refs import _SF_FIELDS, SF_KEY, from_specforge_ref, to_specforge_ref
from ._runtime_refs import TD_KEY as TD_KEY  # re-exported: where our bytes are, in a SpecForge ref

__all__ = ["LedgerFeatureStore", "LedgerMetadataStore", "LedgerRefQueue", "SpecForgeBackend",
           "from_specforge_ref", "to_specforge_ref"]

log = logging.getLogger(__name__)

_GONE = (SampleStatus.FREED, SampleStatus.ABORTED)


class SpecForgeBackend:
    """One torch_dataflow store + ledger, seen through SpecForge's runtime contracts.

    Args:
        store: a store or its URI (``file:///shared/feats``, ``mooncake://host:port``...).
        ledger: a ledger or its URI (``sqlite:///run/ledger.db``, ``redis://host:6379/0?namespace=run``).
        name: prefix of the lease owners of this run's queues (``{name}/a{attempt}/{owner}``).
        lease_ttl: seconds a leased ref stays with its rank without a renewal; queues
            renew their leases on every ``get``, so it bounds one batch's step time.
    """

    def __init__(self, store: str | FeatureStore, ledger: str | Ledger, *, name: str = "specforge",
                 lease_ttl: float = 300.0) -> None:
        if lease_ttl <= 0:
            raise ConfigError(f"lease_ttl must be > 0 seconds, got {lease_ttl!r}")
        self.store = open_store(store)
        self.ledger = open_ledger(ledger)
        self.name = name
        self.lease_ttl = float(lease_ttl)
        self.fence: int | None = None
        self.feature_store = LedgerFeatureStore(self)
        self.metadata_store = LedgerMetadataStore(self)

    def ref_queue(self, owner: str = "rank0", *, rank: int | None = None, world: int | None = None,
                  wait_for_stream: bool = False, stream_timeout_s: float = 600.0) -> LedgerRefQueue:
        """A ``SampleRefQueue`` stand-in that leases from the ledger for one rank:
        assign it to ``DataFlowController.sample_queue`` (one line).

        With ``rank`` and ``world`` the ranks follow one ledger plan: global step ``k``
        gives every rank one full batch, so all ranks see the same number of
        batches (SpecForge's DP ack is a collective and would hang otherwise), at
        any ``world``, also after a restart with another one."""
        return LedgerRefQueue(self, owner, rank=rank, world=world, wait_for_stream=wait_for_stream,
                              stream_timeout_s=stream_timeout_s)

    def resume(self, resume_step: int | None = None, *, takeover: bool = False) -> ReconcileReport:
        """Before ``DataFlowController.reconcile_on_restart``: hand the dead trainer's
        leases back and fence it out (one call, on the authority rank).

        ``resume_step`` (default: the last optimizer-durable step) is the step of the
        checkpoint being resumed; acks after it are replayed.

        Raises:
            SessionConflict: another live trainer holds the ledger and not ``takeover``.
            CheckpointTooOld: ``resume_step`` is older than bytes the ledger already freed.
        """
        if resume_step is None:
            marks = self.ledger.checkpoints()
            resume_step = marks[-1] if marks else None
        report = self.ledger.reconcile(resume_step, session={"name": self.name}, takeover=takeover)
        self.fence = report.attempt
        if report.freed:
            drain_deletes(self.ledger, self.store, report.freed)
        return report

    def join(self) -> int:
        """On a non-authority rank after :meth:`resume` ran elsewhere: take its fence."""
        self.fence = self.ledger.join_session()
        return self.fence

    def _drain(self, refs: Sequence[SampleRef]) -> tuple[int, int]:
        return drain_deletes(self.ledger, self.store, refs) if refs else (0, 0)

    def __repr__(self) -> str:
        return f"SpecForgeBackend({self.store.uri!r}, {self.ledger.uri!r})"


class LedgerFeatureStore(SFFeatureStore):
    """SpecForge's ``FeatureStore`` over a torch_dataflow store; lifetime decided by the ledger.

    ``put`` reserves a generation in the ledger and writes the bytes (the commit is
    the metadata store's); ``release`` frees nothing (``retain_on_release`` is
    ``True``: a crash before the durable ack still finds the bytes); ``abort``
    tombstones the sample in the ledger and deletes its bytes.
    """

    retain_on_release = True

    def __init__(self, backend: SpecForgeBackend) -> None:
        self._be = backend
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._handles: dict[str, FeatureHandle] = {}
        self._uncommitted: dict[str, SampleRef] = {}
        self._bound = False

    # ----------------------------------------------------------------- write
    def put(self, tensors: dict[str, torch.Tensor], *, sample_id: str, metadata: dict[str, Any]) -> SFSampleRef:
        be = self._be
        if not tensors:
            raise ConfigError(f"put of sample {sample_id!r} has no tensors: give at least one")
        existing = be.ledger.committed_refs([sample_id]).get(sample_id)
        if existing is not None:  # a producer retry: the committed bytes stay the sample's
            return to_specforge_ref(existing)
        if not self._bound:
            bind_store(be.store, be.ledger)
            self._bound = True
        meta = dict(metadata or {})
        sf: dict[str, Any] = {k: meta[k] for k in _SF_FIELDS if k in meta}
        sf["metadata"] = {k: v for k, v in meta.items() if k != "num_tokens"}
        target = meta.get("target_feature_name", "target")
        if meta.get("target_repr") and target in tensors:  # as SpecForge stamps its target spec
            vmv = meta.get("vocab_map_version")
            sf["spec_extra"] = {target: {"target_repr": meta["target_repr"],
                                         "target_meta": {"vocab_map_version": vmv} if vmv else {}}}
        [gen] = be.ledger.reserve([sample_id])
        ref = be.store.put(sample_id, gen, tensors, {SF_KEY: sf})
        with self._lock:
            self._uncommitted[sample_id] = ref
        return to_specforge_ref(ref)

    def _committed(self, sample_ids: Sequence[str]) -> None:
        with self._lock:
            for sid in sample_ids:
                self._uncommitted.pop(sid, None)

    # ------------------------------------------------------------------ read
    def get(self, sample_ref: SFSampleRef, *, device: torch.device | str = "cpu",
            names: list[str] | None = None) -> tuple[dict[str, torch.Tensor], FeatureHandle]:
        ref = from_specforge_ref(sample_ref)
        tensors = self._be.store.get(ref)
        wanted = names or list(sample_ref.feature_keys)
        missing = [n for n in wanted if n not in tensors]
        if missing:
            raise SampleUnavailable(f"sample {ref.sample_id!r} generation {ref.generation} has no features "
                                    f"{missing} (it has {sorted(tensors)})")
        out = {n: tensors[n] for n in wanted}
        if str(device) != "cpu":
            out = {k: v.to(device) for k, v in out.items()}
        handle = FeatureHandle(sample_id=ref.sample_id, generation=ref.generation,
                               lease_token=f"{ref.sample_id}:{ref.generation}:{next(self._tokens)}")
        with self._lock:
            self._handles[handle.lease_token] = handle
        return out, handle

    # -------------------------------------------------------------- lifetime
    def release(self, handle: FeatureHandle, *, reason: str = "consumed") -> None:
        with self._lock:
            self._handles.pop(handle.lease_token, None)

    def abort(self, sample_id: str, *, reason: str = "aborted") -> None:
        be = self._be
        status = be.ledger.sample_statuses([sample_id]).get(sample_id)
        if status in _GONE:  # freed by a durable ack (or aborted before): finish its queued delete
            ref = be.ledger.get_ref(sample_id)
            be._drain([ref] if ref is not None else [])
        elif status is not None:
            be._drain(be.ledger.abort([sample_id]))
        with self._lock:
            local = self._uncommitted.pop(sample_id, None)
        if local is not None and status in (None, SampleStatus.RESERVED):
            be.store.delete(local)  # written, never committed: only this process knows it
        log.debug("aborted sample %s (%s)", sample_id, reason)

    def drain_sample_removals(self, sample_ids: list[str], **_: Any) -> dict[str, int]:
        """Finish the queued deletes of these ids (SpecForge calls it after a durable ack)."""
        be = self._be
        statuses = be.ledger.sample_statuses(sample_ids)
        refs = [r for r in (be.ledger.get_ref(s) for s, st in statuses.items() if st in _GONE) if r is not None]
        done, left = be._drain(refs)
        return {"removed": done, "removed_bytes": sum(r.nbytes for r in refs) if not left else 0,
                "release_pending": left}

    def gc(self, *, now: float | None = None) -> dict[str, int]:
        be = self._be
        freed = freed_bytes = left = 0
        for ref in be.ledger.pending_deletes():
            done, stay = be._drain([ref])
            freed, freed_bytes, left = freed + done, freed_bytes + (ref.nbytes if done else 0), left + stay
        return {"force_freed": freed, "force_freed_bytes": freed_bytes, "release_pending": left}

    def drain_pending_removals(self, *, max_attempts: int = 40, retry_interval_s: float = 0.5,
                               sleep: Any = time.sleep) -> dict[str, int]:
        """Retry the ledger's delete queue until it is empty (SpecForge's shutdown hook).

        Raises:
            BackendUnavailable: deletes still queued after ``max_attempts``.
        """
        removed = removed_bytes = 0
        for attempt in range(max(1, max_attempts)):
            r = self.gc()
            removed, removed_bytes = removed + r["force_freed"], removed_bytes + r["force_freed_bytes"]
            if not r["release_pending"]:
                return {"removed": removed, "removed_bytes": removed_bytes, "release_pending": 0}
            if attempt + 1 < max_attempts:
                sleep(retry_interval_s)
        raise BackendUnavailable(f"{r['release_pending']} deletes still queued in ledger {self._be.ledger.uri} "
                                 f"for store {self._be.store.uri} after {max_attempts} attempts: check the store, "
                                 "then run `torch-dataflow gc STORE LEDGER`")

    def health(self) -> dict[str, Any]:
        be = self._be
        h = be.store.health()
        with self._lock:
            handles = len(self._handles)
        return {"store_id": be.store.uri, "backend": "torch_dataflow", "ledger": be.ledger.uri,
                "resident_samples": h.count, "resident_bytes": h.resident_bytes, "active_leases": handles,
                "max_resident_bytes": getattr(be.store, "max_bytes", None),
                "release_pending": len(be.ledger.pending_deletes())}
