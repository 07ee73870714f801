"""The recording side of the metrics: cheap calls made where the work happens.

Every function here is a no-op unless metrics are on in this process, which
they are when :envvar:`TORCH_DATAFLOW_METRICS_DIR` is set (``serve()`` sets it,
and DataLoader workers inherit it whether they are forked or spawned). When on,
values go to ``prometheus_client``'s multiprocess files in that directory, one
file per process, which the serving process sums at scrape time: a worker's
counts stay counted after it exits.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["ENV", "acked", "active", "backpressure", "got", "leased", "put", "quarantined", "redelivered",
           "reset", "stalled", "trainer_batch", "waited"]

ENV = "TORCH_DATAFLOW_METRICS_DIR"
_PROM_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class _State:
    pid = 0
    metrics: dict[str, Any] | None = None
    frac: float | None = None  # data-wait fraction, an exponential moving average
    saved_value_class: Any = None


def _build(directory: str) -> dict[str, Any]:
    """The metric objects of this process, writing to ``directory``'s multiprocess files."""
    os.environ.setdefault(_PROM_ENV, directory)
    from prometheus_client import Counter, Gauge, Histogram, values

    from .catalog import METRICS

    if values.ValueClass.__name__ != "MmapedValue":
        # prometheus_client was imported before the directory was known: switch this process's
        # new values to the multiprocess files (metrics made earlier keep their own values).
        _State.saved_value_class = values.ValueClass
        values.ValueClass = values.MultiProcessValue()
    out: dict[str, Any] = {}
    for m in METRICS.values():
        if m.source != "process":
            continue
        name = m.name[: -len("_total")] if m.kind == "counter" else m.name
        if m.kind == "counter":
            out[m.name] = Counter(name, m.help, m.labels, registry=None)
        elif m.kind == "histogram":
            out[m.name] = Histogram(name, m.help, m.labels, registry=None, buckets=_LATENCY)
        else:
            out[m.name] = Gauge(name, m.help, m.labels, registry=None, multiprocess_mode="mostrecent")
    return out


def active() -> dict[str, Any] | None:
    """This process's metric objects, or ``None`` when metrics are off."""
    pid = os.getpid()
    if _State.pid != pid:
        _State.pid = pid
        directory = os.environ.get(ENV)
        if not directory:
            _State.metrics = None
        elif _State.metrics is None:  # after a fork the parent's objects follow the new pid
            _State.metrics = _build(directory)
    return _State.metrics


def reset() -> None:
    """Forget this process's metric objects (``MetricsServer.stop``); the next call re-reads the environment."""
    if _State.saved_value_class is not None:
        from prometheus_client import values

        values.ValueClass = _State.saved_value_class
        _State.saved_value_class = None
    _State.pid, _State.metrics, _State.frac = 0, None, None


def leased(n: int, seconds: float) -> None:
    """One lease call (or step claim) that returned ``n`` samples in ``seconds``."""
    m = active()
    if m is not None:
        m["torch_dataflow_lease_seconds"].observe(seconds)
        if n:
            m["torch_dataflow_leased_total"].inc(n)


def got(seconds: float, nbytes: int) -> None:
    """One sample read from the store."""
    m = active()
    if m is not None:
        m["torch_dataflow_get_seconds"].observe(seconds)
        m["torch_dataflow_loaded_bytes_total"].inc(nbytes)


def waited(seconds: float) -> None:
    """A loader slept ``seconds`` with nothing to deliver."""
    m = active()
    if m is not None:
        m["torch_dataflow_loader_wait_seconds_total"].inc(seconds)


def stalled(reason: str) -> None:
    """A loader logged why it waits."""
    m = active()
    if m is not None:
        m["torch_dataflow_loader_stalls_total"].labels(reason).inc()


def acked(n: int, lost: int) -> None:
    """An ack of ``n`` leases, ``lost`` of which were lost (their samples go out again)."""
    m = active()
    if m is not None:
        m["torch_dataflow_acked_total"].inc(n - lost)
        if lost:
            m["torch_dataflow_redelivered_total"].inc(lost)


def redelivered(n: int = 1) -> None:
    m = active()
    if m is not None:
        m["torch_dataflow_redelivered_total"].inc(n)


def quarantined(n: int = 1) -> None:
    m = active()
    if m is not None:
        m["torch_dataflow_quarantined_total"].inc(n)


def put(n: int, nbytes: int) -> None:
    """A producer committed ``n`` samples of ``nbytes`` bytes."""
    m = active()
    if m is not None:
        m["torch_dataflow_producer_put_total"].inc(n)
        m["torch_dataflow_producer_put_bytes_total"].inc(nbytes)


def backpressure(seconds: float) -> None:
    """A producer waited ``seconds`` for room."""
    m = active()
    if m is not None and seconds > 0:
        m["torch_dataflow_producer_backpressure_seconds_total"].inc(seconds)


def trainer_batch(wait: float, total: float) -> float | None:
    """One trainer batch took ``total`` seconds, ``wait`` of them waiting for data; returns the
    smoothed data-wait fraction (also when metrics are off, for ``self.log``)."""
    frac = wait / total if total > 0 else 0.0
    _State.frac = frac if _State.frac is None else 0.8 * _State.frac + 0.2 * frac
    m = active()
    if m is not None:
        m["torch_dataflow_trainer_data_wait_seconds_total"].inc(max(0.0, wait))
        m["torch_dataflow_trainer_step_seconds_total"].inc(max(0.0, total))
        m["torch_dataflow_trainer_data_wait_fraction"].set(_State.frac)
    return _State.frac
