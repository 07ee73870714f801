"""One trainer group per ledger: sessions and fences, shared by SQLite and Redis.

A trainer opens a **session** when it reconciles the ledger
(:meth:`~torch_dataflow.ledger.base.Ledger.reconcile` with ``session=``). The
session records its holder (host, pid, world size, name), a heartbeat, a TTL
and its **fence**: the ledger's restart counter ``attempt`` right after that
reconcile. Every later lease, plan claim and durable mark of the session
carries the fence; once another trainer takes the ledger over (a new
reconcile bumps ``attempt``), the old fence no longer matches and the old
trainer's calls raise :class:`~torch_dataflow.errors.Fenced` instead of
handing it samples the new trainer also gets (the model is Kafka's
consumer-group generation).

A second trainer that reconciles while the session is **live** (heartbeat
younger than its TTL, and its process not provably gone) is refused with
:class:`~torch_dataflow.errors.SessionConflict` naming the holder, unless it
asks to take over. A consumer that leases without a fence (it never opened or
joined a session) is refused the same way while a live session exists, so an
unnamed second job never splits the data with the first. Consumers that never
open sessions at all (independent competing consumers) are not affected.

Example:
    >>> from torch_dataflow.ledger import open_ledger
    >>> led = open_ledger("memory://fence-doc")
    >>> fence = led.reconcile(None, session={"name": "job-a"}).attempt
    >>> led.session()["fence"] == fence
    True
    >>> led.close_session(fence)
    >>> led.session() is None
    True
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from ..errors import Fenced, SessionConflict
from .heartbeats import pid_gone

__all__ = ["DEFAULT_SESSION_TTL", "conflict", "fenced", "holder_record", "is_live", "me"]

DEFAULT_SESSION_TTL = 60.0


def me() -> str:
    """``host:pid`` of this process (a session's holder may act without its fence)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_record(session: Mapping[str, Any], fence: int, ttl: float) -> dict[str, Any]:
    """The stored session record: the caller's ``session`` info plus who, when, fence and TTL."""
    rec = {k: v for k, v in dict(session).items() if k not in ("host", "pid", "fence", "ttl", "me")}
    rec.update(host=socket.gethostname(), pid=os.getpid(), me=me(), fence=int(fence), ttl=float(ttl),
               started=time.time())
    return rec


def is_live(rec: Mapping[str, Any] | None, beat: float | None, attempt: int, now: float) -> bool:
    """A session is live while its fence is current and its process runs: on this
    host, while the pid exists (however old its heartbeat: a trainer busy in a long
    validation is alive); elsewhere, while its heartbeat is younger than its TTL."""
    if not rec or int(rec.get("fence", -1)) != attempt:
        return False
    if rec.get("host") == socket.gethostname() and rec.get("pid"):
        return not pid_gone(rec.get("host"), rec.get("pid"))
    return beat is not None and now - beat <= float(rec.get("ttl", DEFAULT_SESSION_TTL))


def describe(rec: Mapping[str, Any], beat: float | None, now: float) -> str:
    world = rec.get("world")
    ranks = f"ranks 0..{int(world) - 1}" if world and int(world) > 1 else "rank 0"
    age = "never" if beat is None else f"{max(0.0, now - beat):.1f}s ago"
    name = f" {rec['name']!r}" if rec.get("name") else ""
    return (f"session{name} of host {rec.get('host')} pid {rec.get('pid')} ({ranks}, fence {rec.get('fence')}, "
            f"last heartbeat {age}, presumed dead {float(rec.get('ttl', DEFAULT_SESSION_TTL)):.0f}s after it)")


def conflict(uri: str, rec: Mapping[str, Any], beat: float | None, now: float, lease_expiry: float | None,
             what: str) -> SessionConflict:
    """The error a second trainer gets while ``rec`` is live."""
    expiry = "" if lease_expiry is None else f"; its leases expire in {max(0.0, lease_expiry - now):.0f}s"
    return SessionConflict(
        f"{what} refused: ledger {uri} is held by a live trainer {describe(rec, beat, now)}{expiry}. "
        "Another job is training from this ledger (started twice, or the old job still runs): stop it, "
        "wait until its heartbeat is older than its TTL, or take over on purpose "
        "(StepAcker/FeatureAckCallback(..., takeover=True), or reconcile(..., takeover=True)), which fences "
        "the old job: its leases, acks and checkpoints are rejected from then on.")


def fenced(uri: str, fence: int, attempt: int, rec: Mapping[str, Any] | None, what: str) -> Fenced:
    """The error an old trainer gets after another one reconciled the ledger."""
    who = ""
    if rec and int(rec.get("fence", -1)) == attempt:
        who = f" by host {rec.get('host')} pid {rec.get('pid')}" + (f" ({rec['name']!r})" if rec.get("name") else "")
    return Fenced(
        f"{what} rejected: this trainer's fence {fence} on ledger {uri} is stale; the ledger was reconciled "
        f"(restart attempt {attempt}){who}. Another trainer took over; stop this job: its samples are "
        "delivered to the new one, and nothing it trains from now on is recorded.")


def parse_record(text: str | None) -> dict[str, Any] | None:
    return json.loads(text) if text else None
