"""Ack the samples of each optimizer step from a hand-written PyTorch loop.

:class:`StepAcker` is the plain-PyTorch form of the Lightning and Fabric
callbacks (:mod:`torch_dataflow.lightning`, :mod:`torch_dataflow.fabric`),
which are built on it. The rules that make training exactly-once:

1. **Collect** the lease ids of every batch that goes into the next optimizer
   step (:meth:`StepAcker.add`); ids travel inside the batch, so DataLoader
   workers need nothing special.
2. **Ack after the step** with its number (:meth:`StepAcker.after_step`, or
   the :meth:`StepAcker.stepping` context manager around ``optimizer.step()``):
   the samples become TRAINED at that step. A crash before the ack leaves them
   LEASED and they are trained again; that is right, because the step died
   with the process too.
3. **Checkpoint after the ack**, store :meth:`StepAcker.state_dict` in it, and
   call :meth:`StepAcker.checkpoint_written` once the file is complete (after
   an atomic rename, not before): samples trained at or before that step
   become DURABLE and, online, their bytes are freed.
4. **Resume** with :meth:`StepAcker.resume` (one process, before any loader
   leases; every rank passes the barrier): TRAINED after the checkpoint's step
   is trained again, everything else is not.

Example:
    >>> import tempfile, torch
    >>> from torch.utils.data import DataLoader
    >>> from torch_dataflow import FeatureStoreDataset, FeatureWriter
    >>> from torch_dataflow.acking import StepAcker
    >>> d = tempfile.mkdtemp()
    >>> store, ledger = f"file://{d}/s", f"sqlite://{d}/l.db"
    >>> with FeatureWriter(store, ledger) as w:
    ...     for i in range(4):
    ...         _ = w.put(f"s{i}", {"x": torch.ones(2) * i})
    >>> ds = FeatureStoreDataset(store, ledger, batch_size=2)
    >>> acker = StepAcker(ds)
    >>> _ = acker.resume(None)             # fresh start: nothing to resume from
    >>> for batch in DataLoader(ds, batch_size=2):
    ...     _ = acker.add(batch)           # forward/backward on the batch here
    ...     with acker.stepping():         # optimizer.step() inside
    ...         pass
    >>> acker.step, ds.ledger.counts().trained
    (2, 4)
    >>> acker.checkpoint_written(acker.step)   # after the checkpoint file is complete: how many freed
    0
    >>> ds.ledger.counts().durable             # kept until a newer checkpoint (ledger.retention)
    4
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from . import _acking_end
from ._batch_leases import find_lease_ids, has_lease_key  # re-exported: find_lease_ids is public here
from .dataset import LEASE_KEY, FeatureStoreDataset
from .errors import ConfigError, LeaseLost
from .lease_owner import lost_message
from .ledger import ReconcileReport
from .ledger.base import check_step
from .pool import FeaturePool

__all__ = ["FREE_MODES", "StepAcker", "find_lease_ids"]

log = logging.getLogger(__name__)

FREE_MODES = ("checkpoint", "step")
_STATE_VERSION = 1


Datasets = FeatureStoreDataset | Sequence[FeatureStoreDataset] | Mapping[str, FeatureStoreDataset]


_SOURCES = (FeatureStoreDataset, FeaturePool)


class StepAcker:
    """Acks, checkpoint bookkeeping and resume for one training process.

    Args:
        datasets: one :class:`~torch_dataflow.FeatureStoreDataset`, a list, or a
            dict. With several datasets the batch is routed by position (list:
            the batch is a list/tuple in the same order) or by key (dict: the
            batch is a dict with the same keys), as ``CombinedLoader`` yields
            them; datasets sharing one ledger need no routing.
        free: ``"checkpoint"`` (default): bytes are freed when a checkpoint
            covering the step is written, and a crash replays every sample
            after the last checkpoint. ``"step"``: samples are made durable and
            freed right after their optimizer step: lower memory, but the
            samples trained after the last checkpoint are *not* replayed after a
            crash (their effect is lost with the process: at most once).
        strict: raise :class:`~torch_dataflow.errors.LeaseLost` when an ack
            finds a lease that expired and was given to another consumer
            (default: log an error and count it in :attr:`lost`).
        renew_every: seconds after which leases held across several batches
            (gradient accumulation, a skipped manual step) are renewed.
        rank: this process's global rank (only rank 0 reconciles).
        barrier: called after the reconcile on every rank (``dist.barrier``
            with several ranks); ``None``: ``torch.distributed.barrier`` when
            a process group is initialised.
        takeover: :meth:`resume` fences a trainer session that is still live on
            the ledger instead of refusing with
            :class:`~torch_dataflow.errors.SessionConflict` (use it when the old
            job is known to be gone, or must be stopped).
        session_name: the name recorded in the ledger's session (status, errors).

    Attributes:
        step: the last optimizer step acked (or resumed from).
        acked: samples acked by this process. lost: leases lost at ack.
    """

    def __init__(self, datasets: Datasets, *, free: str = "checkpoint", strict: bool = False,
                 renew_every: float | None = None, rank: int | None = None,
                 barrier: Callable[[], None] | None = None, takeover: bool = False,
                 session_name: str | None = None) -> None:
        if free not in FREE_MODES:
            raise ConfigError(f"free must be one of {FREE_MODES}, got {free!r}")
        if isinstance(datasets, _SOURCES):
            self._routes: dict[Any, FeatureStoreDataset] = {None: datasets}
        elif isinstance(datasets, Mapping):
            self._routes = dict(datasets)
        elif isinstance(datasets, Sequence) and not isinstance(datasets, str):
            self._routes = dict(enumerate(datasets))
        else:
            raise ConfigError("expected a FeatureStoreDataset or FeaturePool, a list or a dict of them, "
                              f"got {type(datasets).__name__}")
        if not self._routes or not all(isinstance(d, _SOURCES) for d in self._routes.values()):
            raise ConfigError("every dataset given to an acker must be a FeatureStoreDataset or a FeaturePool")
        # One representative per ledger: durable/reconcile act on a whole ledger.
        self._by_ledger: dict[str, FeatureStoreDataset] = {}
        for ds in self._routes.values():
            self._by_ledger.setdefault(ds.ledger.uri, ds)
        self._route = len(self._by_ledger) > 1
        self.free = free
        self.strict = strict
        self.renew_every = renew_every
        self.rank = rank
        self.barrier = barrier
        self.takeover = takeover
        self.session_name = session_name
        self.finished = False
        self.step = 0
        self.acked = 0
        self.lost = 0
        self.durable_step: int | None = None
        self.resumed = False
        self._pending: dict[Any, list[str]] = {}
        self._pending_since: float | None = None

    # ------------------------------------------------------------ collecting
    @property
    def datasets(self) -> list[FeatureStoreDataset]:
        """The datasets (or pools) this acker routes acks to, as it was given them."""
        return list(self._routes.values())

    def pending(self) -> list[str]:
        """Lease ids collected since the last ack."""
        return [lid for ids in self._pending.values() for lid in ids]

    def add(self, batch: Any) -> int:
        """Collect the lease ids of a batch that will go into the next optimizer
        step. Returns how many were found (a batch without any is an error: its
        collate function dropped the ``"__lease__"`` entry)."""
        parts: list[tuple[Any, Any]]
        if not self._route:
            parts = [(next(iter(self._routes)), batch)]
        elif isinstance(batch, Mapping) and set(self._routes) <= set(batch):
            parts = [(k, batch[k]) for k in self._routes]
        elif isinstance(batch, (list, tuple)) and len(batch) == len(self._routes):
            parts = list(enumerate(batch))
        else:
            raise ConfigError(f"cannot route a {type(batch).__name__} batch to datasets {list(self._routes)}: "
                              "give a dict/list batch matching the datasets")
        n = 0
        for key, part in parts:
            ids = find_lease_ids(part)
            self._pending.setdefault(key, []).extend(ids)
            n += len(ids)
        if n == 0 and not has_lease_key(batch):  # only padding (ReshardingSampler, drop_last=False): fine
            raise ConfigError(f"batch carries no {LEASE_KEY!r} entries: does its collate function drop '__' keys?")
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        return n

    def keep_alive(self) -> int:
        """Renew the collected leases if they have waited longer than
        ``renew_every`` (call between batches of an accumulation window).
        Returns how many were lost."""
        if self.renew_every is None or self._pending_since is None:
            return 0
        if time.monotonic() - self._pending_since < self.renew_every:
            return 0
        lost = 0
        for key, ids in self._pending.items():
            if ids:
                lost += len(self._routes[key].renew(ids))
        self._pending_since = time.monotonic()
        return lost

    # ------------------------------------------------------------ steps
    def after_step(self, step: int | None = None) -> int:
        """Ack everything collected with optimizer step ``step`` (default: the
        last step + 1). Call it after ``optimizer.step()`` returned and before a
        checkpoint of that step is written. Returns how many were acked."""
        step = self.step + 1 if step is None else check_step(step)
        if step < self.step:
            raise ConfigError(f"step {step} is before the last acked step {self.step}: steps must not go back")
        n = 0
        errors: list[Exception] = []
        for key, ids in self._pending.items():
            ids = list(dict.fromkeys(ids))  # a padded repeat of a lease in the same step is acked once
            if not ids:
                continue
            ds = self._routes[key]
            lost = ds.ack(ids, step)
            n += len(ids) - len(lost)
            if lost:
                msg, foreign = lost_message(ds.ledger, lost, len(ids), step)
                if foreign:  # a misconfiguration, not an expiry: always an error
                    errors.append(ConfigError(msg))
                    continue
                self.lost += len(lost)
                if self.strict:
                    errors.append(LeaseLost(msg))
                    continue
                log.error(msg)
        self._pending.clear()
        self._pending_since = None
        self.step = step
        self.acked += n
        if errors:
            raise errors[0]
        for ds in self._routes.values():
            ds._maybe_beat()
        if self.free == "step":
            self._mark_durable(step)
        return n

    @contextmanager
    def stepping(self, step: int | None = None) -> Iterator[int]:
        """Context manager around ``optimizer.step()``: acks when the block
        exits normally (not if it raised: the step did not happen). Yields the
        step number that will be acked."""
        step = self.step + 1 if step is None else check_step(step)
        yield step
        self.after_step(step)

    def release(self, reason: str = "released") -> int:
        """Give collected-but-unstepped leases back (end of training with an
        incomplete accumulation window) so they are delivered again at once."""
        n = 0
        for key, ids in self._pending.items():
            if ids:
                n += len(ids) - len(self._routes[key].fail(ids, retryable=True, reason=reason))
        self._pending.clear()
        self._pending_since = None
        return n

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must carry: the step its model state covers."""
        return {"version": _STATE_VERSION, "step": self.step, "free": self.free, "acked": self.acked,
                "ledgers": self._ledger_ids()}

    def _ledger_ids(self) -> list[str]:
        """The run ids of this acker's ledgers (claimed once per ledger, then cached)."""
        cache = self.__dict__.setdefault("_ids", {})
        for key, ds in self._by_ledger.items():
            if key not in cache:
                cache[key] = ds.ledger.claim_meta("ledger_run_id", uuid.uuid4().hex)
        return sorted(cache[k] for k in self._by_ledger)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :attr:`step` from a checkpoint (does not reconcile: see :meth:`resume`)."""
        if int(state.get("version", 0)) != _STATE_VERSION:
            raise ConfigError(f"acker state version {state.get('version')!r} is not {_STATE_VERSION}")
        theirs = state.get("ledgers")
        if theirs is not None and sorted(theirs) != self._ledger_ids():
            uris = ", ".join(ds.ledger.uri for ds in self._by_ledger.values())
            raise ConfigError(
                f"this checkpoint was written by a run on another ledger (run ids {sorted(theirs)}), not on {uris} "
                f"(run ids {self._ledger_ids()}): resuming it here would skip or retrain samples. Point the run at "
                "the checkpoint's ledger, or start without this checkpoint (e.g. a stale relative ckpt_path)")
        self.step = int(state["step"])
        self.acked = int(state.get("acked", 0))

    def checkpoint_written(self, step: int | None = None) -> int:
        """A checkpoint covering ``step`` (default :attr:`step`) is complete on
        disk: samples trained at or before it become DURABLE; online, their
        bytes are freed. Call it on one rank, only after the file is whole
        (rename-on-complete), never before. Returns how many were freed."""
        return self._mark_durable(self.step if step is None else int(step))

    def _mark_durable(self, step: int) -> int:
        final = self.finished or self.free == "step"  # at most once: nothing is kept for a resume
        freed = sum(ds.mark_durable(step, final=final) or 0 for ds in self._by_ledger.values())
        self.durable_step = step if self.durable_step is None else max(self.durable_step, step)
        return freed

    def resume(self, step: int | None = None, *, from_state: Mapping[str, Any] | None = None) -> ReconcileReport | None:
        """Apply the restart rule once, before any loader leases: rank 0 calls
        ``reconcile(step)`` on every ledger (``None``: no checkpoint, so every
        TRAINED sample is trained again), then every rank waits at the barrier.

        Args:
            step: the step of the checkpoint being resumed (``None``: none).
            from_state: a :meth:`state_dict` from that checkpoint (its step wins).

        Returns:
            The reconcile report of the first ledger (rank 0), else ``None``.
        """
        if from_state is not None:
            self.load_state_dict(from_state)
            step = self.step
        elif step is not None:
            self.step = int(step)
        if self.resumed:
            raise ConfigError("resume() runs once per training run, before any loader leases")
        self.resumed = True
        report = None
        rank = self._rank()
        if rank == 0:
            session = {"name": self.session_name or f"{socket.gethostname()}:{os.getpid()}",
                       "world": self._world()}
            for ds in self._by_ledger.values():
                r = ds.reconcile(step, session=session, takeover=self.takeover, strict=self.free != "step")
                report = report or r
                log.info("reconciled %s at step %s: %s replayed, %s durable, %s released", ds.ledger.uri, step,
                         r.replayed, r.durable, r.released)
        self._barrier()
        for ds in self._routes.values():  # every rank, every dataset: one session per ledger
            if ds.fence is None or rank != 0:
                ds.join_session()
        return report

    def finish(self, *, saved: bool = False, warn: bool = True) -> int:
        """Training is over: free what was kept for a resume from an older checkpoint
        and end the session, so the next trainer needs no takeover. Later
        checkpoint marks free at once. Returns how many samples were freed.

        Samples trained after the newest checkpoint keep their bytes (a resume
        from that checkpoint trains them again) unless ``saved``: this run's
        final state is saved (the model exported after its last step), so they
        become durable at :attr:`step` and are freed too. ``warn``: log how many
        were kept and how to free them (:func:`~torch_dataflow.finish.finish_training`)."""
        self.finished = True
        freed = 0
        if self._rank() == 0:
            for ds in self._by_ledger.values():
                marks = ds.ledger.checkpoints()
                top = max([*marks, self.step]) if saved else max(marks, default=None)
                if top is not None:
                    freed += ds.mark_durable(top, final=True) or 0
            if warn:
                self.warn_kept()
            self._report_quarantined()
        for ds in self._routes.values():
            ds.close_session()
        return freed

    def _report_quarantined(self) -> int:
        """Log, at the end of training, the samples that were quarantined and so never trained."""
        return _acking_end.report_quarantined(self._by_ledger.values())

    def kept(self) -> int:
        """Samples of online datasets trained after the newest checkpoint and still
        holding their bytes for a replay (rank 0 after :meth:`finish`)."""
        return _acking_end.kept_bytes(self._by_ledger.values())

    def warn_kept(self) -> int:
        """Log what :meth:`kept` counts, with the ways to free it; returns the count."""
        return _acking_end.warn_kept(self._by_ledger.values())

    def _world(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    # ------------------------------------------------------------ ranks
    def _rank(self) -> int:
        if self.rank is not None:
            return self.rank
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def _barrier(self) -> None:
        if self.barrier is not None:
            self.barrier()
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
