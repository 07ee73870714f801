"""Why is my trainer waiting: one diagnosis shared by the loader's log line,
``torch-dataflow status`` and the ``torch_dataflow_stall{reason=...}`` metric.

:func:`diagnose` reads the ledger (counts, producers and their heartbeats, leases,
the byte budget) and names the first reason that holds, in this order:

``ledger_unreachable``
    the ledger did not answer.
``ready``
    enough is pending: a loader asking now gets samples (not a stall).
``leased_elsewhere``
    the stream is closed and what is left is leased by other consumers (a crashed
    trainer's leases wait for their expiry): the holders and their expiry are named.
``stream_closed``
    the stream is closed and nothing is left to deliver.
``store_full``
    the store is at the producers' byte budget: they wait for room, which comes
    when checkpoints mark trained samples durable and free them.
``producers_silent``
    no producer registered yet, or every open one is silent past ``producer_ttl``.
``producers_slow``
    producers are alive (recent heartbeats) but have not committed more yet.

Example:
    >>> import torch
    >>> from torch_dataflow import FeatureWriter
    >>> from torch_dataflow.ledger import open_ledger
    >>> led = open_ledger("memory://stall-doc")
    >>> diagnose(led).reason
    'producers_silent'
    >>> w = FeatureWriter("memory://stall-doc", led, name="p0")
    >>> _ = w.put("s0", {"x": torch.ones(2)})
    >>> diagnose(led).reason
    'ready'
    >>> _ = led.lease("trainer", 1, ttl=60)
    >>> diagnose(led).reason
    'producers_slow'
    >>> w.close()
    >>> s = diagnose(led)
    >>> s.reason, s.details["holders"][0]["owner"]
    ('leased_elsewhere', 'trainer')
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .ledger.heartbeats import describe

__all__ = ["Stall", "diagnose", "report_stall"]

log = logging.getLogger("torch_dataflow.stall")


@dataclass(frozen=True)
class Stall:
    """A diagnosis: ``reason`` (one of :data:`~torch_dataflow.metrics.catalog.STALL_REASONS`),
    a one-line ``message`` and JSON-ready ``details``."""

    reason: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "message": self.message, "details": self.details}


def _mib(n: float) -> str:
    from .status import _bytes

    return _bytes(n)


def _holders(leases: list[Any], now: float) -> list[dict[str, Any]]:
    by: dict[str, dict[str, Any]] = {}
    for lease in leases:
        h = by.setdefault(lease.owner, {"owner": lease.owner, "leases": 0, "expires_in_s": lease.deadline - now})
        h["leases"] += 1
        h["expires_in_s"] = min(h["expires_in_s"], lease.deadline - now)
    return [{**h, "expires_in_s": round(h["expires_in_s"], 1)} for h in sorted(by.values(), key=lambda h: h["owner"])]


def _budget(prods: list[dict[str, Any]], budget: int | None) -> int | None:
    if budget:
        return int(budget)
    found = [int(p["info"]["max_resident_bytes"]) for p in prods
             if not p["done"] and (p.get("info") or {}).get("max_resident_bytes")]
    return min(found) if found else None


def diagnose(ledger: Any, *, mine: str = "", need: int = 1, producer_ttl: float = 60.0,
             budget: int | None = None, batch: int | None = None) -> Stall:
    """Why a loader would wait on ``ledger`` now.

    Args:
        ledger: an open ledger.
        mine: owner prefix of the asking loader (its own leases are not "elsewhere").
        need: samples the loader needs to go on (a multi-rank global step needs
            ``world_size * batch_size``).
        producer_ttl: an open producer silent longer than this is silent.
        budget: the store's byte budget (default: the smallest ``max_resident_bytes``
            an open producer registered).
        batch: samples one of the loader's steps holds before anything can be
            trained (``batch_size`` x ranks): a budget that fits fewer can never
            free room, which the diagnosis says (``details["deadlock"]``).
    """
    uri = getattr(ledger, "uri", str(ledger))
    try:
        c = ledger.counts()
        prods = ledger.producers()
        if c.pending >= need:
            return Stall("ready", f"{c.pending} samples pending", {"pending": c.pending})
        now = time.time()
        others = [lease for lease in ledger.leases() if not (mine and lease.owner.startswith(mine))]
        resident = ledger.resident_bytes() if not c.closed else 0
    except (ConnectionError, OSError) as e:  # BackendUnavailable is a ConnectionError
        msg = str(e) if uri in str(e) else f"ledger {uri} unreachable: {e}"
        return Stall("ledger_unreachable", msg, {"error": str(e)})
    holders = _holders(others, now)
    base = {"pending": c.pending, "leased": c.leased, "committed": c.committed, "need": need}
    if c.closed:
        if holders:
            who = "; ".join(f"{h['owner']} ({h['leases']} leases, first expires in {h['expires_in_s']:.0f}s)"
                            for h in holders[:5])
            return Stall("leased_elsewhere", f"the stream is closed and the {c.leased} samples left are leased by "
                         f"other consumers: {who}; they come back when acked or at expiry",
                         {**base, "holders": holders})
        return Stall("stream_closed", "the stream is closed and nothing is left to deliver", base)
    cap = _budget(prods, budget)
    live = max(1, c.committed - c.freed - c.aborted)
    if cap is not None and resident + resident / live > cap:
        each = resident / live
        details = {**base, "resident_bytes": resident, "budget_bytes": cap, "sample_bytes": round(each)}
        fits = int(cap // each) if each else 0
        if batch and fits < batch:
            return Stall("store_full", f"store full, for good: the producers' budget of {_mib(cap)} holds about "
                         f"{fits} samples of {_mib(each)}, and a step needs {batch} before anything is trained, "
                         "checkpointed and freed, so no step can ever form. Raise max_resident_bytes to at least "
                         f"{_mib(2 * batch * each)} (two steps), or lower batch_size",
                         {**details, "deadlock": True, "fits": fits, "batch": batch})
        return Stall("store_full", f"store full: {_mib(resident)} resident of the producers' {_mib(cap)} budget; "
                     "producers wait for room, which comes when a checkpoint marks trained samples durable and "
                     "frees them (checkpoint more often, or raise max_resident_bytes)", details)
    open_ = [p for p in prods if not p["done"]]
    if not open_:
        return Stall("producers_silent", f"nothing pending and no producer registered on {uri} yet: is the "
                     "producer running, and writing to this ledger? (a mistyped ledger path is a new, empty "
                     "ledger)", {**base, "producers": []})
    silent = [p for p in open_ if p["age_s"] is None or p["age_s"] > producer_ttl]
    if len(silent) == len(open_):
        names = "; ".join(describe(p) for p in open_)
        return Stall("producers_silent", f"nothing pending and every open producer is silent past {producer_ttl:.0f}s: "
                     f"{names}; restart it under the same name, or `torch-dataflow close-stream {uri} --producer "
                     "NAME`", {**base, "producers": [p["name"] for p in open_]})
    names = "; ".join(describe(p) for p in open_)
    return Stall("producers_slow", f"nothing pending ({c.committed} committed, {c.leased} leased); producers "
                 f"alive: {names}: they have not committed more yet", {**base, "producers": [p["name"] for p in open_],
                                                                      "holders": holders})


def report_stall(ds: Any, waited: float, what: str, *, quiet: bool = False) -> Stall:
    """Log (one line) and count why the loader ``ds`` has waited ``waited`` seconds
    (``quiet``: only diagnose)."""
    from .metrics import _record

    world = ds.rank_world()[1]
    budget = getattr(ds.store, "max_bytes", None)
    stall = diagnose(ds.ledger, mine=ds.consumer_id, need=ds.batch_size * world if world > 1 else 1,
                     producer_ttl=ds.producer_ttl, budget=budget, batch=ds.batch_size * world)
    if quiet:
        return stall
    log.warning("loader waiting %.0fs for samples (%s): [%s] %s", waited, what, stall.reason, stall.message)
    _record.stalled(stall.reason)
    return stall
