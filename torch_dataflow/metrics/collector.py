"""The scrape-time half of the metrics: gauges read from the ledger when Prometheus asks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from .catalog import METRICS, STALL_REASONS

__all__ = ["LedgerCollector"]

_DELETE_CAP = 10_000


def _gauge(name: str, labels: tuple[str, ...] = ()) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    m = METRICS[name]
    return GaugeMetricFamily(name, m.help, labels=list(labels or m.labels))


class LedgerCollector:
    """A ``prometheus_client`` collector of one ledger's state (thread-safe as the ledger is).

    Example:
        >>> from prometheus_client import CollectorRegistry, generate_latest
        >>> from torch_dataflow.ledger import open_ledger
        >>> reg = CollectorRegistry()
        >>> reg.register(LedgerCollector(open_ledger("memory://collector-doc")))
        >>> b'torch_dataflow_ledger_lag_samples 0.0' in generate_latest(reg)
        True
    """

    def __init__(self, ledger: Any, *, producer_ttl: float = 60.0, budget: int | None = None) -> None:
        self.ledger = ledger
        self.producer_ttl = producer_ttl
        self.budget = budget

    def describe(self) -> list[Any]:
        return []  # collected lazily: registering must not touch the ledger

    def collect(self) -> Iterator[Any]:
        from ..stall import diagnose

        t0 = time.perf_counter()
        stall = diagnose(self.ledger, producer_ttl=self.producer_ttl, budget=self.budget)
        reason = _gauge("torch_dataflow_stall")
        for r in STALL_REASONS:
            reason.add_metric([r], 1.0 if r == stall.reason else 0.0)
        if stall.reason == "ledger_unreachable":
            yield reason
            return
        c = self.ledger.counts()
        prods = self.ledger.producers()
        deliveries = _gauge("torch_dataflow_ledger_deliveries")
        for state in ("pending", "leased", "trained", "durable"):
            deliveries.add_metric([state], getattr(c, state))
        samples = _gauge("torch_dataflow_ledger_samples")
        for status in ("committed", "aborted", "quarantined", "freed"):
            samples.add_metric([status], getattr(c, status))
        lag = _gauge("torch_dataflow_ledger_lag_samples")
        lag.add_metric([], c.pending + c.leased)
        open_ = _gauge("torch_dataflow_ledger_stream_open")
        open_.add_metric([], 0.0 if c.closed else 1.0)
        ages = _gauge("torch_dataflow_producer_heartbeat_age_seconds")
        for p in prods:
            if not p["done"] and p["age_s"] is not None:
                ages.add_metric([p["name"]], p["age_s"])
        resident = _gauge("torch_dataflow_store_resident_bytes")
        resident.add_metric([], self.ledger.resident_bytes())
        queue = _gauge("torch_dataflow_delete_queue_length")
        queue.add_metric([], len(self.ledger.pending_deletes(limit=_DELETE_CAP)))
        yield from (deliveries, samples, lag, open_, ages, resident, queue, reason)
        cap = stall.details.get("budget_bytes") or self.budget or max(
            [int((p.get("info") or {}).get("max_resident_bytes") or 0) for p in prods if not p["done"]], default=0)
        if cap:
            budget = _gauge("torch_dataflow_store_budget_bytes")
            budget.add_metric([], cap)
            yield budget
        took = _gauge("torch_dataflow_ledger_scrape_seconds")
        took.add_metric([], time.perf_counter() - t0)
        yield took
