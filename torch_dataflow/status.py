"""``torch-dataflow status``: what a ledger (and optionally a store) holds right now.

:func:`collect_status` gathers a JSON-ready snapshot; :func:`format_status`
renders it as a table. Rates need two looks: the ledger records states,
owners and lease deadlines, but no timestamps of commits or acks, so a rate
is only reported when measured over ``interval`` seconds.

Example:
    >>> from torch_dataflow.ledger import open_ledger
    >>> from torch_dataflow.refs import SampleRef
    >>> led = open_ledger("memory://status-doc")
    >>> [gen] = led.reserve(["s1"])
    >>> _ = led.commit([SampleRef("s1", gen, "memory://", (), 0, "00")])
    >>> _ = led.lease("trainer-0", 1, ttl=60)
    >>> snap = collect_status("memory://status-doc")
    >>> snap["deliveries"]["leased"], snap["owners"][0]["owner"]
    (1, 'trainer-0')
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from .binding import existing_ledger
from .ledger import Ledger
from .ledger.heartbeats import describe, provably_dead
from .stall import diagnose
from .stores import open_store

__all__ = ["collect_status", "format_status"]

_NO_RATES = (
    "not measured: the ledger keeps states, owners and lease deadlines but no timestamps of commits "
    "or acks; `--interval SECONDS` measures rates by looking twice"
)


def _owners(leases: list[Any], now: float) -> list[dict[str, Any]]:
    by: dict[str, dict[str, Any]] = {}
    for lease in leases:
        o = by.setdefault(
            lease.owner,
            {
                "owner": lease.owner,
                "leases": 0,
                "epochs": set(),
                "nbytes": 0,
                "first_deadline": lease.deadline,
                "last_deadline": lease.deadline,
            },
        )
        o["leases"] += 1
        o["epochs"].add(lease.epoch)
        o["nbytes"] += lease.ref.nbytes
        o["first_deadline"] = min(o["first_deadline"], lease.deadline)
        o["last_deadline"] = max(o["last_deadline"], lease.deadline)
    out = []
    for o in sorted(by.values(), key=lambda o: o["owner"]):
        o["epochs"] = sorted(o["epochs"])
        o["expires_in_s"] = round(o["first_deadline"] - now, 1)
        out.append(o)
    return out


def _producers(prods: list[dict[str, Any]], ttl: float, closed: bool) -> dict[str, Any]:
    """Every producer with its heartbeat age; ``stream_silent`` when the stream is open
    and every open producer is silent past ``ttl`` (or provably dead)."""
    for p in prods:
        p["silent"] = not p["done"] and (p["age_s"] is None or p["age_s"] > ttl)
        p["dead"] = provably_dead(p, ttl)
    open_ = [p for p in prods if not p["done"]]
    return {"producers": prods, "producer_ttl_s": ttl,
            "stream_silent": not closed and bool(open_) and all(p["silent"] for p in open_)}


def _measure(ledger: Ledger, interval: float) -> dict[str, Any]:
    """Rates over ``interval`` seconds: ledger-wide from two counts, per owner
    from the distinct leases seen while polling (a lower bound: a lease taken
    and acked between two polls is missed)."""
    poll = min(0.25, interval)
    t0, c0 = time.monotonic(), ledger.counts()
    first = {lease.lease_id for lease in ledger.leases()}
    seen: dict[str, str] = {}
    while True:
        for lease in ledger.leases():
            if lease.lease_id not in first:
                seen[lease.lease_id] = lease.owner
        if time.monotonic() - t0 >= interval:
            break
        time.sleep(poll)
    c1 = ledger.counts()
    dt = time.monotonic() - t0
    per_owner = Counter(seen.values())
    return {
        "interval_s": round(dt, 2),
        "committed_per_s": round((c1.committed - c0.committed) / dt, 2),
        "acked_per_s": round(((c1.trained + c1.durable) - (c0.trained + c0.durable)) / dt, 2),
        "durable_per_s": round((c1.durable - c0.durable) / dt, 2),
        "leased_per_s_by_owner": {o: round(n / dt, 2) for o, n in sorted(per_owner.items())},
        "note": "per-owner lease rates are lower bounds (leases taken and acked between two polls are not seen)",
    }


def collect_status(
    ledger_uri: str, store_uri: str | None = None, *, interval: float = 0.0, limit: int = 20,
    producer_ttl: float = 60.0,
) -> dict[str, Any]:
    """A JSON-ready snapshot of a ledger (and a store's resident bytes).

    Args:
        ledger_uri: the ledger to inspect (a SQLite path must exist).
        store_uri: also report this store's resident bytes.
        interval: if > 0, watch this many seconds and report rates.
        limit: list at most this many quarantined samples.
        producer_ttl: an open producer silent longer than this is flagged ``silent``.

    Raises:
        ConfigError: bad URI or missing SQLite file.
        BackendUnavailable: the ledger or store cannot be reached.
    """
    ledger = existing_ledger(ledger_uri, look=True)
    try:
        now = time.time()
        c = ledger.counts()
        trained = ledger.trained_steps()
        leases = ledger.leases()
        quarantined = ledger.quarantined()
        snap: dict[str, Any] = {
            "ledger": ledger.uri,
            "time": now,
            "attempt": ledger.attempt(),
            "stream": "closed" if c.closed else "open",
            "epochs": c.extra.get("epochs"),
            "samples": {"committed": c.committed, "aborted": c.aborted, "quarantined": c.quarantined, "freed": c.freed},
            "deliveries": {"pending": c.pending, "leased": c.leased, "trained": c.trained, "durable": c.durable},
            "last_acked_step": max(trained.values(), default=None),
            "owners": _owners(leases, now),
            "quarantined": [
                {
                    "sample_id": ref.sample_id if ref else None,
                    "generation": ref.generation if ref else None,
                    "reason": reason,
                }
                for ref, reason in quarantined[:limit]
            ],
            "rates": _measure(ledger, interval) if interval > 0 else None,
            "rates_note": None if interval > 0 else _NO_RATES,
            "store": None,
        }
        snap.update(_producers(ledger.producers(), producer_ttl, c.closed))
        snap["stall"] = diagnose(ledger, producer_ttl=producer_ttl).as_dict()  # why a loader would wait now
        snap["delete_queue"] = len(ledger.pending_deletes(limit=10_000))  # capped: a count, not a listing
    finally:
        ledger.close()
    if store_uri is not None:
        # A status query never creates a store (a mistyped path is an error, not an empty store).
        store = open_store(store_uri, create=False) if store_uri.startswith("file:") else open_store(store_uri)
        try:
            health = store.health()
        finally:
            store.close()
        note = None
        if store_uri.startswith("mooncake:"):
            note = "Mooncake cannot list keys: this counts only what this process wrote (nothing)"
        snap["store"] = {"uri": store.uri, "resident_bytes": health.resident_bytes, "count": health.count, "note": note}
    return snap


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _until(seconds: float) -> str:
    s = abs(int(seconds))
    text = f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
    return f"in {text}" if seconds >= 0 else f"expired {text} ago"


def format_status(snap: dict[str, Any]) -> str:
    """Render :func:`collect_status`'s snapshot as a readable table."""
    s, d = snap["samples"], snap["deliveries"]
    last = snap["last_acked_step"]
    lines = [
        f"ledger   {snap['ledger']}",
        f"         stream {snap['stream']}, restart attempt {snap['attempt']}, epochs {snap['epochs']}",
        "",
        "samples       committed {committed:>8}   aborted {aborted:>6}   quarantined {quarantined:>6}"
        "   freed {freed:>8}".format(**s),
        f"deliveries    pending   {d['pending']:>8}   leased  {d['leased']:>6}   trained     {d['trained']:>6}"
        f"   durable {d['durable']:>6}",
        f"last acked optimizer step: {'-' if last is None else last}",
        "",
    ]
    open_ = [p for p in snap.get("producers", []) if not p["done"]]
    for p in open_:
        flag = " DEAD (process gone)" if p["dead"] else " SILENT" if p["silent"] else ""
        lines.append(f"producer open: {describe(p)}{flag}")
    if snap.get("stream_silent"):
        lines.append(f"WARNING: every open producer is silent past {snap['producer_ttl_s']:.0f}s; if it died, "
                     f"`torch-dataflow close-stream {snap['ledger']} --producer NAME` ends the stream")
    done = [p["name"] for p in snap.get("producers", []) if p["done"]]
    if done:
        lines.append(f"producers done: {', '.join(done)}")
    stall = snap.get("stall")
    if stall:
        lines.append(f"a loader now: [{stall['reason']}] {stall['message']}")
    lines.append("")
    owners = snap["owners"]
    if owners:
        width = max(len("owner"), *(len(o["owner"]) for o in owners))
        lines.append(f"{'owner':<{width}}  {'leases':>6}  {'bytes':>10}  epochs  first lease expires")
        for o in owners:
            epochs = ",".join(str(e) for e in o["epochs"])
            lines.append(
                f"{o['owner']:<{width}}  {o['leases']:>6}  {_bytes(o['nbytes']):>10}  {epochs:<6}  "
                f"{_until(o['expires_in_s'])}"
            )
    else:
        lines.append("no leases held")
    if snap["quarantined"]:
        lines += ["", f"quarantined ({snap['samples']['quarantined']}, first {len(snap['quarantined'])}):"]
        lines += [f"  {q['sample_id']} (generation {q['generation']}): {q['reason']}" for q in snap["quarantined"]]
    store = snap["store"]
    if store is not None:
        lines += ["", f"store    {store['uri']}: {store['count']} samples, {_bytes(store['resident_bytes'])} resident"]
        if store["note"]:
            lines.append(f"         ({store['note']})")
    lines.append("")
    rates = snap["rates"]
    if rates is None:
        lines.append(f"rates    {snap['rates_note']}")
    else:
        lines.append(
            f"rates over {rates['interval_s']} s: committed {rates['committed_per_s']}/s, acked "
            f"{rates['acked_per_s']}/s, durable {rates['durable_per_s']}/s"
        )
        for owner, rate in rates["leased_per_s_by_owner"].items():
            lines.append(f"         {owner}: >= {rate} leases/s")
    return "\n".join(lines)
