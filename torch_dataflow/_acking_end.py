"""What a :class:`~torch_dataflow.acking.StepAcker` reports when training ends:
samples quarantined (never trained) and samples kept for a replay."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

__all__ = ["kept_bytes", "report_quarantined", "warn_kept", "warn_kept_at_exit"]

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


def _interactive() -> bool:
    """A REPL (``sys.ps1``) or an IPython / Jupyter kernel."""
    ipython = sys.modules.get("IPython")
    return hasattr(sys, "ps1") or (ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None)


def warn_kept_at_exit(datasets: Iterable[Any]) -> int:
    """At the end of ``fit``: what :func:`kept_bytes` counts may still be freed by a checkpoint the
    script writes after ``fit`` (``trainer.save_checkpoint``), so say it at INFO now and warn (as
    :func:`warn_kept` does) only if the bytes are still kept when the process exits. In a notebook or a
    REPL, whose exit nobody watches, warn at once instead. Returns the count now."""
    datasets = list(datasets)
    if _interactive():  # a notebook or a REPL: its exit is the kernel's shutdown, where nobody reads a log
        return warn_kept(datasets)
    n = kept_bytes(datasets)
    if not n:
        return 0
    log.info("%d samples trained after the newest checkpoint keep their bytes for a resume from it; a "
             "checkpoint written after fit frees them (if none is, a warning says how at exit)", n)
    # What the check at exit reads: the ledgers (held, small), not the datasets with their stores and buffers.
    views = [SimpleNamespace(ledger=ds.ledger, mode=getattr(ds, "mode", "offline"),
                             store=SimpleNamespace(uri=ds.store.uri)) for ds in datasets]

    def at_exit() -> None:
        # A ledger file deleted since (the run cleaned up) is not opened again: that would create it anew.
        alive = [v for v in views if not getattr(v.ledger, "path", None) or os.path.exists(v.ledger.path)]
        try:
            warn_kept(alive)
        except Exception as e:  # a ledger closed or gone by now: nothing can be counted
            log.debug("could not count the kept samples at exit: %s", e)

    atexit.register(at_exit)
    return n
