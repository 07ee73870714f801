"""Collation that fails loudly and gives its leases back: :class:`GuardedCollate`.

A collate function that raises (samples of different shapes: torch's ``stack
expects each tensor to be equal size``) inside a DataLoader worker would leave
the batch's samples LEASED until their TTL, with an error that names no sample.
:func:`collate_or_release` runs the collate function; on failure it gives the
batch's leases back to the ledger (retryable: PENDING again at once) and raises
:class:`~torch_dataflow.errors.CollateError` (a ``ConfigError``), chained from
the original, naming the sample ids. :class:`~torch_dataflow.loader.FeatureLoader`
wraps its ``collate_fn`` in :class:`GuardedCollate`; so does
:class:`~torch_dataflow.eagle3.collate.Eagle3Collator` when given a ledger.

Example:
    >>> import torch
    >>> from torch.utils.data import default_collate
    >>> from torch_dataflow.ledger import open_ledger
    >>> led = open_ledger("memory://cg-doc")
    >>> bad = [{"x": torch.zeros(2), "__sample_id__": "a", "__lease__": ""},
    ...        {"x": torch.zeros(3), "__sample_id__": "b", "__lease__": ""}]
    >>> try:
    ...     collate_or_release(default_collate, bad, led)
    ... except Exception as e:
    ...     print(type(e).__name__, "['a', 'b']" in str(e))
    CollateError True
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import CollateError

__all__ = ["GuardedCollate", "collate_or_release"]

log = logging.getLogger(__name__)

_LEASE, _SID = "__lease__", "__sample_id__"


def _field(samples: Any, key: str) -> list[str]:
    out: list[str] = []
    if isinstance(samples, Mapping):
        v = samples.get(key)
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += [str(x) for x in v]
    elif isinstance(samples, (list, tuple)):
        for s in samples:
            out += _field(s, key)
    return out


def collate_or_release(collate: Callable[[Any], Any], samples: Sequence[Any], ledger: Any = None) -> Any:
    """``collate(samples)``; on failure give the samples' leases back to ``ledger``
    (retryable) and raise :class:`CollateError` naming the sample ids.

    Raises:
        CollateError: chained from the collate function's exception.
    """
    try:
        return collate(samples)
    except CollateError:
        raise
    except Exception as e:
        sids = _field(list(samples), _SID)
        leases = [x for x in _field(list(samples), _LEASE) if x]
        returned = ""
        if ledger is not None and leases:
            try:
                lost = ledger.fail(leases, retryable=True, reason=f"collate failed: {type(e).__name__}: {e}")
                returned = f"; {len(leases) - len(lost)} of {len(leases)} leases were given back (PENDING again)"
            except Exception as fe:  # never hide the collate error behind a ledger error
                log.error("could not give back the leases of a batch that failed to collate: %s", fe)
                returned = f"; its leases could not be given back ({fe}): they return after their TTL"
        elif leases:
            returned = "; its leases return after their TTL (give the collator a ledger to return them at once)"
        raise CollateError(f"collating a batch of {len(list(samples))} samples failed with {type(e).__name__}: {e} "
                           f"(sample ids: {sids}){returned}") from e


class GuardedCollate:
    """A picklable ``collate_fn`` wrapper: :func:`collate_or_release` with ``ledger``."""

    def __init__(self, collate: Callable[[Any], Any], ledger: Any) -> None:
        self.collate = collate
        self.ledger = ledger

    def __call__(self, samples: Sequence[Any]) -> Any:
        return collate_or_release(self.collate, samples, self.ledger)

    def __repr__(self) -> str:
        return f"GuardedCollate({self.collate!r}, {self.ledger!r})"
