"""What a :class:`~torch_dataflow.acking.StepAcker` reports when training ends:
samples quarantined (never trained) and samples kept for a replay."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["kept_bytes", "report_quarantined", "warn_kept"]

# The acker's logger: these lines are the acker's, whatever module holds them.
log = logging.getLogger("torch_dataflow.acking")


def report_quarantined(datasets: Iterable[Any]) -> int:
    """Log, per ledger (one dataset each), the samples quarantined and so never trained; return how many."""
    total = 0
    for ds in datasets:
        q = ds.ledger.counts().quarantined
        if not q:
            continue
        total += q
        ref, reason = (ds.ledger.quarantined()[:1] or [(None, "")])[0]
        first = f"{ref.sample_id}: {reason}" if ref is not None else reason
        log.error("%d samples of %s are quarantined and were NOT trained (first: %s). See `torch-dataflow "
                  "status %s`; fix the cause (a store whose producer exited, corrupt bytes) and run "
                  "`torch-dataflow requeue %s` to train them", q, ds.ledger.uri, first, ds.ledger.uri,
                  ds.ledger.uri)
    return total


def kept_bytes(datasets: Iterable[Any]) -> int:
    """Samples of online datasets trained after the newest checkpoint and still holding their bytes."""
    return sum(ds.ledger.counts().trained for ds in datasets if getattr(ds, "mode", "offline") == "online")


def warn_kept(datasets: Iterable[Any]) -> int:
    """Log what :func:`kept_bytes` counts, with the ways to free it; return the count."""
    datasets = list(datasets)
    n = kept_bytes(datasets)
    if n:
        ds = datasets[0]
        log.warning(
            "%d samples trained after the newest checkpoint keep their bytes in %s, so a resume from that "
            "checkpoint can train them again. If this run's final state is saved, free them: write one more "
            "checkpoint (Lightning: trainer.save_checkpoint(path) after fit), call finish(saved=True), or run "
            "`torch-dataflow finish %s %s`", n, ds.store.uri, ds.store.uri, ds.ledger.uri)
    return n
