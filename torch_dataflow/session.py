"""The trainer side of sessions and fences (see :mod:`torch_dataflow.ledger.fencing`).

Mixed into :class:`~torch_dataflow.FeatureStoreDataset` and
:class:`~torch_dataflow.FeaturePool`: :meth:`reconcile` with ``session=``
(rank 0, what :class:`~torch_dataflow.StepAcker` and the Lightning / Fabric
callbacks do) opens the ledger's trainer session, :meth:`join_session` makes
the other ranks members, and from then on every lease, plan claim and durable
mark of this dataset (DataLoader workers included: the fence is pickled with
it) carries the fence. Leasing and acking beat the session's heartbeat (at most
every ``session_ttl / 4`` seconds; no thread); :meth:`close_session` ends it on
a clean finish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from .ledger.fencing import DEFAULT_SESSION_TTL, fenced

__all__ = ["SessionMember"]

log = logging.getLogger(__name__)


class SessionMember:
    """Fence bookkeeping for a ledger consumer (``self.ledger``)."""

    ledger: Any
    _fence: int | None = None
    _beat_at: float = 0.0
    session_ttl: float = DEFAULT_SESSION_TTL

    @property
    def fence(self) -> int | None:
        """This consumer's session fence (``None``: not in a session)."""
        return self._fence

    def _adopt(self, fence: int) -> None:
        self._fence = int(fence)
        self._beat_at = time.monotonic()

    def _maybe_beat(self) -> None:
        """Keep the session live (cheap: one ledger write every ``session_ttl / 4`` s at most).

        Raises:
            Fenced: another trainer took the ledger over."""
        if self._fence is None or time.monotonic() - self._beat_at < self.session_ttl / 4:
            return
        self.ledger.session_heartbeat(self._fence)
        self._beat_at = time.monotonic()

    def join_session(self) -> int:
        """Join the session the reconciling rank opened (other DDP ranks, after its barrier)."""
        self._adopt(self.ledger.join_session())
        assert self._fence is not None
        return self._fence

    def close_session(self) -> None:
        """End this consumer's session (a clean finish): the next trainer needs no takeover."""
        if self._fence is not None:
            self.ledger.close_session(self._fence)

    def _check_fence(self, lost: Sequence[str], what: str) -> None:
        """Turn lost leases into :class:`Fenced` when the reason is a takeover."""
        if not lost or self._fence is None:
            return
        attempt = self.ledger.attempt()
        if attempt != self._fence:
            raise fenced(self.ledger.uri, self._fence, attempt, self.ledger.session(), what)

    def _session_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return state
