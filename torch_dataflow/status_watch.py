"""``torch-dataflow status --watch``: a live table of a ledger, refreshed in place.

Each refresh takes one :func:`~torch_dataflow.status.collect_status` snapshot
and compares it with the previous one for the rates (committed, acked and
durable samples per second), beside the lag (pending + leased), every
producer's heartbeat, every consumer's (rank × worker) leases, the stall
reason and the store's delete queue. Needs ``rich`` (the ``watch`` extra).

Example:
    >>> import io
    >>> from rich.console import Console
    >>> from torch_dataflow.ledger import open_ledger
    >>> _ = open_ledger("memory://watch-doc")
    >>> console = Console(record=True, file=io.StringIO(), width=100)
    >>> watch("memory://watch-doc", console=console, interval=0.01, iterations=1)
    0
    >>> "producers_silent" in console.export_text()
    True
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from .status import collect_status

__all__ = ["render", "watch"]


def _rate(snap: dict[str, Any], prev: dict[str, Any] | None, get: Any) -> str:
    if prev is None:
        return "-"
    dt = snap["time"] - prev["time"]
    return f"{(get(snap) - get(prev)) / dt:.1f}/s" if dt > 0 else "-"


def _acked(s: dict[str, Any]) -> int:
    return s["deliveries"]["trained"] + s["deliveries"]["durable"]


def render(snap: dict[str, Any], prev: dict[str, Any] | None = None) -> Any:
    """The live view of ``snap`` (rates against ``prev``) as a ``rich`` renderable."""
    from rich.console import Group
    from rich.table import Table

    d, s = snap["deliveries"], snap["samples"]
    head = Table(title=f"{snap['ledger']}  (stream {snap['stream']}, attempt {snap['attempt']})",
                 show_header=True, expand=False)
    for col in ("committed", "pending", "leased", "trained", "durable", "quarantined", "lag",
                "commit rate", "ack rate", "delete queue"):
        head.add_column(col, justify="right")
    head.add_row(str(s["committed"]), str(d["pending"]), str(d["leased"]), str(d["trained"]), str(d["durable"]),
                 str(s["quarantined"]), str(d["pending"] + d["leased"]),
                 _rate(snap, prev, lambda x: x["samples"]["committed"]), _rate(snap, prev, _acked),
                 str(snap.get("delete_queue", "-")))
    stall = snap.get("stall") or {"reason": "-", "message": ""}
    style = "green" if stall["reason"] == "ready" else "yellow" if stall["reason"] != "ledger_unreachable" else "red"
    reason = f"[bold {style}]{stall['reason']}[/]: {stall['message']}"
    prods = Table(title="producers", show_header=True)
    for col in ("producer", "host", "pid", "heartbeat", "state"):
        prods.add_column(col)
    for p in snap.get("producers", []):
        age = "never" if p["age_s"] is None else f"{p['age_s']:.0f}s ago"
        state = "done" if p["done"] else "DEAD" if p["dead"] else "SILENT" if p["silent"] else "alive"
        prods.add_row(p["name"], str(p["host"] or "-"), str(p["pid"] or "-"), age, state)
    owners = Table(title="consumers (rank / worker)", show_header=True)
    for col in ("owner", "leases", "first lease expires"):
        owners.add_column(col)
    for o in snap["owners"]:
        owners.add_row(o["owner"], str(o["leases"]), f"in {o['expires_in_s']:.0f}s")
    parts: list[Any] = [head, f"a loader now: {reason}", prods, owners]
    if snap.get("last_acked_step") is not None:
        parts.append(f"last acked optimizer step: {snap['last_acked_step']}")
    return Group(*parts)


def watch(ledger_uri: str, store_uri: str | None = None, *, interval: float = 2.0, console: Any = None,
          iterations: int | None = None, as_json: bool = False, producer_ttl: float = 60.0) -> int:
    """Refresh the live view every ``interval`` seconds until interrupted (or ``iterations`` times).

    With ``as_json`` one JSON snapshot per line instead (machine-readable, no ``rich`` needed).
    When the output is not a terminal (redirected to a file or a pipe) each refresh is printed
    below the last one, stamped with its time and flushed, 160 columns wide unless ``COLUMNS``
    says otherwise, so ``status --watch > log`` can be read while it runs.
    Returns the exit status (0).
    """
    prev: dict[str, Any] | None = None
    n = 0
    if as_json:
        try:
            while iterations is None or n < iterations:
                snap = collect_status(ledger_uri, store_uri, producer_ttl=producer_ttl)
                print(json.dumps(snap), flush=True)
                n += 1
                if iterations is None or n < iterations:
                    time.sleep(interval)
        except KeyboardInterrupt:
            pass
        return 0
    from rich.console import Console
    from rich.live import Live

    redirected = False
    if console is None:  # (a console given by the caller is drawn live, as it asks)
        console = Console()
        redirected = not console.is_terminal
        if redirected and "COLUMNS" not in os.environ:
            console = Console(width=160)  # a log file: rich's 80 columns would cut the table's headers
    snap = collect_status(ledger_uri, store_uri, producer_ttl=producer_ttl)
    if redirected:
        # Redirected (a file, a pipe to tee): a live view redraws in place and writes only when it stops,
        # so print one view per refresh, flushed, with its time.
        try:
            while True:
                with console.capture() as frame:  # one write per refresh: a kill leaves no half table
                    console.print(f"-- {time.strftime('%Y-%m-%d %H:%M:%S')}")
                    console.print(render(snap, prev))
                console.file.write(frame.get())
                console.file.flush()
                n += 1
                if iterations is not None and n >= iterations:
                    break
                time.sleep(interval)
                prev, snap = snap, collect_status(ledger_uri, store_uri, producer_ttl=producer_ttl)
        except KeyboardInterrupt:
            pass
        return 0
    try:
        with Live(render(snap), console=console, refresh_per_second=4, transient=False) as live:
            n = 1
            while iterations is None or n < iterations:
                time.sleep(interval)
                prev, snap = snap, collect_status(ledger_uri, store_uri, producer_ttl=producer_ttl)
                live.update(render(snap, prev))
                n += 1
    except KeyboardInterrupt:
        pass
    return 0
