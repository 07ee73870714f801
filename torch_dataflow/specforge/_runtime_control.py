"""The control side of :mod:`torch_dataflow.specforge.runtime`: SpecForge's
``MetadataStore`` and its ``SampleRefQueue`` on a torch_dataflow ledger (both
re-exported by ``runtime``; built by :class:`~torch_dataflow.specforge.runtime.SpecForgeBackend`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from specforge.runtime.contracts import SampleRef as SFSampleRef
from specforge.runtime.control_plane.metadata_store import MetadataStore

from ..binding import check_store
from ..errors import ConfigError, Fenced, LeaseLost, ProducerSilent
from ..ledger.base import Plan
from ..refs import Lease
from ._runtime_refs import from_specforge_ref, to_specforge_ref

if TYPE_CHECKING:
    from .runtime import SpecForgeBackend


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
