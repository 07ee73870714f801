"""Whose lease is it? Tell a lease lost in *this* ledger from one that never
belonged to it (a batch of another dataset acked through the wrong acker).

Lease ids carry no ledger name, so the test is by content, and only on the
ack's slow path (ids the ledger reported lost): a lease whose sample id the
ledger has no committed ref for, or whose generation is newer than the one it
committed, cannot be one of its leases.

Example:
    >>> from torch_dataflow.ledger import open_ledger
    >>> led = open_ledger("memory://owner-doc")
    >>> foreign_leases(led, ["0:1:abcd:never-committed-here", "junk"])
    ['0:1:abcd:never-committed-here', 'junk']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .ledger.base import parse_lease_id

__all__ = ["foreign_leases", "lost_message"]


def foreign_leases(ledger: Any, lost: Sequence[str]) -> list[str]:
    """The ids of ``lost`` that cannot be leases of ``ledger`` (see the module docstring)."""
    out = []
    for lid in lost:
        try:
            _epoch, gen, _nonce, sid = parse_lease_id(lid)
            ref = ledger.get_ref(sid)
        except Exception:
            out.append(lid)
            continue
        if ref is None or ref.generation < gen:
            out.append(lid)
    return out


def lost_message(ledger: Any, lost: Sequence[str], total: int, step: int) -> tuple[str, bool]:
    """``(message, foreign)`` for the ids ``ledger.ack`` reported lost at ``step``:
    ``foreign`` when some belong to another ledger (a misconfiguration, not a TTL)."""
    foreign = foreign_leases(ledger, lost)
    if foreign:
        return (f"{len(foreign)} of {total} lease ids acked at step {step} do not belong to ledger {ledger.uri} "
                f"(first: {foreign[0]}; no such sample or generation committed there): the batch comes from "
                "another dataset's ledger, whose leases stay LEASED until their TTL or the next run's reconcile. "
                "Ack each batch through the dataset it was read from (give every dataset to the "
                "StepAcker / FeatureAckCallback: a list or dict matching the batch)"), True
    return (f"{len(lost)} of {total} leases were lost before their ack at step {step} (first: {lost[0]}): "
            "they expired and were leased again, or were superseded, aborted or reconciled away (the samples "
            "may be trained twice: raise the dataset's lease_ttl), or the batch was read from another "
            "dataset's ledger that holds the same sample ids (ack it through that dataset)"), False
