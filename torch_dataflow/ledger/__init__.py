"""Control-plane backends behind one contract (:class:`Ledger`)."""

from __future__ import annotations

from typing import Any

from ..uri import LEDGER_SCHEMES, resolve_backend
from .base import DeliveryState, Ledger, LedgerCounts, Plan, ReconcileReport, SampleStatus, StepClaim

__all__ = [
    "DeliveryState",
    "Ledger",
    "LedgerCounts",
    "Plan",
    "ReconcileReport",
    "SampleStatus",
    "StepClaim",
    "open_ledger",
]


def open_ledger(ledger: str | Ledger, **overrides: Any) -> Ledger:
    """Return ``ledger`` itself, or the backend its URI names (``memory://``,
    ``sqlite:///path``, ``redis://host:port/db``), with keyword overrides.

    Example:
        >>> open_ledger("memory://example")
        MemoryLedger('memory://example')
    """
    if isinstance(ledger, Ledger):
        if overrides:
            raise TypeError("keyword overrides apply to a URI, not to a ledger instance")
        return ledger
    cls = resolve_backend(ledger, LEDGER_SCHEMES, "ledger")
    return cls.from_uri(ledger, **overrides)
