"""Consumer side: :class:`FeatureStoreDataset`, an ``IterableDataset`` over a
store and a ledger, sharded by rank and DataLoader worker through the ledger.

Example:
    >>> import torch, tempfile
    >>> from torch.utils.data import DataLoader
    >>> from torch_dataflow import FeatureStoreDataset, FeatureWriter
    >>> d = tempfile.mkdtemp()
    >>> store, ledger = f"file://{d}/features", f"sqlite://{d}/ledger.db"
    >>> with FeatureWriter(store, ledger) as w:
    ...     for i in range(4):
    ...         _ = w.put(f"s{i}", {"x": torch.full((2,), i)})
    >>> ds = FeatureStoreDataset(store, ledger, batch_size=2)
    >>> batches = list(DataLoader(ds, batch_size=2))
    >>> sorted(int(v) for b in batches for v in b["x"][:, 0])
    [0, 1, 2, 3]
    >>> ds.ack(batches[0], step=1)
    []
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .binding import check_store, consumer_ledger, consumer_store
from .errors import ConfigError, CorruptSample, LeaseLost, ProducerSilent, SampleUnavailable, StoreFull
from .fields import check_fields_arg, read_size
from .ledger import Ledger, Plan
from .ledger.base import check_step
from .ledger.heartbeats import provably_dead, silent_message
from .length_batching import FREE_ROUND, check_length_batching, order_plan
from .metrics import _record as _metrics
from .plan_tail import tail_step
from .refs import Lease
from .session import SessionMember
from .stores import FeatureStore

__all__ = ["LEASE_KEY", "SAMPLE_ID_KEY", "FeatureStoreDataset", "ack_batch", "lease_ids_of"]

log = logging.getLogger(__name__)

LEASE_KEY = "__lease__"
SAMPLE_ID_KEY = "__sample_id__"
_MAX_ROUNDS = 100_000


def lease_ids_of(batch: Any) -> list[str]:
    """The lease ids carried by a sample, a collated batch, or a list of either."""
    if isinstance(batch, Mapping):
        ids = batch.get(LEASE_KEY)
        if ids is None:
            raise ConfigError(f"batch has no {LEASE_KEY!r} entry: was it produced by a FeatureStoreDataset, and "
                              "does the collate function pass reserved '__' keys through?")
        # "" marks a padded repeat (ReshardingSampler): nothing to ack.
        return [x for x in ([ids] if isinstance(ids, str) else [str(x) for x in ids]) if x]
    if isinstance(batch, str):
        return [batch] if batch else []
    if isinstance(batch, Sequence):
        return [lid for item in batch for lid in lease_ids_of(item)]
    raise ConfigError(f"cannot find lease ids in a {type(batch).__name__}")


def ack_batch(ledger: Ledger, batch: Any, step: int, *, strict: bool = False, on_lost: Any = None) -> list[str]:
    """Ack the leases carried by ``batch`` at ``step``; warn (or, ``strict``,
    raise :class:`LeaseLost`) about the ones that were lost, after ``on_lost(lost)``
    (which raises :class:`~torch_dataflow.errors.Fenced` when the cause is a takeover)."""
    from .lease_owner import lost_message

    step = check_step(step)
    ids = lease_ids_of(batch)
    lost = ledger.ack(ids, step) if ids else []
    _metrics.acked(len(ids), len(lost))
    if lost and on_lost is not None:
        on_lost(lost)
    if lost:
        msg, foreign = lost_message(ledger, lost, len(ids), step)
        if strict:
            raise ConfigError(msg) if foreign else LeaseLost(msg)
        log.warning(msg)
    return lost


def _dist_rank_world() -> tuple[int, int] | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


class FeatureStoreDataset(SessionMember, IterableDataset):
    """Samples committed to ``ledger`` whose bytes live in ``store``.

    ``DataLoader(ds, batch_size=B, num_workers=W)`` works as with any
    ``IterableDataset``; every yielded sample is a ``dict[str, Tensor]`` plus
    ``"__lease__"`` (the lease id) and ``"__sample_id__"`` strings, which the
    default collate turns into lists, so the main process can :meth:`ack`
    the batch after the optimizer step that used it.

    **Sharding.** Rank and world size come from ``torch.distributed`` when it
    is initialised (explicit ``rank``/``world_size`` win), workers from
    ``get_worker_info()``. With one rank, workers lease what is pending in
    order. With several ranks the ledger materialises *global steps* of
    ``world_size × batch_size`` samples, one batch per rank, so assignment is
    disjoint and complete and every rank gets the same number of batches
    (DDP never hangs). The tail smaller than one global step is one last
    step, padded as ``DistributedSampler(drop_last=False)`` pads: every tail
    sample goes to one rank, each rank fills its batch with repeats under an
    empty lease (trained twice, acked once; see :mod:`torch_dataflow.plan_tail`);
    with ``FeatureLoader(drop_last=True)`` it stays pending instead, and is
    logged. Give the dataset the DataLoader's
    ``batch_size`` (or use :class:`~torch_dataflow.loader.FeatureLoader`,
    which does it for you).

    **Modes.** ``"online"`` streams while producers run and ends when every
    registered producer has closed and everything is handed out.
    ``"offline"`` iterates a committed pool once per epoch (:meth:`set_epoch`;
    seeded shuffle identical on every rank) and keeps the bytes for later epochs.

    Args:
        store: store URI or instance. ledger: ledger URI or instance.
        mode: ``"online"`` or ``"offline"``.
        batch_size: samples per rank per global step (match the DataLoader's).
        rank, world_size: override ``torch.distributed``.
        shuffle, seed: offline order (per epoch, same on every rank).
        lease_ttl: seconds a consumer holds a sample before it is redelivered;
            must exceed the time from fetch to optimizer step (:meth:`renew`
            extends it).
        poll: seconds between ledger polls while the stream is open.
        idle_timeout: raise :class:`~torch_dataflow.errors.ProducerSilent` (a
            ``TimeoutError``) after this many seconds (default 600) with nothing
            to deliver while the stream stays open, naming the open producers,
            their last heartbeat and the ``torch-dataflow close-stream`` command
            (``None``: wait forever, with a warning every minute).
        producer_ttl: a producer silent longer than this (seconds) whose process
            is provably gone (same host, no such pid) ends the wait early when
            every open producer is in that state.
        zero_copy: return views into store memory instead of owned tensors.
        group_by_length: offline only: form each global step from samples of
            similar length and balance its tokens across ranks (as the Hugging
            Face ``Trainer`` option of that name; see :mod:`torch_dataflow.length_batching`).
        length_key: where a sample's length is read from its committed ref: an
            int in its metadata, else the element count of the tensor of that name.
        fields: read only these tensors of each sample (their byte ranges and the
            header; see :mod:`torch_dataflow.fields`); ``None`` reads all. A name a
            sample does not hold is a ``ConfigError`` listing the ones it holds,
            raised before its bytes are read (its lease is given back).
    """

    def __init__(
        self,
        store: str | FeatureStore,
        ledger: str | Ledger,
        *,
        mode: str = "online",
        batch_size: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        lease_ttl: float = 300.0,
        poll: float = 0.05,
        idle_timeout: float | None = 600.0,
        zero_copy: bool = False,
        producer_ttl: float = 60.0,
        group_by_length: bool = False,
        length_key: str = "input_ids",
        fields: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("online", "offline"):
            raise ConfigError(f"mode must be 'online' or 'offline', got {mode!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if (rank is None) != (world_size is None):
            raise ConfigError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:  # type: ignore[operator]
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        if lease_ttl <= 0:
            raise ConfigError(f"lease_ttl must be > 0, got {lease_ttl}")
        self.store = consumer_store(store)  # a file:// directory is never created by a consumer
        self.ledger = consumer_ledger(ledger)  # a new sqlite file is created, with a warning (a typo?)
        # What close() releases: the connections this dataset opened, not instances the caller passed.
        self._owns = (self.store is not store, self.ledger is not ledger)
        self._store_checked = 0  # pid that checked the store against the ledger (check_store)
        self._misses: dict[tuple[str, int], int] = {}  # unavailable deliveries per sample generation
        self.mode = mode
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.lease_ttl, self.poll, self.idle_timeout = lease_ttl, poll, idle_timeout
        self.zero_copy = zero_copy
        self.fields = check_fields_arg(fields)
        self.producer_ttl = producer_ttl
        self.group_by_length, self.length_key = bool(group_by_length), str(length_key)
        if self.group_by_length:
            check_length_batching(self)
        self.epoch = 0
        self.drop_last = False  # FeatureLoader(drop_last=True) sets it: give partial tails back
        # One id for this dataset and all its DataLoader workers (pickled to them).
        self.consumer_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._dist: tuple[int, int] | None = None  # captured in the main process at pickling
        self.quarantined: list[str] = []

    # ------------------------------------------------------------ config
    def close(self) -> None:
        """Release the store and ledger connections this dataset opened from URIs (a store or
        ledger instance passed in stays open: it is the caller's). Leases held are not given back
        (they expire after ``lease_ttl`` and are delivered again); call it when training is over.
        Also ``with FeatureStoreDataset(...) as ds:``.

        Example:
            >>> import tempfile, torch
            >>> from torch_dataflow import FeatureWriter
            >>> d = tempfile.mkdtemp()
            >>> with FeatureWriter(f"file://{d}/s", f"sqlite://{d}/l.db") as w:
            ...     _ = w.put("a", {"x": torch.ones(2)})
            >>> with FeatureStoreDataset(f"file://{d}/s", f"sqlite://{d}/l.db") as ds:
            ...     [sample["__sample_id__"] for sample in ds]
            ['a']
        """
        owns_store, owns_ledger = self._owns
        if owns_store:
            self.store.close()
        if owns_ledger:
            self.ledger.close()

    def __enter__(self) -> FeatureStoreDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_epoch(self, epoch: int) -> None:
        """Select the offline epoch to iterate (call on every rank, as with
        ``DistributedSampler.set_epoch``). Online streams ignore it.

        Offline, the epoch is also recorded in the ledger under this dataset's
        ``consumer_id``: ``persistent_workers=True`` keeps the workers' copies of
        the dataset from the first epoch, and they read it there at every ``iter``."""
        self.epoch = int(epoch)
        self._publish_epoch()

    def _epoch_key(self) -> str:
        return f"dataset-epoch/{self.consumer_id}"

    def _publish_epoch(self) -> None:
        if self.mode == "offline" and get_worker_info() is None:
            try:
                self.ledger.set_meta(self._epoch_key(), str(self.epoch))
            except NotImplementedError:  # a third-party ledger: workers keep their pickled epoch
                log.debug("%r cannot record the epoch for persistent workers", self.ledger)

    def _current_epoch(self) -> int:
        """The epoch to iterate: in a DataLoader worker, the one the main process set last."""
        if self.mode != "offline":
            return 0
        if get_worker_info() is not None:
            recorded = self.ledger.get_meta(self._epoch_key())
            if recorded is not None:
                self.epoch = int(recorded)
        return self.epoch

    def configure(self, *, batch_size: int | None = None, shuffle: bool | None = None,
                  drop_last: bool | None = None) -> None:
        """Adopt a DataLoader's ``batch_size`` / ``shuffle`` / ``drop_last`` (used by
        ``FeatureLoader``; with ``drop_last`` a partial last batch is given back
        to the ledger instead of being leased and dropped)."""
        if drop_last is not None:
            self.drop_last = bool(drop_last)
        if batch_size is not None:
            self.batch_size = int(batch_size)
        if shuffle is not None:
            self.shuffle = bool(shuffle)

    def state_dict(self) -> dict[str, Any]:
        """Loader state for ``torchdata.stateful_dataloader.StatefulDataLoader``:
        the epoch only. Which samples remain is the ledger's to say, so restoring
        never re-delivers an acked sample or skips an unacked one (and the
        loader does not fast-forward by position)."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the epoch); delivery resumes from the ledger."""
        self.epoch = int(state.get("epoch", self.epoch))
        self._publish_epoch()

    def rank_world(self) -> tuple[int, int]:
        """``(rank, world_size)`` as this process sees them."""
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        return _dist_rank_world() or self._dist or (0, 1)

    def __getstate__(self) -> dict[str, Any]:
        # Pickled in the main process when DataLoader workers are spawned:
        # record the rank there, since a spawned worker has no process group.
        state = self.__dict__.copy()
        state["_dist"] = _dist_rank_world() or self._dist
        return self._session_state(state)

    # ------------------------------------------------------------ length (offline)
    def __len__(self) -> int:
        """Offline: this rank's samples of the **whole** current epoch, also after a
        restart (so ``len(DataLoader(ds, batch_size=B))`` is the epoch's batches, as
        with ``DistributedSampler``); :meth:`remaining` is what an iteration still
        yields. With several ranks it counts whole global steps (``world × batch_size``),
        the padded last step included unless ``drop_last``. Exact with one DataLoader
        worker or several ranks; with ``num_workers=W > 1`` on one rank each worker's
        last batch may be partial, so an epoch may yield up to ``W - 1`` more batches.

        Raises:
            TypeError: online mode (a stream has no length; ``len()``'s usual error).
        """
        return self._share(done=True)

    def remaining(self) -> int:
        """Offline: this rank's samples of the current epoch not trained yet (what the
        next iteration yields; ``len(self)`` in a fresh epoch).

        Raises:
            TypeError: online mode.
        """
        return self._share(done=False)

    def _share(self, *, done: bool) -> int:
        if self.mode != "offline":
            raise TypeError("an online FeatureStoreDataset has no length (it streams until the producers close); "
                            "use mode='offline' for a committed pool")
        _rank, world = self.rank_world()
        self.ledger.begin_epoch(self.epoch, seed=self.seed, shuffle=self.shuffle)
        c = self.ledger.counts(epoch=self.epoch)
        n = c.pending + c.leased + (c.trained + c.durable if done else 0)
        if world == 1:
            return n  # the DataLoader rounds by its own drop_last
        step = world * self.batch_size
        return (n // step if self.drop_last else -(-n // step)) * self.batch_size

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Lease and yield this rank's and this DataLoader worker's share, one sample dict at a time
        (its ``__lease__`` travels with it so the main process can ack it)."""
        rank, world = self.rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self._current_epoch()
        self._verify_store()  # in every DataLoader worker too: before anything is leased
        if self.mode == "offline":
            self.ledger.begin_epoch(epoch, seed=self.seed, shuffle=self.shuffle)
        if world == 1:
            if self.group_by_length:  # one worker orders what is pending; leases take it in that order
                attempt = self.ledger.attempt() if self._fence is None else self._fence
                order_plan(self, Plan(attempt, epoch, 1, self.batch_size, FREE_ROUND))
            yield from self._iter_free(f"{self.consumer_id}/w{worker}", epoch)
        else:
            yield from self._iter_plan(rank, world, worker, workers, epoch)

    def _verify_store(self) -> None:
        """Check once per process that the store is the one the ledger's samples were
        committed to (:func:`~torch_dataflow.binding.check_store`); until the ledger
        records one (nothing committed yet) ask again before every lease."""
        if self._store_checked != os.getpid() and check_store(self.store, self.ledger):
            self._store_checked = os.getpid()

    def _idle(self, since: float, warned: list[float], what: str) -> None:
        waited = time.monotonic() - since
        if self.idle_timeout is not None and waited > self.idle_timeout:
            from .stall import report_stall

            stall = report_stall(self, waited, what, quiet=True)
            if stall.reason == "store_full":  # the producers are alive and wait for room, not silent
                raise StoreFull(f"nothing to deliver for {waited:.0f}s ({what}): {stall.message}")
            raise ProducerSilent(silent_message(self.ledger, self.ledger.producers(), waited, what))
        # Every open producer provably dead (same host, pid gone, silent past the TTL): say so now.
        check_every = max(self.poll, min(5.0, self.producer_ttl / 2))
        if len(warned) < 2:
            warned.append(0.0)
        if waited - warned[1] >= check_every:
            warned[1] = waited
            prods = self.ledger.producers()
            open_ = [p for p in prods if not p["done"]]
            if open_ and all(provably_dead(p, self.producer_ttl) for p in open_):
                raise ProducerSilent(silent_message(self.ledger, prods, waited, what, dead=True))
        if waited >= self.STALL_AFTER and waited - warned[0] >= (60.0 if warned[0] else self.STALL_AFTER):
            from .stall import report_stall  # one line saying why (torch_dataflow.stall), then every minute

            warned[0] = waited
            stall = report_stall(self, waited, what)
            if stall.details.get("deadlock"):
                raise StoreFull(f"{what}: {stall.message}")
        time.sleep(self.poll)
        _metrics.waited(self.poll)

    def _iter_free(self, owner: str, epoch: int) -> Iterator[dict[str, Any]]:
        # Hand out whole batches: a DataLoader batches inside each worker, so a
        # short batch mid-stream would shift every later batch boundary.
        since, warned = time.monotonic(), [0.0]
        renewed = since
        batch: list[dict[str, Any]] = []
        while True:
            self._verify_store()
            self._maybe_beat()
            t0 = time.perf_counter()
            leases = self.ledger.lease(owner, self.batch_size - len(batch), self.lease_ttl, epoch=epoch,
                                       fence=self._fence)
            _metrics.leased(len(leases), time.perf_counter() - t0)
            if leases:
                since, warned = time.monotonic(), [0.0]
                if not batch:
                    renewed = since
                batch += self._load_all(leases, batch)
                if len(batch) == self.batch_size:
                    yield from batch
                    batch = []
                continue
            if self.mode == "offline" or self.ledger.is_closed():
                # Everything is handed out. Leases other consumers hold are theirs
                # until acked or expired; an expired one goes to the next run.
                if self.ledger.counts(epoch=epoch).pending:  # reclaimed just now: take it
                    continue
                if batch and self.drop_last:
                    # The DataLoader would drop this partial batch: give it back
                    # rather than hold leases nobody trains.
                    self.ledger.fail([s[LEASE_KEY] for s in batch], retryable=True)
                    log.info("drop_last: %d samples stay pending for the next pass", len(batch))
                else:
                    yield from batch
                return
            if batch and time.monotonic() - renewed > self.lease_ttl / 3:
                # Held while the batch fills: keep the leases alive.
                self.ledger.renew([s[LEASE_KEY] for s in batch], self.lease_ttl)
                renewed = time.monotonic()
            try:
                self._idle(since, warned, f"ledger {self.ledger.uri}")
            except BaseException as e:  # ProducerSilent, StoreFull, an interrupt: the held batch goes back now
                self._give_back([s[LEASE_KEY] for s in batch if s.get(LEASE_KEY)], e)
                raise

    def _iter_plan(self, rank: int, world: int, worker: int, workers: int, epoch: int) -> Iterator[dict[str, Any]]:
        attempt = self.ledger.attempt() if self._fence is None else self._fence
        online = self.mode == "online"
        plan = Plan(attempt, epoch, world, self.batch_size)
        order_plan(self, plan)  # group_by_length: the plan's length-aware order, once (length_batching)
        step = worker
        owner = f"{plan.key}/r{rank}"
        since, warned = time.monotonic(), [0.0]
        first = True
        while True:
            self._verify_store()
            self._maybe_beat()
            t0 = time.perf_counter()
            claim = self.ledger.claim_step(plan, step, rank, self.lease_ttl, wait_for_stream=online,
                                           fence=self._fence)
            _metrics.leased(len(claim.leases), time.perf_counter() - t0)
            if claim.status == "claimed":
                if not first or plan.round >= _MAX_ROUNDS:
                    raise LeaseLost(f"step {step} of plan {plan.key} was claimed twice by rank {rank}: "
                                    "are two processes running as the same rank?")
                plan = Plan(attempt, epoch, world, self.batch_size, plan.round + 1)
                order_plan(self, plan)
                continue
            first = False
            if claim.status == "wait":
                self._idle(since, warned, f"step {step} of plan {plan.key}")
                continue
            if claim.status == "end":
                if not self.drop_last:  # the last, partial step, padded (plan_tail); the first
                    # rank to get here records the tail's size: later ones see it already leased
                    yield from tail_step(self, plan, rank, worker, epoch, claim.tail)
                elif claim.tail and worker == 0 and rank == 0:
                    log.warning("drop_last: %d samples (less than one global step of %d x %d) stay pending "
                                "for the next run", claim.tail, world, self.batch_size)
                return
            since, warned = time.monotonic(), [0.0]
            yield from self._fill_step(claim.leases, owner, epoch, rank, step)
            step += workers

    def _fill_step(self, leases: Sequence[Lease], owner: str, epoch: int, rank: int,
                   step: int) -> Iterator[dict[str, Any]]:
        """This rank's batch of a planned step, always ``batch_size`` samples so
        every rank yields the same count (DDP never hangs): a sample that is
        corrupt, missing, or whose lease expired before the claim is replaced by
        a pending one if there is any, else by a repeat of a good sample of this
        batch with an empty lease (trained twice in this step, acked once — the
        padding rule of ``DistributedSampler``)."""
        batch = self._load_all(leases)
        while len(batch) < self.batch_size:
            spare = self.ledger.lease(owner, self.batch_size - len(batch), self.lease_ttl, epoch=epoch)
            if not spare:
                break
            batch += self._load_all(spare, batch)
        if len(batch) < self.batch_size:
            if not batch:
                log.error("rank %d step %d: no readable sample to fill the batch: this rank's batch count "
                          "will differ from the others'", rank, step)
                return
            log.warning("rank %d step %d: padded %d missing samples with repeats (acked once)",
                        rank, step, self.batch_size - len(batch))
            pads = [{**batch[i % len(batch)], LEASE_KEY: ""} for i in range(self.batch_size - len(batch))]
            batch += pads
        yield from batch

    # A store that answers but lacks a key may be catching up (a shared mount's
    # cache): READ_TRIES reads with backoff (0.25 s, 0.5 s) before the sample is
    # given back; after MAX_UNAVAILABLE such deliveries in this process it is
    # quarantined (requeue_quarantined undoes it), so a lost sample never spins.
    READ_TRIES = 3
    STALL_AFTER = 5.0  # seconds of waiting before the loader logs why (torch_dataflow.stall)
    READ_BACKOFF = 0.25
    MAX_UNAVAILABLE = 3

    def _get(self, lease: Lease) -> dict[str, torch.Tensor]:
        for attempt in range(self.READ_TRIES):
            try:
                t0 = time.perf_counter()
                if self.fields is None:
                    got = self.store.get(lease.ref, zero_copy=self.zero_copy)
                else:  # only these tensors' bytes (torch_dataflow.fields); unknown names: ConfigError
                    got = self.store.get_fields(lease.ref, self.fields, zero_copy=self.zero_copy)
                _metrics.got(time.perf_counter() - t0, read_size(lease.ref, self.fields))
                return got
            except SampleUnavailable:
                if attempt + 1 >= self.READ_TRIES:
                    raise
                time.sleep(self.READ_BACKOFF * 2**attempt)
        raise AssertionError("unreachable")

    def _load_all(self, leases: Sequence[Lease], held: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """Read ``leases``; if reading fails in a way :meth:`_load` does not handle (a
        misconfigured or unreachable store, a forked Mooncake client), give them back
        with the not yet yielded samples ``held``, so nothing waits out its lease."""
        try:
            return [s for s in map(self._load, leases) if s is not None]
        except BaseException as e:
            self._give_back([x.lease_id for x in leases] + [s[LEASE_KEY] for s in held if s.get(LEASE_KEY)], e)
            raise

    def _give_back(self, ids: Sequence[str], e: BaseException) -> None:
        """Return leases this reader holds but never yielded (it is failing with ``e``)."""
        if not ids:
            return
        try:
            self.ledger.fail(ids, retryable=True, reason=f"the reader failed: {type(e).__name__}: {e}")
        except Exception as again:  # noqa: BLE001 - report the first failure, not this one
            log.warning("could not give back %d leases after %s: %s", len(ids), type(e).__name__, again)

    def _load(self, lease: Lease) -> dict[str, Any] | None:
        """Read a leased sample; quarantine it if corrupt, give it back if unreadable."""
        try:
            tensors = self._get(lease)
        except CorruptSample as e:
            log.error("quarantined %s: %s", lease.sample_id, e)
            self.ledger.fail([lease.lease_id], retryable=False, reason=f"corrupt: {e}")
            self.quarantined.append(lease.sample_id)
            _metrics.quarantined()
            return None
        except SampleUnavailable as e:
            self._unavailable(lease, e)
            return None
        self._misses.pop((lease.sample_id, lease.ref.generation), None)
        sample: dict[str, Any] = dict(tensors)
        sample[LEASE_KEY] = lease.lease_id
        sample[SAMPLE_ID_KEY] = lease.sample_id
        return sample

    def _unavailable(self, lease: Lease, e: SampleUnavailable) -> None:
        """Bytes missing after retries: never train on a stale generation. If the
        ledger moved on (re-put or abort) the lease is stale: give it back, the ledger
        delivers what is current. Else give it back for another try, and quarantine
        it after ``MAX_UNAVAILABLE`` deliveries."""
        current = self.ledger.get_ref(lease.sample_id)
        if current is None or current.generation != lease.ref.generation:
            log.info("sample %s generation %d is no longer the committed one: %s",
                     lease.sample_id, lease.ref.generation, e)
            self.ledger.fail([lease.lease_id], retryable=True, reason=f"superseded: {e}")
            return
        key = (lease.sample_id, lease.ref.generation)
        n = self._misses[key] = self._misses.get(key, 0) + 1
        if n >= self.MAX_UNAVAILABLE:
            log.error("quarantined %s: unavailable in %d deliveries: %s", lease.sample_id, n, e)
            self.ledger.fail([lease.lease_id], retryable=False,
                             reason=f"unavailable in {n} deliveries of {self.READ_TRIES} reads each: {e}")
            self.quarantined.append(lease.sample_id)
            self._misses.pop(key, None)
            _metrics.quarantined()
        else:
            log.warning("sample %s unavailable (delivery %d of %d), given back: %s",
                        lease.sample_id, n, self.MAX_UNAVAILABLE, e)
            self.ledger.fail([lease.lease_id], retryable=True, reason=f"unavailable: {e}")
            _metrics.redelivered()

    # ------------------------------------------------------------ acks
    def ack(self, batch: Any, step: int, *, strict: bool = False) -> list[str]:
        """Mark the samples of ``batch`` trained at optimizer step ``step``.

        Returns the lease ids that were lost (expired and taken by another
        consumer, superseded or aborted); with ``strict`` raises ``LeaseLost``.
        """
        return ack_batch(self.ledger, batch, step, strict=strict,
                         on_lost=lambda lost: self._check_fence(lost, f"ack of step {step}"))

    def fail(self, batch: Any, *, retryable: bool = True, reason: str = "") -> list[str]:
        """Give the samples of ``batch`` back (retryable) or quarantine them."""
        return self.ledger.fail(lease_ids_of(batch), retryable=retryable, reason=reason)

    def renew(self, batch: Any, ttl: float | None = None) -> list[str]:
        """Extend the leases of ``batch``; returns the ids already lost."""
        return self.ledger.renew(lease_ids_of(batch), self.lease_ttl if ttl is None else ttl)

    def mark_durable(self, step: int, *, final: bool = False) -> int:
        """A checkpoint covering ``step`` is written: trained samples become
        DURABLE and, online, the bytes of those trained at or before the
        *previous* checkpoint are freed (a resume from that one still replays
        what it lacks; see :mod:`torch_dataflow.ledger.retention`). With
        ``final`` (the run's last checkpoint, training is over), everything up to
        ``step`` is freed. Returns how many were freed."""
        self._record_mode()
        freed = self.ledger.mark_durable(step, free=self.mode == "online", retain=not final, fence=self._fence)
        self._drain(freed, force=final)
        return len(freed)

    def _record_mode(self) -> None:
        if not self.__dict__.get("_mode_recorded"):
            from .finish import record_mode

            record_mode(self.ledger, self.mode)
            self._mode_recorded = True

    def _drain(self, freed: Sequence[Any], *, force: bool = False) -> None:
        """Delete what the ledger queued (these refs, and any a crashed process left queued);
        ``force`` (the run's end): removals do not wait for read leases."""
        from .gc import drain_deletes

        if self.mode != "online":
            return
        drain_deletes(self.ledger, self.store, freed, force=force)
        drain_deletes(self.ledger, self.store, limit=1024, force=force)

    def reconcile(self, resume_step: int | None, *, session: Mapping[str, Any] | None = None,
                  takeover: bool = False, strict: bool = True) -> Any:
        """Apply the restart rule before any consumer starts (one process only):
        see :meth:`~torch_dataflow.ledger.base.Ledger.reconcile`. With ``session``
        (holder info, e.g. ``{"name": "job", "world": 2}``) this dataset opens the
        ledger's trainer session and fences every earlier one (see
        :mod:`torch_dataflow.session`).

        Raises:
            SessionConflict: another trainer's session is live (``takeover=True`` fences it).
            CheckpointTooOld: ``resume_step`` is older than what the ledger freed.
        """
        self._record_mode()
        report = self.ledger.reconcile(resume_step, free=self.mode == "online", strict=strict,
                                       session=None if session is None else dict(session), takeover=takeover,
                                       session_ttl=self.session_ttl)
        if session is not None:
            self._adopt(report.attempt)
        self._drain(report.freed)
        return report
