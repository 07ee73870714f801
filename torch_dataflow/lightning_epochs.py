"""Keep Lightning's epoch loop and the ledger in step (used by
:class:`~torch_dataflow.lightning.FeatureAckCallback`).

Three things Lightning does that a ledger-backed source must be told about:

* **The epoch.** Lightning calls ``set_epoch`` on a loader's *sampler* only, and
  only after it has built the loader's first iterator — which, with DataLoader
  workers, already pulls indices (leases) from the sampler. A resumed run in
  epoch ``E > 0`` would lease from epoch 0, and an offline
  :class:`~torch_dataflow.FeatureStoreDataset` never hears of an epoch at all.
  The callback sets the epoch of every source it acks (the dataset itself, and
  every :class:`~torch_dataflow.sampler.ReshardingSampler` of a pool) at fit
  start from the checkpoint being resumed, and at every epoch start.
* **The restored in-epoch batch counter.** A mid-epoch resume restores how many
  batches the epoch had done and ends the epoch when that counter reaches
  ``len(loader)``. ``len(loader)`` is the full epoch
  (``ReshardingSampler.__len__``), and the sampler yields what the ledger has
  left; after a restart with another world size (or samples taken elsewhere)
  ``done + left`` is not ``len(loader)``, so the counter is set to
  ``len(loader) - left`` batches: the epoch ends exactly when the sampler runs
  out, and the last accumulation window still steps.
* Iterable sources (``FeatureStoreDataset``) have no ``len``: Lightning runs
  them until they stop, so only the epoch matters there.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["align_restored_progress", "checkpoint_epoch", "newer_last_files", "set_source_epochs"]


def checkpoint_epoch(ckpt: Mapping[str, Any] | None) -> int:
    """The epoch Lightning will hand to ``set_epoch`` when it resumes ``ckpt``
    (its fit loop's processed-epoch counter; 0 without a checkpoint)."""
    if not ckpt:
        return 0
    try:
        return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(ckpt.get("epoch", 0))


def _samplers(sources: Iterable[Any]) -> list[Any]:
    from .pool import FeaturePool
    from .sampler import samplers_of

    return [s for src in sources if isinstance(src, FeaturePool) for s in samplers_of(src)]


def set_source_epochs(sources: Iterable[Any], epoch: int) -> None:
    """``set_epoch(epoch)`` on every offline dataset in ``sources`` and on every live
    ``ReshardingSampler`` of a pool in ``sources``."""
    from .dataset import FeatureStoreDataset

    sources = list(sources)
    for src in sources:
        if isinstance(src, FeatureStoreDataset) and src.mode == "offline" and src.epoch != epoch:
            src.set_epoch(epoch)
    for sampler in _samplers(sources):
        if sampler.epoch != epoch:
            sampler.set_epoch(epoch)


def _flat_loaders(trainer: Any) -> list[Any]:
    loaders = trainer.train_dataloader
    if loaders is None:
        return []
    if hasattr(loaders, "flattened"):
        return list(loaders.flattened)
    if isinstance(loaders, Mapping):
        return list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    return [loaders]


def _left_batches(loader: Any) -> int | None:
    """Batches ``loader`` will yield in this pass when its sampler is a
    ``ReshardingSampler`` (``None`` for any other loader)."""
    from .sampler import ReshardingSampler

    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)
    if not isinstance(sampler, ReshardingSampler):
        return None
    size = getattr(batch_sampler, "batch_size", None) or getattr(loader, "batch_size", None) or 1
    left = sampler.remaining()
    drop = bool(getattr(batch_sampler, "drop_last", getattr(loader, "drop_last", False)))
    return left // size if drop else math.ceil(left / size)


def align_restored_progress(trainer: Any) -> int | None:
    """After a mid-epoch restore, set the epoch loop's in-epoch batch counter to
    ``len(loader) - batches left`` when the two disagree (call it in
    ``on_train_start``: after Lightning restored and decided its restart stage,
    before the epoch loop resets). Returns the counter it set, else ``None``."""
    epoch_loop = trainer.fit_loop.epoch_loop
    total = trainer.num_training_batches
    if not epoch_loop.restarting or total == float("inf"):
        return None
    total = int(total)
    lefts = [n for n in map(_left_batches, _flat_loaders(trainer)) if n is not None]
    if not lefts:
        return None
    done = max(0, total - max(lefts))
    current = epoch_loop.batch_progress.current
    # The epoch loop's reset() adds one completed batch when the checkpoint was written at
    # a batch end, then sets ready/started/processed to completed: aim at ``done`` after it.
    extra = 1 if epoch_loop.restarted_on_train_batch_end else 0
    if current.completed + extra == done:
        return None
    log.info("resumed mid-epoch: Lightning restored %d done batches of %d, the ledger has %d left per rank; "
             "counting the epoch as %d done so it ends when the sampler does",
             current.completed + extra, total, max(lefts), done)
    current.completed = done - extra
    current.ready = current.started = current.processed = done
    return done


def newer_last_files(ckpt_path: Any) -> list[str]:
    """Lightning "last" files (``last.ckpt``, ``last-v1.ckpt``, ...) next to ``ckpt_path`` and newer
    than it, newest first: after a resume from a step file Lightning writes ``last-v1.ckpt``, and a
    restart from the literal ``last.ckpt`` then starts from an older checkpoint."""
    if not isinstance(ckpt_path, (str, os.PathLike)) or not os.path.isfile(ckpt_path):
        return []
    d, mine = os.path.dirname(os.path.abspath(ckpt_path)), os.path.getmtime(ckpt_path)
    found = []
    for name in os.listdir(d):
        p = os.path.join(d, name)
        if re.fullmatch(r"last(-v?\d+)?\.ckpt", name) and not os.path.samefile(p, ckpt_path):
            t = os.path.getmtime(p)
            if t > mine:
                found.append((t, p))
    return [p for _, p in sorted(found, reverse=True)]
