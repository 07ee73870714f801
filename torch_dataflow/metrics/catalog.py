"""Every metric torch_dataflow exports: name, type, labels and meaning.

One table serves the recorder (:mod:`torch_dataflow.metrics._record`), the
scrape-time ledger collector, ``docs/observability.md`` and the Grafana
dashboard test, so a name can never differ between them.

Two sources:

* ``ledger`` metrics are read from the ledger when Prometheus scrapes (they are
  the ledger's truth, the same for every process that asks);
* ``process`` metrics are counted where the work happens (DataLoader workers,
  producers, the trainer's main process) and summed over every process through
  ``prometheus_client``'s multiprocess files, so a worker's counts outlive it.

Example:
    >>> from torch_dataflow.metrics.catalog import METRICS, names
    >>> METRICS["torch_dataflow_leased_total"].kind
    'counter'
    >>> "torch_dataflow_ledger_lag_samples" in names()
    True
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["METRICS", "STALL_REASONS", "Metric", "markdown_table", "names"]


@dataclass(frozen=True)
class Metric:
    """One exported metric (``kind``: counter | gauge | histogram; ``source``: ledger | process)."""

    name: str
    kind: str
    source: str
    help: str
    labels: tuple[str, ...] = ()


# The reasons a loader can be waiting (torch_dataflow.stall); ``ready`` means it is not.
STALL_REASONS = ("ready", "producers_slow", "producers_silent", "store_full", "leased_elsewhere",
                 "stream_closed", "ledger_unreachable")

_ALL = (
    # --- read from the ledger at scrape time
    Metric("torch_dataflow_ledger_deliveries", "gauge", "ledger",
           "Deliveries by state (pending, leased, trained, durable), all epochs.", ("state",)),
    Metric("torch_dataflow_ledger_samples", "gauge", "ledger",
           "Catalog entries by status (committed, aborted, quarantined, freed).", ("status",)),
    Metric("torch_dataflow_ledger_lag_samples", "gauge", "ledger",
           "Ledger lag: deliveries committed but not yet trained (pending + leased)."),
    Metric("torch_dataflow_ledger_stream_open", "gauge", "ledger", "1 while the stream is open, 0 once closed."),
    Metric("torch_dataflow_producer_heartbeat_age_seconds", "gauge", "ledger",
           "Seconds since each open producer's last heartbeat.", ("producer",)),
    Metric("torch_dataflow_store_resident_bytes", "gauge", "ledger",
           "Bytes of committed generations not yet confirmed deleted (the ledger's byte accounting)."),
    Metric("torch_dataflow_store_budget_bytes", "gauge", "ledger",
           "The producers' byte budget (max_resident_bytes), when one is set."),
    Metric("torch_dataflow_delete_queue_length", "gauge", "ledger",
           "Freed generations whose store delete is not confirmed yet (capped at 10000)."),
    Metric("torch_dataflow_stall", "gauge", "ledger",
           "1 for the reason a loader would wait now (see docs/observability.md), 0 for the others.", ("reason",)),
    Metric("torch_dataflow_ledger_scrape_seconds", "gauge", "ledger", "Time the last scrape spent reading the ledger."),
    # --- counted where the work happens, summed over processes
    Metric("torch_dataflow_leased_total", "counter", "process", "Samples leased by loaders (every worker)."),
    Metric("torch_dataflow_loaded_bytes_total", "counter", "process", "Bytes of samples read by loaders."),
    Metric("torch_dataflow_acked_total", "counter", "process", "Samples acked after an optimizer step."),
    Metric("torch_dataflow_redelivered_total", "counter", "process",
           "Samples handed back for another delivery: given back unreadable, or whose lease was lost at ack."),
    Metric("torch_dataflow_quarantined_total", "counter", "process", "Samples quarantined by loaders."),
    Metric("torch_dataflow_lease_seconds", "histogram", "process", "Latency of one ledger lease or step claim."),
    Metric("torch_dataflow_get_seconds", "histogram", "process", "Latency of one store read (one sample)."),
    Metric("torch_dataflow_loader_wait_seconds_total", "counter", "process",
           "Seconds loaders spent waiting with nothing to deliver."),
    Metric("torch_dataflow_loader_stalls_total", "counter", "process",
           "Stall log lines written by loaders, by reason.", ("reason",)),
    Metric("torch_dataflow_producer_put_total", "counter", "process", "Samples put and committed by producers."),
    Metric("torch_dataflow_producer_put_bytes_total", "counter", "process", "Bytes put by producers."),
    Metric("torch_dataflow_producer_backpressure_seconds_total", "counter", "process",
           "Seconds producers waited for room (store or ledger budget)."),
    Metric("torch_dataflow_trainer_data_wait_seconds_total", "counter", "process",
           "Seconds the trainer waited for its next batch."),
    Metric("torch_dataflow_trainer_step_seconds_total", "counter", "process",
           "Seconds of trainer batches, data wait included (wait / step = data-wait fraction)."),
    Metric("torch_dataflow_trainer_data_wait_fraction", "gauge", "process",
           "Data wait as a fraction of batch time, over the trainer's last batches."),
)

METRICS: dict[str, Metric] = {m.name: m for m in _ALL}


def names() -> set[str]:
    """Every series name a scrape can show (histograms as ``_bucket``, ``_sum``, ``_count``;
    counters under their ``_total`` name)."""
    out: set[str] = set()
    for m in _ALL:
        if m.kind == "histogram":
            out |= {m.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            out.add(m.name)
    return out


def markdown_table() -> str:
    """The metric table of ``docs/observability.md`` (a test keeps the page equal to it).

    Example:
        >>> markdown_table().splitlines()[0]
        '| metric | type | labels | read from | meaning |'
    """
    where = {"ledger": "the ledger, at scrape time", "process": "every process, summed"}
    lines = ["| metric | type | labels | read from | meaning |", "|---|---|---|---|---|"]
    for m in _ALL:
        kind = "histogram (`_bucket`, `_sum`, `_count`)" if m.kind == "histogram" else m.kind
        labels = ", ".join(f"`{label}`" for label in m.labels) or "-"
        lines.append(f"| `{m.name}` | {kind} | {labels} | {where[m.source]} | {m.help} |")
    return "\n".join(lines)
