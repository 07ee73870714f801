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
from collections.abc import Mapping, Sequence
from typing import Any

import torch

try:
    from specforge.runtime.contracts import SCHEMA_VERSION, FeatureHandle
    from specforge.runtime.contracts import FeatureSpec as SFFeatureSpec
    from specforge.runtime.contracts import SampleRef as SFSampleRef
    from specforge.runtime.control_plane.metadata_store import MetadataStore
    from specforge.runtime.data_plane.feature_store import FeatureStore as SFFeatureStore
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("torch_dataflow.specforge.runtime needs SpecForge's runtime: "
                      "`pip install --no-deps specforge==0.2.0` (it imports only torch)") from e

from ..binding import bind_store, check_store
from ..errors import BackendUnavailable, ConfigError, Fenced, LeaseLost, ProducerSilent, SampleUnavailable
from ..gc import drain_deletes
from ..ledger import Ledger, open_ledger
from ..ledger.base import Plan, ReconcileReport, SampleStatus
from ..refs import FeatureSpec, Lease, SampleRef
from ..stores import FeatureStore, open_store

__all__ = ["LedgerFeatureStore", "LedgerMetadataStore", "LedgerRefQueue", "SpecForgeBackend",
           "from_specforge_ref", "to_specforge_ref"]

log = logging.getLogger(__name__)

TD_KEY = "torch_dataflow"  # in a SpecForge ref's metadata: where our bytes are
SF_KEY = "specforge"  # in our ref's metadata: the SpecForge ref's own fields
_SF_FIELDS = ("run_id", "source_task_id", "strategy", "schema_version", "target_model_version",
              "draft_weight_version", "tokenizer_version", "num_tokens")
_GONE = (SampleStatus.FREED, SampleStatus.ABORTED)


def to_specforge_ref(ref: SampleRef) -> SFSampleRef:
    """The SpecForge ``SampleRef`` of one of our refs (written by :class:`LedgerFeatureStore`).

    Example:
        >>> from torch_dataflow.refs import FeatureSpec, SampleRef
        >>> ref = SampleRef("s1", 1, "memory://", (FeatureSpec("x", "int64", (3,), 24),), 24, "ab",
        ...                 {"specforge": {"run_id": "r", "num_tokens": 3}})
        >>> sf = to_specforge_ref(ref)
        >>> (sf.run_id, sf.num_tokens, sf.feature_specs["x"].shape, from_specforge_ref(sf).key)
        ('r', 3, (3,), ('s1', 1))
        >>> to_specforge_ref(from_specforge_ref(sf)) == sf
        True
    """
    sf = dict(ref.to_dict()["metadata"].get(SF_KEY) or {})
    meta = dict(sf.get("metadata") or {})
    extra = sf.get("spec_extra") or {}
    meta[TD_KEY] = {"generation": ref.generation, "store": ref.store, "checksum": ref.checksum,
                    "nbytes": ref.nbytes, "specs": [s.to_dict() for s in ref.specs]}
    return SFSampleRef(
        sample_id=ref.sample_id, run_id=str(sf.get("run_id", "unknown")), source_task_id=sf.get("source_task_id"),
        feature_store_uri=ref.store, feature_keys={s.name: f"{ref.sample_id}/{s.name}" for s in ref.specs},
        feature_specs={s.name: SFFeatureSpec(name=s.name, shape=s.shape, dtype=s.dtype, **extra.get(s.name, {}))
                       for s in ref.specs},
        strategy=sf.get("strategy", "eagle3"), schema_version=int(sf.get("schema_version", SCHEMA_VERSION)),
        target_model_version=str(sf.get("target_model_version", "unknown")),
        draft_weight_version=sf.get("draft_weight_version"),
        tokenizer_version=str(sf.get("tokenizer_version", "unknown")), num_tokens=int(sf.get("num_tokens", 0)),
        estimated_bytes=ref.nbytes, metadata=meta)


def from_specforge_ref(ref: SFSampleRef) -> SampleRef:
    """Our ``SampleRef`` behind a SpecForge ref made by :func:`to_specforge_ref`.

    Raises:
        ConfigError: the ref was not put through a torch_dataflow adapter.
    """
    td = ref.metadata.get(TD_KEY) if isinstance(ref.metadata, Mapping) else None
    if not isinstance(td, Mapping):
        raise ConfigError(f"SpecForge ref {ref.sample_id!r} ({ref.feature_store_uri}) was not written through "
                          f"torch_dataflow (its metadata has no {TD_KEY!r} entry): put its features with "
                          "SpecForgeBackend.feature_store.put, not with another SpecForge FeatureStore")
    sf: dict[str, Any] = {k: getattr(ref, k) for k in _SF_FIELDS}
    sf["metadata"] = {k: v for k, v in ref.metadata.items() if k != TD_KEY}
    extra = {n: {"target_repr": s.target_repr, "target_meta": dict(s.target_meta)}
             for n, s in ref.feature_specs.items() if s.target_repr}
    if extra:
        sf["spec_extra"] = extra
    return SampleRef(sample_id=ref.sample_id, generation=td["generation"], store=td["store"],
                     specs=tuple(FeatureSpec.from_dict(s) for s in td["specs"]), nbytes=td["nbytes"],
                     checksum=td["checksum"], metadata={SF_KEY: sf})


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


class LedgerMetadataStore(MetadataStore):
    """SpecForge's ``MetadataStore`` over a torch_dataflow ledger.

    Commits are the ledger's (idempotent on sample id); ``record_train_ack`` acks
    the ledger leases of the given ids at ``global_step`` and, with
    ``optimizer_durable``, marks them durable (the ledger then frees their bytes).
    """

    def __init__(self, backend: SpecForgeBackend) -> None:
        self._be = backend

    def commit_sample(self, ref: SFSampleRef) -> bool:
        return self.commit_samples([ref])[0]

    def commit_samples(self, refs: Sequence[SFSampleRef]) -> list[bool]:
        be = self._be
        ours = [from_specforge_ref(r) for r in refs]
        existing = be.ledger.committed_refs([r.sample_id for r in ours]) if ours else {}
        fresh, todo, seen = [], [], set(existing)
        for r in ours:
            fresh.append(r.sample_id not in seen)
            if fresh[-1]:
                seen.add(r.sample_id)
                todo.append(r)
        if todo:
            be._drain(be.ledger.commit(todo))  # superseded generations, if any
        be.feature_store._committed([r.sample_id for r in todo])
        return fresh

    def is_committed(self, sample_id: str) -> bool:
        return sample_id in self._be.ledger.committed_refs([sample_id])

    def get_committed(self, sample_id: str) -> SFSampleRef | None:
        ref = self._be.ledger.committed_refs([sample_id]).get(sample_id)
        return to_specforge_ref(ref) if ref is not None else None

    def committed_count(self) -> int:
        return self._be.ledger.counts().committed

    def all_committed_ids(self) -> list[str]:
        """Every deliverable or trained id of the stream: trained (by step), leased, pending (in order)."""
        led = self._be.ledger
        trained = sorted(led.trained_steps(0).items(), key=lambda kv: kv[1])
        ids = [sid for sid, _ in trained] + [lease.sample_id for lease in led.leases() if lease.epoch == 0]
        ids += [r.sample_id for r in led.pending_refs(0)]
        return list(dict.fromkeys(ids))

    def record_train_ack(self, sample_ids: list[str], *, global_step: int | None, optimizer_durable: bool) -> None:
        be = self._be
        led = be.ledger
        ids = list(dict.fromkeys(sample_ids))
        step = global_step if global_step is not None else max(led.checkpoints() or [0])
        att = be.fence if be.fence is not None else led.attempt()
        if be.fence is not None and led.attempt() != be.fence:
            raise Fenced(f"trainer fence {be.fence} of {led.uri} is stale (attempt {led.attempt()}): another trainer "
                         "resumed the run and took it over; this one must stop")
        mine = (f"{be.name}/a{att}/", f"a{att}/")  # queue owners and plan owners of this trainer's attempt
        held = {lease.sample_id: lease for lease in led.leases()  # any rank's: the authority acks the DP union
                if lease.epoch == 0 and lease.owner.startswith(mine)}
        lease_ids = [held[s].lease_id for s in ids if s in held]
        unheld = [s for s in ids if s not in held]
        if unheld:
            trained = led.trained_steps(0)
            unheld = [s for s in unheld if s not in trained]  # acked before: idempotent
        lost = led.ack(lease_ids, step) if lease_ids else []
        if unheld or lost:
            bad = unheld + [lid.split(":", 3)[-1] for lid in lost]
            raise LeaseLost(f"cannot ack {len(bad)} samples at step {step} in {led.uri} ({bad[:5]}...): they are not "
                            f"leased to a trainer any more (lease expired after {be.lease_ttl:g} s and "
                            "went to another rank, or the trainer was fenced out). Raise lease_ttl, and feed the "
                            "loader from SpecForgeBackend.ref_queue(), not SpecForge's in-process SampleRefQueue")
        if optimizer_durable:
            be._drain(led.mark_durable(step, retain=False, fence=be.fence))

    def durable_marker(self) -> dict[str, Any]:
        """``acked``: ids trained at or before the last optimizer-durable step, which is
        ``global_step``; acks after it (not durable) are not reported, so a restart
        trains them again."""
        led = self._be.ledger
        marks = led.checkpoints()
        last = marks[-1] if marks else None
        acked = {s for s, st in led.trained_steps(0).items() if last is not None and st <= last}
        return {"acked": acked, "global_step": last, "optimizer_durable": last is not None}


class LedgerRefQueue:
    """A ``SampleRefQueue`` stand-in: ``get`` leases refs from the ledger to one rank.

    ``put`` is a no-op (a commit already made the ref deliverable), ``ack`` is a
    no-op (the durable ack is the metadata store's), ``fail`` hands leases back.
    With ``wait_for_stream`` an empty ``get`` waits until the ledger's producers
    are done, so the loader streams an online run to its end.
    """

    loader_close_retryable = True  # unyielded prefetched refs can be read again: the ledger kept the bytes

    def __init__(self, backend: SpecForgeBackend, owner: str, *, rank: int | None = None, world: int | None = None,
                 wait_for_stream: bool = False, stream_timeout_s: float = 600.0, poll_s: float = 0.05) -> None:
        if (rank is None) != (world is None) or (world is not None and not 0 <= rank < world):  # type: ignore[operator]
            raise ConfigError(f"give both rank and world with 0 <= rank < world (or neither), got {rank}, {world}")
        self._be = backend
        attempt = backend.fence if backend.fence is not None else backend.ledger.attempt()
        self.owner = f"{backend.name}/a{attempt}/{owner}"
        self.rank, self.world = rank, world
        self._plan: Plan | None = None
        self._step = 0
        self._beat_at = 0.0
        self.wait_for_stream = wait_for_stream
        self.stream_timeout_s = stream_timeout_s
        self.poll_s = poll_s
        self._held: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._checked = False

    def put(self, refs: list[SFSampleRef]) -> None:
        """No-op: the ledger holds every committed ref (and requeues on ``resume``)."""

    def get(self, max_refs: int, timeout_s: float | None = None) -> list[SFSampleRef]:
        be = self._be
        if not self._checked:
            self._checked = check_store(be.store, be.ledger)
        start = time.monotonic()
        deadline = None if timeout_s is None else start + timeout_s
        self._heartbeat()
        while True:
            self._renew()
            if self.world is not None:
                leases, status = self._claim(max_refs)
                if status == "end":
                    return []
            else:
                leases = be.ledger.lease(self.owner, max_refs, be.lease_ttl, epoch=0, fence=be.fence)
            if leases:
                with self._lock:
                    self._held.update((lease.sample_id, lease) for lease in leases)
                return [to_specforge_ref(lease.ref) for lease in leases]
            now = time.monotonic()
            if self.wait_for_stream and not be.ledger.is_closed():
                if now - start > self.stream_timeout_s:
                    raise ProducerSilent(f"no ref to lease from {be.ledger.uri} for {self.stream_timeout_s:g} s and "
                                         "its producers are not done: check them (`torch-dataflow status`)")
            elif deadline is None or now >= deadline:
                return []
            time.sleep(self.poll_s)

    def _claim(self, batch: int) -> tuple[list[Lease], str]:
        be = self._be
        if self._plan is None:
            self._plan = Plan(attempt=be.ledger.attempt(), epoch=0, world=int(self.world or 1), batch=batch)
        elif self._plan.batch != batch:
            raise ConfigError(f"a planned queue serves one batch size: {self._plan.batch} so far, now {batch}")
        while True:
            claim = be.ledger.claim_step(self._plan, self._step, int(self.rank or 0), be.lease_ttl,
                                         wait_for_stream=self.wait_for_stream, fence=be.fence)
            if claim.status in ("ready", "claimed"):
                self._step += 1
                if claim.leases:  # an empty "ready": every lease of the slot expired before the claim
                    return list(claim.leases), "ready"
                continue
            return [], claim.status  # "wait" (the caller polls) or "end"

    def _heartbeat(self) -> None:
        """Keep the trainer session live (a second trainer is refused while it is); Fenced once taken over."""
        now = time.monotonic()
        if self._be.fence is not None and now - self._beat_at >= 5.0:
            self._be.ledger.session_heartbeat(self._be.fence)
            self._beat_at = now

    def _renew(self) -> None:
        with self._lock:
            held = {lease.lease_id: sid for sid, lease in self._held.items()}
        if held:
            for lid in self._be.ledger.renew(list(held), self._be.lease_ttl):  # acked ones come back as lost
                with self._lock:
                    self._held.pop(held[lid], None)

    def ack(self, refs: list[SFSampleRef]) -> None:
        """No-op: the lease stays until the optimizer-boundary ack (``record_train_ack``)."""

    def ack_ids(self, sample_ids: list[str]) -> None:
        """No-op (SpecForge's deferred queue ack)."""

    def fail(self, refs: list[SFSampleRef], reason: str, retryable: bool) -> None:
        with self._lock:
            leases = [self._held.pop(r.sample_id) for r in refs if r.sample_id in self._held]
        if leases:
            self._be.ledger.fail([lease.lease_id for lease in leases], retryable=retryable, reason=reason)

    def depth(self) -> int:
        return self._be.ledger.counts(0).pending

    def in_flight(self) -> int:
        with self._lock:
            return len(self._held)
