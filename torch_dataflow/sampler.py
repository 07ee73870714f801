""":class:`ReshardingSampler`: ``DistributedSampler``'s drop-in over a committed pool.

Migrating a training script is one line::

    -sampler = DistributedSampler(dataset, num_replicas=dp_size, rank=dp_rank, shuffle=True)
    +sampler = ReshardingSampler(FeaturePool(store, ledger), num_replicas=dp_size, rank=dp_rank, shuffle=True)

plus an ack after each optimizer step (a callback, or ``pool.ack(batch, step)``).
``set_epoch``, ``len(sampler)`` / ``len(loader)``, ``batch_size``,
``num_workers``, ``pin_memory`` and ``persistent_workers`` work as before.

How it works: every index is a delivery leased from the ledger **in the main
process**, through a balanced *plan* (see :meth:`~torch_dataflow.ledger.base.Ledger.claim_step`)
of one sample per rank per step: step ``k`` gives rank ``r`` the epoch's
``k * world + r``-th pending sample, i.e. the ``[rank::world]`` interleave
``DistributedSampler`` uses. Only PENDING deliveries are planned, so nothing
leased elsewhere, aborted, quarantined or already trained in this epoch is
handed out, and a run restarted with a different world size plans the rest of
the epoch over the new width (the restart calls ``pool.reconcile(step)`` once).

Example:
    >>> import tempfile, torch
    >>> from torch.utils.data import DataLoader
    >>> from torch_dataflow import FeatureWriter
    >>> from torch_dataflow.pool import FeaturePool
    >>> d = tempfile.mkdtemp()
    >>> store, ledger = f"file://{d}/features", f"sqlite://{d}/ledger.db"
    >>> with FeatureWriter(store, ledger) as w:
    ...     for i in range(6):
    ...         _ = w.put(f"s{i}", {"x": torch.full((2,), i)})
    >>> pool = FeaturePool(store, ledger)
    >>> sampler = ReshardingSampler(pool, num_replicas=2, rank=0, shuffle=False)
    >>> loader = DataLoader(pool, batch_size=3, sampler=sampler)
    >>> sampler.set_epoch(0)
    >>> len(loader), [b["__sample_id__"] for b in loader]
    (1, [['s0', 's2', 's4']])
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler

from .errors import ConfigError, LeaseLost
from .ledger import Plan
from .length_batching import check_sampler, order_sampler_plan
from .pool import FeaturePool, PoolIndex
from .refs import Lease

__all__ = ["FeaturePool", "PoolIndex", "ReshardingSampler", "samplers_of"]

log = logging.getLogger(__name__)

# Plan rounds of their own, so a sampler's plans never share a key with a
# FeatureStoreDataset's (rounds from 0) in the same attempt and epoch.
_MAIN_ROUND = 1_000_000
_TAIL_ROUND = 2_000_000
_MAX_PASSES = 100_000

# Every live sampler, so a training callback can reach the samplers of the pools it acks
# before the loader is built (Lightning iterates the loader before it calls set_epoch).
_LIVE: weakref.WeakSet[ReshardingSampler] = weakref.WeakSet()


def samplers_of(pool: FeaturePool) -> list[ReshardingSampler]:
    """The live :class:`ReshardingSampler` objects that sample ``pool``."""
    return [s for s in list(_LIVE) if s.dataset is pool]


def _dist_world_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _check_rank(num_replicas: int, rank: int) -> None:
    if num_replicas < 1:
        raise ConfigError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ConfigError(f"Invalid rank {rank}, rank should be in the interval [0, {num_replicas - 1}]")


class ReshardingSampler(DistributedSampler):
    """Lease-backed, resharding replacement for ``DistributedSampler``.

    It *is* a ``DistributedSampler`` (a subclass that shares none of its
    state), so Lightning's default ``use_distributed_sampler=True`` and
    Fabric's ``setup_dataloaders`` leave it in place instead of wrapping it.

    **Length.** ``len(sampler)`` (``num_samples``) is the *full* epoch's
    per-rank count, as ``DistributedSampler`` reports it: with ``E`` the
    epoch's samples (every committed sample not aborted or quarantined),
    ``E // num_replicas`` with ``drop_last=True`` and ``ceil(E / num_replicas)``
    with ``drop_last=False``, also after a restart in the middle of the epoch
    (so ``len(loader)``-based schedules do not shrink). What an iteration
    yields is :meth:`remaining`: with ``R`` the samples of the epoch not yet
    trained (``R == E`` in a fresh epoch), ``R // num_replicas`` indices with
    ``drop_last=True`` (the tail, ``R % num_replicas`` samples, stays pending:
    a resumed run picks it up, and the next epoch is reshuffled) and
    ``ceil(R / num_replicas)`` with ``drop_last=False`` — equal on every rank.
    A loop that runs ``for batch in loader`` trains exactly the rest of the
    epoch; one that counts to ``len(loader)`` must count to
    ``remaining()``-based batches instead (the Lightning callback aligns
    Lightning's restored in-epoch batch counter with it). ``E`` and ``R`` are
    read from the ledger once per (epoch, restart attempt), at the first
    ``len()``, ``remaining()`` or ``iter()``, and kept: every rank must ask
    before any rank acks a sample of the epoch, which DDP guarantees (an
    optimizer step needs every rank's batch).

    **Padding** (``drop_last=False``, the default, as in ``DistributedSampler``).
    The last row has ``R % world`` real samples; rank ``r >= R % world``
    repeats the epoch order's ``(r - R % world)``-th index (wrapping), the
    head of the global list, exactly as ``DistributedSampler`` pads. A padded
    slot carries no lease (``"__lease__" == ""``, skipped by
    ``FeaturePool.ack``): the ledger counts the sample once while its
    gradient counts twice, as with ``DistributedSampler``. The epoch order is
    the pool's index order (``shuffle=False``) or ``DistributedSampler``'s
    permutation of the pool's indices (``shuffle=True``). ``drop_last=True`` never
    repeats: every sample is trained exactly once.

    **Order.** ``shuffle=False``: the ledger's commit order, which equals the
    pool's index order when the pool's ``sample_ids`` are in commit order;
    then the partition is ``DistributedSampler``'s exactly. ``shuffle=True``:
    ``DistributedSampler``'s order, ``torch.randperm(len(pool))`` seeded with
    ``seed + epoch``, given to each plan's pending samples once (so a fresh
    epoch hands out exactly ``DistributedSampler``'s indices; a resumed or
    resharded one, the rest of that permutation); with
    ``group_by_length=True``, or a ledger that cannot reorder, the ledger's
    seeded hash of ``(seed, epoch, sample_id)`` instead.

    **Leases.** Taken in the main process as the DataLoader asks for
    indices (at most its prefetch depth ahead), held for ``lease_ttl``
    seconds; a dead rank's leases come back after they expire, or at once
    when the restarted run calls ``pool.reconcile(resume_step)``. If a lease
    expires before its rank claims it, that rank repeats its previous sample
    for that slot (logged) so every rank still yields the same count; if the
    pool runs dry early (another consumer took samples), every rank stops at
    the same step.

    Args:
        dataset: the :class:`~torch_dataflow.pool.FeaturePool` to sample.
        num_replicas: world size (default: ``torch.distributed``'s, else 1,
            read at the first ``len()`` / ``iter()``, not at construction).
        rank: this rank (default: ``torch.distributed``'s, else 0, read then too).
        shuffle: seeded per-epoch shuffle.
        seed: shuffle seed; must be the same on every rank.
        drop_last: drop the uneven tail, or pad (the default; see above).
        lease_ttl: seconds a handed-out index stays reserved for this rank:
            must exceed the DataLoader's prefetch depth plus the time to the
            optimizer step that acks it.
        group_by_length: each global step (``num_replicas × batch_size``
            indices) holds samples of similar length, tokens balanced across
            ranks (see :mod:`torch_dataflow.length_batching`); needs ``batch_size``.
        batch_size: the DataLoader's ``batch_size`` (``group_by_length`` only).
        length_key: a sample's length: an int in its ref's metadata, else the
            element count of the tensor of that name.

    Raises:
        TypeError: ``dataset`` is not a ``FeaturePool``.
        ValueError: bad ``num_replicas``, ``rank`` or ``lease_ttl``
            (a :class:`~torch_dataflow.errors.ConfigError`).

    Example:
        >>> sampler = ReshardingSampler(pool, shuffle=True, seed=0)  # doctest: +SKIP
        >>> loader = DataLoader(pool, batch_size=8, sampler=sampler, num_workers=4, drop_last=True)  # doctest: +SKIP
        >>> for epoch in range(3):  # doctest: +SKIP
        ...     sampler.set_epoch(epoch)
        ...     for step_batch in loader:
        ...         ...  # forward, backward, optimizer.step(); then pool.ack(step_batch, step)
    """

    def __init__(
        self,
        dataset: FeaturePool,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        *,
        lease_ttl: float = 300.0,
        group_by_length: bool = False,
        batch_size: int | None = None,
        length_key: str = "input_ids",
    ) -> None:
        if not isinstance(dataset, FeaturePool):
            raise TypeError(
                f"ReshardingSampler samples a FeaturePool, got {type(dataset).__name__} "
                "(wrap the store and ledger: FeaturePool(store, ledger))"
            )
        for name, value in (("num_replicas", num_replicas), ("rank", rank)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{name} must be an int, got {value!r}")
        if num_replicas is not None and rank is not None:
            _check_rank(num_replicas, rank)
        elif num_replicas is not None and num_replicas < 1:
            raise ConfigError(f"num_replicas must be >= 1, got {num_replicas}")
        if not lease_ttl > 0:
            raise ConfigError(f"lease_ttl must be > 0 seconds, got {lease_ttl}")
        self.dataset = dataset
        # Not given: read from torch.distributed at the first len() / iter() (a sampler built
        # before trainer.fit sets up the process group must not plan as world 1).
        self._num_replicas_arg, self._rank_arg = num_replicas, rank
        self._resolved: tuple[int, int] | None = None
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.lease_ttl = float(lease_ttl)
        self.group_by_length, self.length_batch, self.length_key = check_sampler(dataset, group_by_length,
                                                                                 batch_size, length_key)
        self.epoch = 0
        self._remaining: dict[tuple[int, int], tuple[int, int]] = {}  # (epoch, attempt) -> (R, E)
        self._passes: dict[tuple[int, int], int] = {}
        self._warned_freed = False
        _LIVE.add(self)

    def __setstate__(self, state: dict[str, object]) -> None:
        # Unpickled in a spawned process (ddp_spawn, mp.spawn): reachable by the callback there too.
        self.__dict__.update(state)
        _LIVE.add(self)

    # ------------------------------------------------------------ rank and world (lazy)
    def _rank_world(self, *, freeze: bool) -> tuple[int, int]:
        if self._resolved is not None:
            return self._resolved
        world, dist_rank = _dist_world_rank()
        num_replicas = world if self._num_replicas_arg is None else self._num_replicas_arg
        rank = dist_rank if self._rank_arg is None else self._rank_arg
        _check_rank(num_replicas, rank)
        if freeze:
            self._resolved = (num_replicas, rank)
        return num_replicas, rank

    @property
    def num_replicas(self) -> int:
        """World size: given, else ``torch.distributed``'s, fixed at the first ``len()`` / ``iter()``."""
        return self._rank_world(freeze=False)[0]

    @property
    def rank(self) -> int:
        """This rank: given, else ``torch.distributed``'s, fixed at the first ``len()`` / ``iter()``."""
        return self._rank_world(freeze=False)[1]

    # ------------------------------------------------------------ DistributedSampler surface
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration plans (call on every rank)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    @property
    def num_samples(self) -> int:
        """This rank's share of the whole current epoch (``DistributedSampler.num_samples``),
        also after a mid-epoch restart; an iteration yields :meth:`remaining`."""
        world, _ = self._rank_world(freeze=True)
        return self._per_rank(self._snapshot()[2], world)

    def remaining(self) -> int:
        """Indices an iteration of the current epoch yields on this rank: this rank's
        share of what the epoch has not trained yet (``len(self)`` in a fresh epoch)."""
        world, _ = self._rank_world(freeze=True)
        return self._per_rank(self._snapshot()[0], world)

    def _per_rank(self, n: int, world: int) -> int:
        return n // world if self.drop_last else -(-n // world)

    @property
    def total_size(self) -> int:
        """Indices all ranks yield together (``DistributedSampler.total_size``)."""
        return self.num_samples * self.num_replicas

    def _snapshot(self) -> tuple[int, int, int]:
        """``(R, attempt, E)``: undone and all samples of the epoch, read once per (epoch, attempt)."""
        ledger = self.dataset.ledger
        attempt = ledger.attempt()
        key = (self.epoch, attempt)
        if key not in self._remaining:
            # Begun once per (epoch, attempt): idempotent in the ledger but a write transaction, and
            # a fresh run's reconcile has the epoch begun again (it adds samples committed since).
            ledger.begin_epoch(self.epoch, seed=self.seed, shuffle=self.shuffle)
            # Claims turn PENDING into LEASED, so pending + leased does not move
            # while other ranks start; only acks lower it.
            c = ledger.counts(epoch=self.epoch)
            self._remaining[key] = (c.pending + c.leased, c.pending + c.leased + c.trained + c.durable)
            if c.freed and not self._warned_freed:
                self._warned_freed = True
                log.warning(
                    "%d samples of %s were freed (mark_durable or reconcile with free=True): they are "
                    "not in later epochs; use FeaturePool.mark_durable / reconcile, which keep the bytes "
                    "of an offline pool",
                    c.freed,
                    ledger.uri,
                )
        remaining, total = self._remaining[key]
        return remaining, attempt, total

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[int]:
        """Claim this rank's steps of the epoch from the ledger and yield their pool indices."""
        world, rank = self._rank_world(freeze=True)
        remaining, attempt, _ = self._snapshot()
        epoch = self.epoch
        rows = remaining // world
        tail = 0 if self.drop_last else remaining % world
        key = (epoch, attempt)
        passes = self._passes.get(key, 0)
        self._passes[key] = passes + 1
        last: PoolIndex | None = None
        step = 0
        while step < rows:
            plan = Plan(attempt, epoch, world, 1, _MAIN_ROUND + passes)
            if step == 0 and self.group_by_length:  # this pass's length-aware order, once (length_batching)
                order_sampler_plan(self, plan)
            elif step == 0 and self.shuffle:  # DistributedSampler's permutation, once per plan
                self._randperm_order(plan)
            claim = self.dataset.ledger.claim_step(plan, step, rank, self.lease_ttl, wait_for_stream=False,
                                                  fence=getattr(self.dataset, "fence", None))
            if claim.status == "claimed":
                # This rank already went through this plan (a new pass over the
                # epoch, or a new sampler object): every rank moves on alike.
                if step > 0 or passes >= _MAX_PASSES:
                    raise LeaseLost(
                        f"step {step} of plan {plan.key} was claimed twice by rank {rank}: "
                        "are two processes running as the same rank?"
                    )
                passes += 1
                self._passes[key] = passes + 1
                continue
            if claim.status == "end":
                # The ledger fixes a plan's end once: every rank stops at this step.
                log.warning(
                    "epoch %d ran out of pending samples at step %d of %d on rank %d (taken by "
                    "another consumer, or leased by a dead one not yet expired)",
                    epoch,
                    step,
                    rows,
                    rank,
                )
                return
            if claim.leases:
                last = self._index(claim.leases[0])
                yield last
            else:
                log.warning(
                    "rank %d: the lease of step %d expired before it was claimed (lease_ttl=%ss too "
                    "short?); repeating a sample to keep ranks even",
                    rank,
                    step,
                    self.lease_ttl,
                )
                yield self._pad(last, rank, tail)
            step += 1
        if tail:
            yield self._tail(attempt, epoch, passes, rank, tail, last)

    def _tail(self, attempt: int, epoch: int, passes: int, rank: int, tail: int, last: PoolIndex | None) -> int:
        """The padded last row: ranks below ``tail`` get the real remainder
        (one plan step of ``tail`` ranks), the others repeat a sample."""
        if rank < tail:
            plan = Plan(attempt, epoch, tail, 1, _TAIL_ROUND + passes)
            claim = self.dataset.ledger.claim_step(plan, 0, rank, self.lease_ttl, wait_for_stream=False,
                                                  fence=getattr(self.dataset, "fence", None))
            if claim.status == "ready" and claim.leases:
                return self._index(claim.leases[0])
            log.warning(
                "rank %d: no sample left for the last row of epoch %d (%s); repeating one", rank, epoch, claim.status
            )
            return self._pad(last, rank, tail)
        return self._head_pad(rank - tail)

    def _head_pad(self, position: int) -> PoolIndex:
        """The epoch order's ``position``-th index (wrapping), under no lease:
        ``DistributedSampler``'s padding from the head of the global list."""
        pool = self.dataset
        if not len(pool):
            raise ConfigError("cannot pad from an empty pool: its sample_ids do not match the ledger")
        position %= len(pool)
        if not self.shuffle:
            return pool.padding_index(position)
        return pool.padding_index(self._permutation()[position])

    def _permutation(self) -> list[int]:
        """``DistributedSampler``'s shuffled order of the pool's indices for this epoch."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def _randperm_order(self, plan: Plan) -> None:
        """Give the plan's pending deliveries :meth:`_permutation`'s order (the first rank
        to get here does; the ledger keeps it once per plan). A fresh epoch then hands
        out ``DistributedSampler(shuffle=True)``'s indices exactly; a resumed or
        resharded one, the rest of that permutation."""
        ledger, once = self.dataset.ledger, f"randperm-order/{plan.key}"
        try:
            if ledger.get_meta(once) is not None:
                return
            ids, perm, got = self.dataset.sample_ids, self._permutation(), "stale"
            for _ in range(5):
                pending = [r.sample_id for r in ledger.pending_refs(plan.epoch)]
                live = set(pending)
                order = [ids[i] for i in perm if ids[i] in live]
                placed = set(order)
                order += [s for s in pending if s not in placed]  # committed after the pool was built: last
                got = ledger.order_pending(plan.epoch, order, once)
                if got != "stale":
                    break
            ledger.claim_meta(once, got)  # no rank reorders a plan another may be claiming from
        except NotImplementedError:  # a ledger without ordering: its own seeded hash order
            log.debug("%r cannot reorder pending deliveries; shuffle keeps the ledger's order", ledger)

    def _index(self, lease: Lease) -> PoolIndex:
        return self.dataset.leased_index(lease)

    def _pad(self, last: PoolIndex | None, rank: int, tail: int) -> PoolIndex:
        if last is not None:
            return last
        if not len(self.dataset):
            raise ConfigError("cannot pad from an empty pool: its sample_ids do not match the ledger")
        return self.dataset.padding_index((rank - tail) % len(self.dataset))

    def __repr__(self) -> str:
        return (
            f"ReshardingSampler({self.dataset!r}, num_replicas={self.num_replicas}, rank={self.rank}, "
            f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, epoch={self.epoch})"
        )
