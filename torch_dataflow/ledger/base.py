"""The control-plane contract: :class:`Ledger`.

The ledger is the single source of truth for every sample's state and owner.
It carries :class:`~torch_dataflow.refs.SampleRef` records only, never tensors.

Two tables of state (whatever the backend):

* **catalog** — one entry per sample id: the latest reserved generation, the
  committed ref, a tombstone (generations ``<= tomb`` are aborted), a status
  (live, aborted, quarantined, freed) and a commit sequence number.
* **deliveries** — one entry per ``(epoch, sample_id)``: the life cycle of
  DESIGN.md §2, ``PENDING -> LEASED(owner, nonce, deadline) -> TRAINED(step)
  -> DURABLE``. Online streams use epoch 0 only; offline pools get a fresh set
  of deliveries per epoch (:meth:`begin_epoch`), so a resume inside any epoch
  knows exactly which samples that epoch has already trained.

Consumers take deliveries in two ways:

* :meth:`lease` — whoever asks first gets the next ``n`` pending (one
  consumer, or independent consumers that need no balance);
* :meth:`claim_step` — a *plan* for ``world`` ranks: global step ``k`` is
  materialised once, in order, as ``world`` batches of ``batch`` deliveries,
  one per rank, so every rank sees the same number of steps (DDP never hangs).
  A plan ends at the first step that cannot be filled once the stream is
  closed (or, offline, at once); the tail stays PENDING for the next run.

Lease ids are ``"{epoch}:{generation}:{nonce}:{sample_id}"``; callers treat
them as opaque strings.

Every method that changes state is one atomic step of the backend (one SQLite
transaction, one Redis script). Expired leases are reclaimed by any
consumer's :meth:`lease` / :meth:`claim_step` call: no daemon.
"""

from __future__ import annotations

import enum
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..auth import SecretGuard
from ..errors import ConfigError, LeaseLost
from ..refs import Lease, SampleRef

__all__ = [
    "CommitResult",
    "DeliveryState",
    "Ledger",
    "LedgerCounts",
    "Plan",
    "ReconcileReport",
    "SampleStatus",
    "StepClaim",
    "format_lease_id",
    "parse_lease_id",
]


class DeliveryState(enum.IntEnum):
    PENDING = 0
    LEASED = 1
    TRAINED = 2
    DURABLE = 3


class SampleStatus(enum.IntEnum):
    RESERVED = -1  # a generation reserved, nothing committed yet
    LIVE = 0
    ABORTED = 1
    QUARANTINED = 2
    FREED = 3


@dataclass(frozen=True)
class Plan:
    """A balanced schedule of global steps for ``world`` ranks.

    ``attempt`` is the ledger's restart counter (see :meth:`Ledger.reconcile`):
    a resumed run never reuses the slots of a crashed one.
    """

    attempt: int
    epoch: int
    world: int
    batch: int
    round: int = 0  # the n-th pass over the same epoch within one attempt


    def __post_init__(self) -> None:
        if self.world < 1 or self.batch < 1:
            raise ConfigError(f"plan needs world >= 1 and batch >= 1, got {self.world} and {self.batch}")

    @property
    def key(self) -> str:
        return f"a{self.attempt}/e{self.epoch}/w{self.world}/b{self.batch}/p{self.round}"


@dataclass(frozen=True)
class StepClaim:
    """The answer to :meth:`Ledger.claim_step`: ``status`` is ``"ready"`` (leases
    are this rank's batch of the step, possibly short if some expired before the
    claim), ``"wait"`` (the stream is open and the step cannot be filled yet) or
    ``"end"`` (the plan has no such step; ``tail`` deliveries stay pending) or
    ``"claimed"`` (this rank already claimed this step under this plan: the
    caller is iterating the same epoch again and should move to the next
    ``Plan.round``)."""

    status: str
    leases: tuple[Lease, ...] = ()
    tail: int = 0


@dataclass(frozen=True)
class ReconcileReport:
    """What :meth:`Ledger.reconcile` changed."""

    attempt: int
    replayed: int  # TRAINED after the resume step -> PENDING
    durable: int  # TRAINED at or before it -> DURABLE
    released: int  # LEASED -> PENDING
    freed: tuple[SampleRef, ...] = ()  # refs whose bytes the caller should delete


@dataclass(frozen=True)
class LedgerCounts:
    """Deliveries by state (all epochs, or one) and catalog entries by status."""

    pending: int = 0
    leased: int = 0
    trained: int = 0
    durable: int = 0
    aborted: int = 0
    quarantined: int = 0
    freed: int = 0
    committed: int = 0
    closed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("pending", "leased", "trained", "durable", "aborted",
                                           "quarantined", "freed", "committed", "closed")}
        d.update(self.extra)
        return d


class CommitResult(list):  # type: ignore[type-arg]  # list[SampleRef]: what commit() always returned
    """What :meth:`Ledger.commit` returns: the superseded refs (the list itself),
    plus ``refused`` (the given refs an ``if_absent`` commit did not commit, in
    input order) and ``existing`` (``sample_id -> committed ref`` of those ids)."""

    def __init__(self, superseded: Sequence[SampleRef] = (), refused: Sequence[SampleRef] = (),
                 existing: dict[str, SampleRef] | None = None) -> None:
        super().__init__(superseded)
        self.refused: list[SampleRef] = list(refused)
        self.existing: dict[str, SampleRef] = existing or {}


RESUME_FLOOR = "resume_floor"  # meta key: the step the last reconcile resumed from (acks must be later)


def resume_floor_message(step: int, floor: int) -> str:
    """The refusal of an ack at or before the step a run resumed from."""
    return (f"ack at step {step}, but this run resumed from the checkpoint of step {floor} (reconcile): its "
            f"optimizer steps are {floor + 1}, {floor + 2}, ... A sample acked at step {step} would count as in "
            f"that checkpoint, which never trained it. Continue the step counter from the checkpoint "
            f"(step = {floor} after loading it); nothing was acked")


def format_lease_id(epoch: int, generation: int, nonce: str, sample_id: str) -> str:
    return f"{epoch}:{generation}:{nonce}:{sample_id}"


def parse_lease_id(lease_id: str) -> tuple[int, int, str, str]:
    """Split a lease id into ``(epoch, generation, nonce, sample_id)``.

    Raises:
        LeaseLost: not a lease id (a forged or mangled id owns nothing).
    """
    try:
        epoch, gen, nonce, sid = lease_id.split(":", 3)
        return int(epoch), int(gen), nonce, sid
    except (AttributeError, ValueError) as e:
        raise LeaseLost(f"not a lease id: {lease_id!r}") from e


def new_nonce() -> str:
    return secrets.token_hex(8)


class Ledger(ABC):
    """Sample state shared by every producer and consumer that can reach it.

    Backends: ``memory://`` (one process), ``sqlite:///path`` (one host),
    ``redis://host:port/db`` (many hosts). Instances connect lazily, reconnect
    after ``fork``, and pickle by configuration.

    Example:
        >>> from torch_dataflow.ledger import open_ledger
        >>> from torch_dataflow.refs import SampleRef
        >>> led = open_ledger("memory://doc-ledger")
        >>> [gen] = led.reserve(["s1"])
        >>> _ = led.commit([SampleRef("s1", gen, "memory://", (), 0, "00")])
        >>> [lease] = led.lease("me", 8, ttl=30)
        >>> led.ack([lease.lease_id], step=1)
        []
        >>> led.counts().trained
        1
    """

    uri: str
    _guard: SecretGuard | None = None
    _pid: int | None = None

    # ------------------------------------------------------------ producer
    @abstractmethod
    def reserve(self, sample_ids: Sequence[str]) -> list[int]:
        """Reserve the next generation of each id (1 for a new id), before its
        bytes are written. A reserved generation is never handed out twice."""

    @abstractmethod
    def commit(self, refs: Sequence[SampleRef], *, if_absent: bool = False) -> list[SampleRef]:
        """Make ``refs`` deliverable (PENDING in the current epoch), in order.

        A ref must carry the latest reserved generation of its id. Committing a
        newer generation supersedes the old one: its pending or leased
        deliveries switch to the new generation (old leases are lost) and the
        old ref is returned so the caller frees its bytes.

        With ``if_absent`` the first commit wins: a ref whose id already has a
        committed generation (LIVE, leased, trained, FREED or QUARANTINED; not
        aborted) is refused, and nothing about that id changes; a ref of an id
        with no committed generation is committed even if another writer has
        reserved a higher generation since (that writer's ``if_absent`` commit
        is then refused). Check and write are one atomic step. Re-committing
        the committed generation itself is the idempotent no-op it always is.

        Returns:
            The superseded refs, as a :class:`CommitResult` (a ``list``) whose
            ``refused`` holds the refs not committed and ``existing`` the
            committed ref of each refused id (always empty without ``if_absent``).

        Example:
            >>> from torch_dataflow.ledger import open_ledger
            >>> from torch_dataflow.refs import SampleRef
            >>> led = open_ledger("memory://commit-doc")
            >>> a, b = led.reserve(["x"]), led.reserve(["x"])  # two writers: gens 1 and 2
            >>> led.commit([SampleRef("x", 1, "memory://s", (), 0, "")], if_absent=True).refused
            []
            >>> [r.generation for r in led.commit([SampleRef("x", 2, "memory://s", (), 0, "")], if_absent=True).refused]
            [2]

        Raises:
            SampleAborted: the generation was aborted while in flight.
            ConfigError: a stale or never-reserved generation; a tensor in a ref
                (``TypeError``).
        """

    @abstractmethod
    def register_producer(self, name: str, info: dict[str, Any] | None = None) -> None:
        """Declare a producer; the stream is closed when every declared one is done.
        Records its host, pid (this process unless ``info`` gives ``host``/``pid``;
        other keys are kept as info) and a first heartbeat."""

    @abstractmethod
    def producer_done(self, name: str) -> None:
        """Mark producer ``name`` finished."""

    @abstractmethod
    def reopen(self) -> None:
        """Forget all producers: the stream is open again (a new producer run)."""

    @abstractmethod
    def is_closed(self) -> bool:
        """True when at least one producer registered and all are done."""

    # ------------------------------------------------------------ consumer
    @abstractmethod
    def begin_epoch(self, epoch: int, seed: int = 0, shuffle: bool = True) -> None:
        """Idempotently open ``epoch`` of an offline pool: create a PENDING
        delivery for every live committed sample (if the epoch has none yet)
        and order the epoch's pending deliveries by a hash of
        ``(seed, epoch, sample_id)`` (or by commit order without shuffle).
        The first caller wins; every rank sees the same order."""

    @abstractmethod
    def lease(self, owner: str, n: int, ttl: float, *, epoch: int = 0, fence: int | None = None) -> list[Lease]:
        """Atomically lease up to ``n`` pending deliveries of ``epoch`` to ``owner``
        for ``ttl`` seconds, in the epoch's order. Reclaims expired leases first.

        Raises:
            Fenced: ``fence`` (the caller's session, see :mod:`.fencing`) is stale.
            SessionConflict: no ``fence`` while another process holds a live session."""

    @abstractmethod
    def claim_step(self, plan: Plan, step: int, rank: int, ttl: float, *, wait_for_stream: bool,
                   fence: int | None = None) -> StepClaim:
        """Return rank ``rank``'s batch of global step ``step`` under ``plan``,
        materialising steps up to ``step`` in order if needed (each exactly
        ``plan.world * plan.batch`` deliveries). With ``wait_for_stream`` an
        unfillable step answers ``"wait"`` while the stream is open.

        Raises:
            Fenced: ``plan.attempt`` (or ``fence``) is not the ledger's current attempt:
                the plan belongs to a run that was reconciled away.
            SessionConflict: no ``fence`` while another process holds a live session."""

    @abstractmethod
    def renew(self, lease_ids: Sequence[str], ttl: float) -> list[str]:
        """Extend leases still held; return the ids that were lost."""

    @abstractmethod
    def ack(self, lease_ids: Sequence[str], step: int) -> list[str]:
        """LEASED -> TRAINED at optimizer step ``step``; idempotent for the same
        lease. Returns the ids that were lost (expired and re-leased, superseded,
        aborted, or not lease ids)."""

    @abstractmethod
    def fail(self, lease_ids: Sequence[str], *, retryable: bool = True, reason: str = "") -> list[str]:
        """Give leases back: PENDING again if ``retryable``, else the sample is
        QUARANTINED (never delivered again; kept for inspection), in one atomic
        step. Returns lost ids (each once, in input order; a repeated id counts once)."""

    @abstractmethod
    def abort(self, sample_ids: Sequence[str]) -> list[SampleRef]:
        """Tombstone ids: no generation reserved so far is ever delivered again
        (a commit in flight fails with ``SampleAborted``); pending and leased
        deliveries vanish. Returns committed refs whose bytes the caller frees."""

    @abstractmethod
    def mark_durable(self, step: int, *, free: bool = True, retain: bool = True,
                     fence: int | None = None) -> list[SampleRef]:
        """TRAINED at ``<= step`` -> DURABLE (a checkpoint covering ``step`` is
        written) and ``step`` is recorded as a checkpoint mark. With ``free``,
        samples DURABLE at or before the *previous* mark (``retain=False``: at or
        before ``step``) with no other undone delivery become FREED and their refs
        are returned for the caller to delete (see :mod:`.retention`)."""

    @abstractmethod
    def reconcile(self, resume_step: int | None, *, free: bool = True, strict: bool = True,
                  session: dict[str, Any] | None = None, takeover: bool = False,
                  session_ttl: float = 60.0) -> ReconcileReport:
        """Restart rule (DESIGN §2), run once by one process before consumers
        start: TRAINED *and DURABLE* after ``resume_step`` -> PENDING (``None``: no
        checkpoint, all replay); TRAINED at or before -> DURABLE; every LEASED ->
        PENDING (its owner died with the old run); checkpoint marks after
        ``resume_step`` are forgotten; plans are dropped and the attempt counter
        increases. With ``session`` (holder info, e.g. ``{"name": ..., "world": 2}``)
        the caller opens a trainer session whose fence is the new attempt.

        Raises:
            CheckpointTooOld: (``strict``) a DURABLE sample trained after
                ``resume_step`` was already freed; nothing changed.
            SessionConflict: another process holds a live session and not ``takeover``."""

    # ------------------------------------------------------------ the delete queue (free_queue.py)
    @abstractmethod
    def pending_deletes(self, limit: int | None = None) -> list[SampleRef]:
        """Refs the ledger no longer needs (freed, aborted, superseded) whose delete
        was not confirmed: queued in the same atomic step that decided it."""

    @abstractmethod
    def confirm_deleted(self, refs: Sequence[SampleRef]) -> int:
        """Drop these ``(sample_id, generation)`` entries from the delete queue."""

    @abstractmethod
    def sample_statuses(self, sample_ids: Sequence[str]) -> dict[str, SampleStatus]:
        """``sample_id -> status`` of the ids the catalog knows."""

    @abstractmethod
    def resident_bytes(self) -> int:
        """Bytes of committed generations not confirmed deleted (live, quarantined, queued)."""

    # ------------------------------------------------------------ sessions (fencing.py)
    @abstractmethod
    def session(self) -> dict[str, Any] | None:
        """The trainer session record (holder, fence, ttl, ``age_s``, ``live``, ``current``), or ``None``."""

    @abstractmethod
    def session_heartbeat(self, fence: int) -> None:
        """Keep session ``fence`` live. Raises :class:`~torch_dataflow.errors.Fenced` if it was taken over."""

    @abstractmethod
    def close_session(self, fence: int) -> None:
        """End session ``fence`` (a clean finish); a stale fence changes nothing."""

    def join_session(self) -> int:
        """The fence of the current session, for the other ranks of the trainer that
        opened it (call after the opener's reconcile, e.g. after a barrier).

        Raises:
            SessionConflict: no current session to join."""
        from ..errors import SessionConflict

        rec = self.session()
        if rec is None or not rec.get("current"):
            raise SessionConflict(f"ledger {self.uri} has no current trainer session to join: the rank that "
                                  "reconciles (rank 0) must open it first (reconcile(..., session=...))")
        return int(rec["fence"])

    @abstractmethod
    def checkpoints(self) -> list[int]:
        """Steps of the recent durable checkpoint marks, ascending."""

    # ------------------------------------------------------------ queries
    @abstractmethod
    def attempt(self) -> int:
        """The restart counter (0 for a ledger never reconciled)."""

    @abstractmethod
    def counts(self, epoch: int | None = None) -> LedgerCounts:
        """Deliveries by state (one epoch or all) and catalog counts."""

    @abstractmethod
    def get_ref(self, sample_id: str) -> SampleRef | None:
        """The committed ref of ``sample_id`` (any status), or ``None``."""

    @abstractmethod
    def leases(self, owner_prefix: str = "") -> list[Lease]:
        """Current leases (for status displays), optionally filtered by owner prefix."""

    @abstractmethod
    def quarantined(self) -> list[tuple[SampleRef | None, str]]:
        """Quarantined samples with the reason given to :meth:`fail`."""

    @abstractmethod
    def trained_steps(self, epoch: int | None = None) -> dict[str, int]:
        """``sample_id -> step`` for TRAINED and DURABLE deliveries (audits, tests)."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections; the ledger reconnects lazily if used again."""

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _commit_ids(refs: Sequence[SampleRef]) -> list[str]:
        """The sample ids of a commit batch, after the checks every backend makes."""
        for r in refs:
            if not isinstance(r, SampleRef):
                raise TypeError(f"commit() takes SampleRef records, got {type(r).__name__}")
        ids = [r.sample_id for r in refs]
        if len(set(ids)) != len(ids):
            raise ConfigError("commit() got the same sample id twice in one call")
        return ids

    def _check_auth(self) -> None:
        if self._guard is None or self._pid != os.getpid():
            self._attach()
        assert self._guard is not None
        self._guard.check()

    @abstractmethod
    def _attach(self) -> None:
        """Connect (again after a fork), create the schema if needed, set
        ``self._guard`` from the stored verifier and ``self._pid``."""

    @abstractmethod
    def _config_state(self) -> dict[str, Any]:
        """Keyword arguments that rebuild an equivalent client in another process."""

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> Ledger:
        return cls(**state)

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__._from_state, (self._config_state(),))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    # ------------------------------------------------------------ producer liveness (heartbeats.py)
    @abstractmethod
    def producer_heartbeat(self, name: str) -> None:
        """Record that producer ``name`` is alive now (on the ledger's clock)."""

    @abstractmethod
    def producers(self) -> list[dict[str, Any]]:
        """Registered producers, by name: ``{name, done, host, pid, last_seen, age_s, info}``
        (``last_seen``/``host``/``pid`` are ``None`` for a producer that never sent a heartbeat)."""

    @abstractmethod
    def committed_refs(self, sample_ids: Sequence[str]) -> dict[str, SampleRef]:
        """``sample_id -> ref`` of the ids already committed and not aborted (LIVE,
        QUARANTINED or FREED): what a resumed producer must not put again."""

    # ------------------------------------------------------------ run metadata and requeue (issue 15)
    @abstractmethod
    def get_meta(self, key: str) -> str | None:
        """The value recorded under the run-metadata ``key`` (e.g. ``"store_id"``), or ``None``."""

    @abstractmethod
    def claim_meta(self, key: str, value: str) -> str:
        """Record ``value`` under ``key`` unless a value is recorded already
        (atomically: the first claimer wins); return what is recorded."""

    @abstractmethod
    def requeue_quarantined(self, sample_ids: Sequence[str] | None = None) -> int:
        """Undo quarantines: each QUARANTINED sample (all, or those of ``sample_ids``)
        becomes LIVE again with a PENDING delivery in the current epoch and in every
        begun epoch lacking one. Returns how many were requeued."""

    # ------------------------------------------------------------ issue 15 point 7 (step checks, epoch hand-off)
    def set_meta(self, key: str, value: str) -> None:
        """Record ``value`` under the run-metadata ``key``, replacing any earlier value
        (e.g. the epoch a dataset's persistent DataLoader workers must iterate)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement set_meta")

    # ------------------------------------------------------------ issue 13 (length-aware plans, ordering.py)
    def pending_refs(self, epoch: int) -> list[SampleRef]:
        """The committed refs of ``epoch``'s PENDING deliveries, in the epoch's order."""
        raise NotImplementedError(f"{type(self).__name__} does not implement pending_refs")

    def order_pending(self, epoch: int, sample_ids: Sequence[str], once: str) -> str:
        """Atomically give ``epoch``'s PENDING deliveries the order ``sample_ids``, the
        first time only for key ``once``. Returns ``"ordered"``, ``"done"`` (``once``
        was used already) or ``"stale"`` (``sample_ids`` is not exactly the pending
        set); nothing changes unless ``"ordered"``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement order_pending")


def check_step(step: Any) -> int:
    """An optimizer step as acks take it: an ``int >= 0`` (``bool``, ``float``, ``str``
    refused, so ``ack(step="7")`` or ``ack(step=2.9)`` never records a made-up step).

    Raises:
        ConfigError: anything else.
    """
    import numbers

    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise ConfigError(f"step must be an int >= 0 (an optimizer step), got {step!r} ({type(step).__name__})")
    if step < 0:
        raise ConfigError(f"step must be an int >= 0 (an optimizer step), got {step}")
    return int(step)
