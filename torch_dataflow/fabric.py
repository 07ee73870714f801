"""Lightning Fabric callback: ack each optimizer step's samples.

Fabric calls ``on_after_optimizer_step(strategy=, optimizer=)`` on its callbacks
after every ``optimizer.step()`` of an optimizer returned by
``fabric.setup``; :class:`FabricFeatureAck` acks there what :meth:`add`
collected. Fabric has no batch or checkpoint hooks, so the loop calls
:meth:`FabricFeatureAck.add` per batch, and :meth:`FabricFeatureAck.save` /
:meth:`FabricFeatureAck.load` around ``fabric.save`` / ``fabric.load``. The
semantics are :class:`~torch_dataflow.acking.StepAcker`'s. Importing this
module does not import lightning.

Example:
    >>> import lightning as L  # doctest: +SKIP
    >>> ack = FabricFeatureAck(ds)  # doctest: +SKIP
    >>> fabric = L.Fabric(accelerator="cpu", callbacks=[ack])  # doctest: +SKIP
    >>> model, opt = fabric.setup(model, opt)  # doctest: +SKIP
    >>> state = {"model": model, "opt": opt, "ack": ack}  # doctest: +SKIP
    >>> ack.load(fabric, "ckpt/last.ckpt", state)  # reconciles; no file: a fresh start  # doctest: +SKIP
    >>> for i, batch in enumerate(loader):  # doctest: +SKIP
    ...     ack.add(batch)
    ...     fabric.backward(model(batch["x"]).mean())
    ...     if (i + 1) % 4 == 0:
    ...         opt.step(); opt.zero_grad()     # acked here, with step ack.step
    ...     if ack.step and ack.step % 100 == 0:
    ...         ack.save(fabric, "ckpt/last.ckpt", state)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .acking import Datasets, StepAcker
from .ledger import ReconcileReport
from .lightning_stats import TrainerStats

__all__ = ["FabricFeatureAck"]


class FabricFeatureAck:
    """A Fabric callback that acks the collected samples at each optimizer step.

    Every ``optimizer.step()`` counts as one step (several optimizers: several
    steps, as Lightning's ``global_step`` counts them); the samples collected
    since the last step are acked with the new step number.

    Args:
        datasets: as for :class:`~torch_dataflow.acking.StepAcker`.
        free: ``"checkpoint"`` or ``"step"`` (see ``StepAcker``).
        strict: raise ``LeaseLost`` if a lease expired before its ack.
        renew_every: renew leases held across batches after this many seconds.
        log_stats: at each optimizer step, log ``dataflow/data_wait_s`` (the wait for
            the step's first batch), ``dataflow/data_wait_fraction``,
            ``dataflow/samples_per_s`` and ``dataflow/ledger_lag`` with
            ``fabric.log_dict`` (any Fabric logger; the Fabric given to
            :meth:`begin` or :meth:`load`). ``False`` turns it off.

    Example:
        >>> from torch_dataflow import FeatureStoreDataset
        >>> ack = FabricFeatureAck(FeatureStoreDataset("memory://fa-doc", "memory://fa-doc"))
        >>> ack.state_dict()["step"]
        0
    """

    def __init__(self, datasets: Datasets, *, free: str = "checkpoint", strict: bool = False,
                 renew_every: float | None = None, takeover: bool = False, log_stats: bool = True) -> None:
        self.acker = StepAcker(datasets, free=free, strict=strict, renew_every=renew_every, takeover=takeover)
        self.stats = TrainerStats(self.acker.datasets[0].ledger) if log_stats else None
        self._fabric: Any = None
        self._in_step = False  # a batch of the coming optimizer step was added

    @property
    def step(self) -> int:
        """The last optimizer step (acked or resumed from)."""
        return self.acker.step

    def add(self, batch: Any) -> int:
        """Collect the lease ids of a batch that goes into the next optimizer step."""
        self.acker.keep_alive()
        if self.stats is not None:
            if self._in_step:
                self.stats.more(batch)
            else:
                self.stats.start(batch)  # the step's first batch: its wait is the step's data wait
                self._in_step = True
        return self.acker.add(batch)

    def on_after_optimizer_step(self, strategy: Any = None, optimizer: Any = None) -> None:
        """Fabric's hook: the step happened; ack what was collected (and log the step's stats)."""
        self.acker.after_step()
        if self.stats is not None and self._in_step:
            self._in_step = False
            values = self.stats.end()
            if self._fabric is not None:
                self._fabric.log_dict(values, step=self.step)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return self.acker.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.acker.load_state_dict(state)

    def save(self, fabric: Any, path: str | os.PathLike[str], state: dict[str, Any]) -> int:
        """``fabric.save(path, state)`` (put this callback in ``state``), then
        mark the samples it covers durable. A barrier first makes every rank's
        acks land before rank 0 writes; Fabric writes atomically and returns
        after the file is complete. Returns how many samples were freed."""
        fabric.barrier()
        fabric.save(path, state)
        return self.acker.checkpoint_written() if fabric.global_rank == 0 else 0

    def load(self, fabric: Any, path: str | os.PathLike[str] | None, state: dict[str, Any]) -> dict[str, Any]:
        """``fabric.load(path, state)`` if the file exists (this callback in
        ``state`` restores its step), then :meth:`begin`. Returns what
        ``fabric.load`` did not restore."""
        rest: dict[str, Any] = {}
        resumed = path is not None and os.path.exists(path)
        if resumed:
            rest = fabric.load(path, state)
        self.begin(fabric, resumed=resumed)
        return rest

    def begin(self, fabric: Any, *, resumed: bool) -> ReconcileReport | None:
        """Reconcile once before any loader leases: rank 0 runs
        ``reconcile(step)`` (``None`` when not resumed), every rank waits."""
        self.acker.rank = fabric.global_rank
        self.acker.barrier = fabric.barrier
        self._fabric = fabric
        return self.acker.resume(self.acker.step if resumed else None)

    def finish(self, *, saved: bool = False) -> int:
        """Training is over: see :meth:`~torch_dataflow.StepAcker.finish` (call on every rank;
        ``saved``: the final state is saved, so the steps after the newest checkpoint are freed too)."""
        return self.acker.finish(saved=saved)
