"""Prometheus metrics for producers, loaders (every DataLoader worker) and trainers.

Call :func:`serve` once in the process that owns the DataLoader (the trainer's
main process, or the producer's): it starts an HTTP endpoint on 127.0.0.1 and
turns metrics on for that process and for every DataLoader worker it starts
afterwards, forked or spawned. Workers write their counts to
``prometheus_client`` multiprocess files in a private temporary directory
(or the one ``PROMETHEUS_MULTIPROC_DIR`` names); a scrape sums them, so the
counts of a worker that has exited stay counted. Given a ``ledger``, a scrape
also reads the ledger's state (deliveries by state, lag, heartbeat ages,
resident bytes, the delete queue and the stall reason). The names are listed
in :mod:`torch_dataflow.metrics.catalog` and ``docs/observability.md``.

Needs the ``metrics`` extra: ``pip install 'torch-dataflow[metrics]'``.

Example:
    >>> import torch
    >>> from torch_dataflow import FeatureWriter
    >>> from torch_dataflow.metrics import read, serve
    >>> with serve(0, ledger="memory://metrics-doc") as server:
    ...     with FeatureWriter("memory://metrics-doc", "memory://metrics-doc") as w:
    ...         _ = w.put("s0", {"x": torch.ones(4)})
    ...     got = read(server.url)
    >>> got["torch_dataflow_producer_put_total"], got['torch_dataflow_ledger_deliveries{state="pending"}']
    (1.0, 1.0)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import urllib.request
from typing import Any

from ..errors import ConfigError
from . import _record
from .catalog import METRICS, STALL_REASONS, Metric, names

__all__ = ["METRICS", "STALL_REASONS", "Metric", "MetricsServer", "names", "read", "serve"]


class MetricsServer:
    """A running metrics endpoint (returned by :func:`serve`); a context manager that stops it."""

    def __init__(self, server: Any, thread: threading.Thread, directory: str, *, owned: list[str],
                 remove_dir: bool) -> None:
        self._server, self._thread = server, thread
        self.directory = directory
        self.host, self.port = server.server_address[:2]
        self._owned, self._remove_dir = owned, remove_dir

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT/metrics``."""
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving, turn metrics off in this process and remove the private directory."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = None
        for var in self._owned:
            os.environ.pop(var, None)
        _record.reset()
        if self._remove_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(port: int = 0, *, ledger: Any = None, host: str = "127.0.0.1", producer_ttl: float = 60.0,
          budget: int | None = None) -> MetricsServer:
    """Serve ``/metrics`` on ``host:port`` (``port=0``: a free one, see ``.port``).

    Args:
        port: TCP port; 0 picks a free one.
        ledger: a ledger URI or instance whose state each scrape reads (optional).
        host: the address to bind; the loopback default keeps the endpoint local.
        producer_ttl: seconds after which an open producer counts as silent (stall reason).
        budget: the store's byte budget, if the producers' registration does not tell it.

    Raises:
        ConfigError: ``prometheus_client`` is not installed.
    """
    try:
        import prometheus_client
        from prometheus_client import multiprocess
    except ImportError as e:
        raise ConfigError("metrics need prometheus_client: pip install 'torch-dataflow[metrics]'") from e
    owned: list[str] = []
    directory = os.environ.get(_record.ENV) or os.environ.get(_record._PROM_ENV)
    remove_dir = directory is None
    if directory is None:
        directory = tempfile.mkdtemp(prefix="torch-dataflow-metrics-")
    for var in (_record.ENV, _record._PROM_ENV):
        if var not in os.environ:
            os.environ[var] = directory
            owned.append(var)
    _record.reset()
    _record.active()  # this process's values go to the directory from now on
    registry = prometheus_client.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    if ledger is not None:
        from ..ledger import open_ledger
        from .collector import LedgerCollector

        registry.register(LedgerCollector(open_ledger(ledger), producer_ttl=producer_ttl, budget=budget))
    server, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread, directory, owned=owned, remove_dir=remove_dir)


def read(url: str, timeout: float = 10.0) -> dict[str, float]:
    """Scrape ``url`` once: ``{'name{label="v"}': value}`` (labels sorted; no braces without labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - an http URL the caller gave
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
