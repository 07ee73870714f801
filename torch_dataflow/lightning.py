"""Lightning callback: ack each optimizer step's samples, free them once a
checkpoint is written, and reconcile the ledger on resume.

Importing this module imports ``lightning``; ``import torch_dataflow`` does not.

Example:
    >>> import lightning as L  # doctest: +SKIP
    >>> from torch_dataflow import FeatureLoader, FeatureStoreDataset
    >>> from torch_dataflow.lightning import FeatureAckCallback
    >>> ds = FeatureStoreDataset("file:///data/feats", "sqlite:///data/ledger.db", batch_size=8)  # doctest: +SKIP
    >>> trainer = L.Trainer(accumulate_grad_batches=4, callbacks=[FeatureAckCallback(ds),  # doctest: +SKIP
    ...                     L.pytorch.callbacks.ModelCheckpoint(every_n_train_steps=100, save_last=True)])
    >>> trainer.fit(model, FeatureLoader(ds, batch_size=8, num_workers=2), ckpt_path="last")  # doctest: +SKIP

How it keeps training exactly-once (DESIGN invariant 2):

* **Ack on the optimizer step.** Lease ids of every batch are collected in
  ``on_train_batch_start``; in ``on_train_batch_end`` they are acked with
  ``trainer.global_step`` *if it advanced* during the batch, i.e. an optimizer
  step really happened (``accumulate_grad_batches``: every k-th batch and the
  epoch's last; manual optimisation: whenever ``opt.step()`` ran, ``global_step``
  counting every optimizer's steps). Until then they stay collected (and are
  renewed if ``renew_every`` is set).
* **Ack before the checkpoint.** ``ModelCheckpoint`` runs after every other
  callback, so the ack of step ``S`` is in the ledger before the checkpoint of
  ``S`` is dumped; :meth:`FeatureAckCallback.state_dict` acks anything still
  owed, and with several ranks ``on_save_checkpoint`` holds a barrier so every
  rank's acks land before rank 0 writes the file.
* **Durable only after the file is complete.** ``on_save_checkpoint`` runs
  *before* the file exists, so marking durable there would free samples whose
  checkpoint may never be written. Instead the strategy's ``CheckpointIO`` is
  wrapped: when its ``save_checkpoint`` returns (Lightning writes atomically
  through a temporary file), the file is ``fsync``-ed and the ledger marks
  everything trained at or before that checkpoint's step DURABLE. A crash
  before that point leaves the samples TRAINED, and the resume's
  ``reconcile(step)`` makes exactly the covered ones durable. With
  ``AsyncCheckpointIO`` the wrapped base IO reports from its thread and the
  mark happens at the next hook in the main thread.
* **Reconcile once on resume.** In ``on_fit_start`` (after the checkpoint's
  callback state is restored, before the fit loop fetches its first batch,
  which it does *before* ``on_train_start``) rank 0 calls
  ``reconcile(step of the checkpoint)`` — or ``reconcile(None)`` on a fresh
  start — and every rank waits at a barrier. Resume from the *newest*
  checkpoint: samples made durable by a newer one are not trained again.
* **Epochs and the in-epoch batch counter** (:mod:`torch_dataflow.lightning_epochs`):
  every source gets the resumed epoch at fit start and each epoch's number at
  its start; after a mid-epoch restore, Lightning's batch counter is set so the
  epoch ends when the ``ReshardingSampler`` runs out (``len(loader)`` is the
  whole epoch); an epoch that ends inside an accumulation window gives that
  window's leases back instead of acking them with the next epoch's step.
  ``ReshardingSampler`` is a ``DistributedSampler``: Lightning's default
  ``use_distributed_sampler=True`` leaves it in place.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from . import _acking_end
from .acking import Datasets, StepAcker
from .errors import CheckpointTooOld
from .lightning_checkpoint import _DurableCheckpointIO
from .lightning_epochs import align_restored_progress, checkpoint_epoch, newer_last_files, set_source_epochs
from .lightning_samplers import _refuse_wrapped_sampler, _reset_resharded_progress
from .lightning_stats import TrainerStats

__all__ = ["FeatureAckCallback"]

log = logging.getLogger(__name__)


class FeatureAckCallback(Callback):
    """Acks the samples of every optimizer step; frees them once a checkpoint
    covering the step is written; reconciles the ledger when training resumes.

    Args:
        datasets: the :class:`~torch_dataflow.FeatureStoreDataset` the train
            loader reads, or a list/dict of them matching a ``CombinedLoader``'s
            batch (see :class:`~torch_dataflow.acking.StepAcker`).
        free: ``"checkpoint"`` (default): bytes are freed when a checkpoint
            covering the step is complete; a crash replays every sample trained
            after the last checkpoint. ``"step"``: durable and freed right after
            the optimizer step (lower memory; samples trained after the last
            checkpoint are *not* replayed: their effect is lost in a crash).
        strict: raise ``LeaseLost`` if a lease expired before its ack.
        renew_every: renew leases held across batches after this many seconds.
        fsync: ``fsync`` a local checkpoint file before marking durable.
        log_stats: log ``dataflow/data_wait_s``, ``dataflow/data_wait_fraction``,
            ``dataflow/samples_per_s`` and ``dataflow/ledger_lag`` with ``self.log``
            every batch (:mod:`torch_dataflow.lightning_stats`); ``False`` turns it off.
        takeover: fence a trainer session still live on the ledger instead of
            refusing to start (:class:`~torch_dataflow.errors.SessionConflict`).

    The bytes of samples trained after the *previous* checkpoint are kept until
    the next one (a resume from ``last.ckpt`` that a crash left one checkpoint
    old still replays what it lacks); a resume from a checkpoint older than that
    raises :class:`~torch_dataflow.errors.CheckpointTooOld`. At the end of
    ``fit`` the kept bytes are freed and the ledger's session ends.

    Example:
        >>> from torch_dataflow import FeatureStoreDataset
        >>> cb = FeatureAckCallback(FeatureStoreDataset("memory://cb-doc", "memory://cb-doc"))
        >>> cb.state_key
        'FeatureAckCallback'
    """

    def __init__(self, datasets: Datasets, *, free: str = "checkpoint", strict: bool = False,
                 renew_every: float | None = None, fsync: bool = True, takeover: bool = False,
                 log_stats: bool = True) -> None:
        super().__init__()
        self.acker = StepAcker(datasets, free=free, strict=strict, renew_every=renew_every, takeover=takeover)
        self.fsync = fsync
        self._trainer: pl.Trainer | None = None
        self._loaded: Mapping[str, Any] | None = None
        self._ckpt_epoch = 0
        self._seen_step = 0
        self._main = threading.get_ident()
        self._lock = threading.Lock()
        self._written_steps: list[int] = []
        self._in_topk = False
        self.written: list[int] = []  # steps of checkpoints seen complete (rank 0)
        first = next(iter(self.acker._by_ledger.values()))
        self.stats = TrainerStats(first.ledger) if log_stats else None

    # ------------------------------------------------------------ setup / resume
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        self._main = threading.get_ident()
        self.acker.rank = trainer.global_rank
        self.acker.barrier = lambda: trainer.strategy.barrier("torch_dataflow.reconcile")
        self._wrap_checkpoint_io(trainer)
        self._watch_topk(trainer)

    def _wrap_checkpoint_io(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        io = strategy.checkpoint_io
        if isinstance(io, _DurableCheckpointIO):
            io.callback = self
            return
        inner = getattr(io, "checkpoint_io", None)
        if inner is not None and hasattr(io, "_checkpoint_io"):
            # A wrapping IO (AsyncCheckpointIO): the base IO is what writes the file.
            if not isinstance(inner, _DurableCheckpointIO):
                io._checkpoint_io = _DurableCheckpointIO(inner, self)
            return
        strategy.checkpoint_io = _DurableCheckpointIO(io, self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The fit loop fetches its first batch before ``on_train_start``: reconcile here.
        if not self.acker.resumed:
            try:
                self.acker.resume(**self._resume_args(trainer))
            except CheckpointTooOld as e:
                newer = newer_last_files(trainer.ckpt_path)
                if not newer:
                    raise
                # Lightning writes "last-v1.ckpt" (not "last.ckpt") after a resume from a step file
                raise CheckpointTooOld(
                    f"{e} A newer last checkpoint sits next to {trainer.ckpt_path}: {', '.join(newer)} — resume "
                    "from it, or pass ckpt_path=\"last\" (Lightning picks the newest last*.ckpt)",
                    e.needed_step, e.newest_step) from e
        # Lightning builds the loader's first iterator (with workers: leases) before it calls
        # set_epoch, and never tells a dataset: give every source the epoch being resumed now.
        set_source_epochs(self.acker.datasets, self._ckpt_epoch)

    def _resume_args(self, trainer: pl.Trainer) -> dict[str, Any]:
        self._ckpt_epoch = 0
        if trainer.ckpt_path is None:
            return {"step": None} if self._loaded is None else {"from_state": self._loaded}
        # Strategies that restore after setup (DeepSpeed, FSDP) have not loaded our state yet.
        ckpt = getattr(trainer._checkpoint_connector, "_loaded_checkpoint", None) or \
            trainer.strategy.load_checkpoint(trainer.ckpt_path)
        self._ckpt_epoch = checkpoint_epoch(ckpt)
        if self._loaded is not None:
            return {"from_state": self._loaded}
        state = (ckpt.get("callbacks") or {}).get(self.state_key)
        if state is not None:
            return {"from_state": state}
        log.warning("checkpoint %s has no %s state: resuming the ledger at its global_step %s",
                    trainer.ckpt_path, self.state_key, ckpt.get("global_step"))
        return {"step": int(ckpt["global_step"])}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _refuse_wrapped_sampler(trainer)
        _reset_resharded_progress(trainer)
        if self.acker.step != trainer.global_step:
            log.warning("ledger step %d differs from trainer.global_step %d", self.acker.step, trainer.global_step)
            self.acker.step = trainer.global_step
        self._seen_step = trainer.global_step
        # Loops are restored now: the epoch Lightning resumes, and its in-epoch batch counter
        # set to what the ledger has left (len(loader) is the whole epoch).
        set_source_epochs(self.acker.datasets, trainer.fit_loop.epoch_progress.current.processed)
        align_restored_progress(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning sets the epoch of samplers only; an offline FeatureStoreDataset needs it too.
        set_source_epochs(self.acker.datasets, trainer.fit_loop.epoch_progress.current.processed)

    # ------------------------------------------------------------ batches
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._drain()
        self.acker.add(batch)
        if self.stats is not None:
            self.stats.start(batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._sync(trainer):
            self.acker.keep_alive()
        self._drain()
        if self.stats is not None:
            for name, value in self.stats.end().items():
                pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)

    def _sync(self, trainer: pl.Trainer) -> bool:
        """Ack what was collected if an optimizer step happened since the last ack."""
        step = trainer.global_step
        if step <= self._seen_step:
            return False
        self._seen_step = step
        if self.acker.pending():
            self.acker.after_step(step)
        else:
            self.acker.step = step
        return True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(trainer)
        if pl_module.automatic_optimization and self.acker.pending():
            # The loader stopped before len(loader) (the sampler had less left than a whole epoch)
            # inside an accumulation window: Lightning never steps it and zeroes its gradients at
            # the next epoch's first batch. Acking these at the next step would be a false ack.
            n = self.acker.release("the epoch ended before their accumulation window reached an optimizer step")
            log.warning("epoch %d ended inside an accumulation window: %d samples that no optimizer step "
                        "used were given back (PENDING), not acked", trainer.current_epoch, n)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(trainer)
        if self.acker.pending():
            n = self.acker.release("training ended before an optimizer step used them")
            log.info("gave back %d leases whose batches never reached an optimizer step", n)
        self._drain()
        trainer.strategy.barrier("torch_dataflow.finish")
        # Free what was kept for a resume from an older checkpoint; end the session. What stays for a
        # resume from the newest one is reported at teardown: ModelCheckpoint's own on_train_end (it runs
        # after this callback) may still write a last checkpoint that frees it.
        self.acker.finish(warn=False)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self._trainer is not None:
            self._sync(self._trainer)  # the checkpoint's step must be acked before it is written
        return self.acker.state_dict()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Every rank's acks of the steps in this checkpoint precede rank 0's write.
        trainer.strategy.barrier("torch_dataflow.acks")

    def _resumable(self, path: Any) -> bool:
        """Whether a resume would pick the file being written: a top-k file that a
        ``ModelCheckpoint(save_last=...)`` writes just before its ``last`` file does
        not count (its ``last`` file will); every other save does."""
        return not self._in_topk

    def _watch_topk(self, trainer: pl.Trainer) -> None:
        """Flag the top-k writes of every ``ModelCheckpoint`` that also saves ``last``."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        for cb in trainer.callbacks:
            if not isinstance(cb, ModelCheckpoint) or not cb.save_last:
                continue
            cb._td_owner = self  # type: ignore[attr-defined]  # the callback of the current fit
            if getattr(cb, "_td_watched", False):
                continue
            inner = cb._save_topk_checkpoint

            def topk(*args: Any, _inner: Any = inner, _cb: Any = cb, **kwargs: Any) -> Any:
                owner = _cb._td_owner
                owner._in_topk = True
                try:
                    return _inner(*args, **kwargs)
                finally:
                    owner._in_topk = False

            cb._save_topk_checkpoint = topk  # type: ignore[method-assign]
            cb._td_watched = True  # type: ignore[attr-defined]

    def _written(self, step: int) -> None:
        if threading.get_ident() == self._main:
            self._mark(step)
        else:
            with self._lock:
                self._written_steps.append(step)

    def _drain(self) -> None:
        if self._written_steps:
            with self._lock:
                steps, self._written_steps = self._written_steps, []
            for step in steps:
                self._mark(step)

    def _mark(self, step: int) -> None:
        freed = self.acker.checkpoint_written(step)
        self.written.append(step)
        log.debug("checkpoint at step %d written: %d samples freed", step, freed)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._drain()
        if stage == "fit" and self.acker.finished and trainer.global_rank == 0:
            # a trainer.save_checkpoint after fit frees what is kept: warn at exit if none did
            _acking_end.warn_kept_at_exit(self.acker._by_ledger.values())
