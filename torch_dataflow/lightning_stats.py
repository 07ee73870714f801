"""What :class:`~torch_dataflow.lightning.FeatureAckCallback` logs through ``self.log``
(any Lightning logger: TensorBoard, CSV, ...): how long each batch waited for data,
that wait as a fraction of the batch, samples per second, and the ledger lag.

Example:
    >>> stats = TrainerStats(ledger=None)
    >>> stats.start({"__lease__": ["a", "b"]})
    >>> sorted(stats.end())
    ['dataflow/data_wait_fraction', 'dataflow/data_wait_s', 'dataflow/samples_per_s']
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from .metrics import _record

__all__ = ["TrainerStats"]


class TrainerStats:
    """Times a trainer's batches from its hooks; ``end()`` returns the values to log.

    The data wait of a batch is the time from the previous batch's end to this
    batch's start (the loader's fetch); its batch time runs from the previous
    batch's start. The ledger lag (pending + leased) is read at most every
    ``lag_every`` seconds (one ledger query).
    """

    def __init__(self, ledger: Any, *, lag_every: float = 2.0) -> None:
        self.ledger = ledger
        self.lag_every = lag_every
        self._last_end: float | None = None
        self._last_start: float | None = None
        self._wait = self._total = 0.0
        self._samples = 0
        self._lag: float | None = None
        self._lag_at = 0.0

    def start(self, batch: Any) -> None:
        from .dataset import lease_ids_of

        now = time.perf_counter()
        self._wait = 0.0 if self._last_end is None else now - self._last_end
        self._total = 0.0 if self._last_start is None else now - self._last_start
        self._last_start = now
        try:
            self._samples = len(lease_ids_of(batch))
        except Exception:  # a batch without leases (another loader): count nothing
            self._samples = 0

    def more(self, batch: Any) -> None:
        """Another batch of the same optimizer step (gradient accumulation under Fabric): count its samples."""
        from .dataset import lease_ids_of

        with contextlib.suppress(Exception):  # a batch without leases (another loader): count nothing
            self._samples += len(lease_ids_of(batch))

    def end(self) -> dict[str, float]:
        now = time.perf_counter()
        self._last_end = now
        out: dict[str, float] = {"dataflow/data_wait_s": self._wait}
        if self._total > 0:
            frac = _record.trainer_batch(self._wait, self._total)
            out["dataflow/data_wait_fraction"] = float(frac or 0.0)
            out["dataflow/samples_per_s"] = self._samples / self._total
        else:
            out["dataflow/data_wait_fraction"] = 0.0
            out["dataflow/samples_per_s"] = 0.0
        if self.ledger is not None and now - self._lag_at >= self.lag_every:
            c = self.ledger.counts()
            self._lag, self._lag_at = float(c.pending + c.leased), now
        if self._lag is not None:
            out["dataflow/ledger_lag"] = self._lag
        return out
