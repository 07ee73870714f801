"""Training is over: let go of what was kept for a replay that will never come.

While a run trains, the samples acked after its newest checkpoint stay TRAINED
with their bytes in the store: a crash, or a resume from that checkpoint, trains
them again. When the run is over and its final state is saved (the model
exported, or a checkpoint written outside the acker's sight), nothing will
replay them, and they would hold their bytes forever. :func:`finish_training`
makes them DURABLE at the newest trained step and, for an online stream, deletes
their bytes. It is ``torch-dataflow finish STORE LEDGER``, for a run that has
already exited; inside the run, save one more checkpoint (Lightning:
``trainer.save_checkpoint(path)`` after ``fit``) or call
``StepAcker.finish(saved=True)``.

After it, no checkpoint of that run older than its last step is a resume point
(a resume from one raises :class:`~torch_dataflow.errors.CheckpointTooOld`).
It refuses while a trainer session is live on the ledger.

Example:
    >>> import os, tempfile, torch
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
    >>> _ = acker.resume(None)
    >>> for batch in DataLoader(ds, batch_size=2):
    ...     _ = acker.add(batch)
    ...     _ = acker.after_step()
    >>> _ = acker.finish()                 # no checkpoint was written: all 4 stay for a replay
    >>> rep = finish_training(store, ledger)
    >>> rep.made_durable, rep.freed, ds.ledger.counts().trained
    (4, 4, 0)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from .binding import check_store
from .errors import ConfigError, SessionConflict
from .gc import drain_deletes
from .ledger import Ledger, open_ledger
from .stores import FeatureStore, open_store

__all__ = ["MODE_KEY", "FinishReport", "finish_training", "record_mode"]

log = logging.getLogger(__name__)

MODE_KEY = "consumer_mode"  # ledger meta: "online" (bytes freed once durable) or "offline" (kept for every epoch)
MODES = ("online", "offline")


def record_mode(ledger: Ledger, mode: str) -> None:
    """Record how this ledger's consumers use it (first writer wins), so a later
    ``finish`` knows whether durable samples may lose their bytes. Consumers of
    both kinds on one ledger record ``"mixed"``: ``finish`` then needs a mode."""
    if ledger.claim_meta(MODE_KEY, mode) not in (mode, "mixed"):
        ledger.set_meta(MODE_KEY, "mixed")


@dataclass
class FinishReport:
    """What :func:`finish_training` did (or, with ``dry_run``, would do)."""

    step: int | None  # the step everything trained is durable at (None: nothing was ever trained)
    made_durable: int  # TRAINED samples (acked after the newest checkpoint) made DURABLE
    freed: int  # samples whose bytes were released (online)
    queued_left: int  # deletes still queued (a store that refused one; `gc` retries)
    mode: str
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def finish_training(store: str | FeatureStore, ledger: str | Ledger, *, mode: str | None = None,
                    dry_run: bool = False) -> FinishReport:
    """Make every TRAINED sample DURABLE at the newest trained step and, online,
    delete its bytes: the run is over and its final state is saved.

    Args:
        store: the ledger's store (refused if it is another one).
        ledger: the run's ledger.
        mode: ``"online"`` or ``"offline"``; default: what the run's consumer
            recorded. Offline pools keep their bytes for the next epoch.
        dry_run: report what would change; change nothing.

    Raises:
        SessionConflict: a trainer session is live on the ledger (the run is not over).
        ConfigError: the store is not the ledger's, or the mode is unknown.
    """
    own_store, own_ledger = isinstance(store, str), isinstance(ledger, str)
    # A mistyped file:// path must not create a store directory.
    st = (open_store(store, create=False) if store.split("://", 1)[0] == "file" else open_store(store)) \
        if isinstance(store, str) else store
    led = open_ledger(ledger) if isinstance(ledger, str) else ledger
    try:
        return _finish(st, led, mode, dry_run)
    finally:
        if own_ledger:
            led.close()
        if own_store:
            st.close()


def _finish(store: FeatureStore, ledger: Ledger, mode: str | None, dry_run: bool) -> FinishReport:
    check_store(store, ledger, unchanged="Nothing was changed")
    session = ledger.session()
    if session and session.get("live"):
        raise SessionConflict(
            f"ledger {ledger.uri} is held by a live trainer (host {session.get('host')} pid {session.get('pid')}): "
            "finish is for a run that is over. Let the trainer end (its own finish frees what its checkpoints "
            "cover), or stop it first")
    recorded = ledger.get_meta(MODE_KEY)
    mode = mode or recorded
    if mode not in MODES:
        raise ConfigError(
            f"ledger {ledger.uri} does not record whether its consumer ran online or offline"
            f"{'' if recorded is None else f' (it records {recorded!r})'}: pass mode='online' "
            "(--mode online: free the bytes) or mode='offline' (--mode offline: keep them for the next epoch)")
    tail = ledger.counts().trained
    steps = ledger.trained_steps()
    top = max(steps.values(), default=None)
    if not tail and top is not None and not dry_run:
        log.info("%s: every trained sample is already durable", ledger.uri)
    if top is None or dry_run or not tail:
        return FinishReport(step=top, made_durable=tail, freed=0, queued_left=len(ledger.pending_deletes()), mode=mode, dry_run=dry_run)
    online = mode == "online"
    refs = ledger.mark_durable(top, free=online, retain=False)
    freed, left = len(refs), 0
    if online:
        drain_deletes(ledger, store, refs, force=True)
        _, left = drain_deletes(ledger, store, force=True)
    log.info("finished %s: %d trained samples made durable at step %d, %d freed", ledger.uri, tail, top, freed)
    return FinishReport(step=top, made_durable=tail, freed=freed, queued_left=left, mode=mode)
