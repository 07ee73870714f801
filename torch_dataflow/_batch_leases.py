"""The lease ids a batch carries, wherever the loaders nested them (used by
:class:`~torch_dataflow.acking.StepAcker` and re-exported by :mod:`torch_dataflow.acking`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .dataset import LEASE_KEY

__all__ = ["find_lease_ids", "has_lease_key"]


def find_lease_ids(batch: Any) -> list[str]:
    """Every lease id in ``batch``, however nested (a collated batch, a list of
    samples, a dict or tuple of batches from several loaders). Tensors and
    other leaves are skipped; the ids sit under the ``"__lease__"`` key."""
    out: list[str] = []
    if isinstance(batch, Mapping):
        ids = batch.get(LEASE_KEY)
        if ids is not None:
            # "" marks a padded repeat (ReshardingSampler, planned steps): nothing to ack.
            out += [x for x in ([ids] if isinstance(ids, str) else [str(x) for x in ids]) if x]
        for key, value in batch.items():
            if key != LEASE_KEY and isinstance(value, (Mapping, list, tuple)):
                out += find_lease_ids(value)
    elif isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, (Mapping, list, tuple)):
                out += find_lease_ids(item)
    return out


def has_lease_key(batch: Any) -> bool:
    """True when ``batch`` carries a ``"__lease__"`` entry anywhere, even one holding
    only padding (``""``): a padded-only batch is a real batch with nothing to ack."""
    if isinstance(batch, Mapping):
        return LEASE_KEY in batch or any(has_lease_key(v) for k, v in batch.items()
                                         if isinstance(v, (Mapping, list, tuple)))
    if isinstance(batch, (list, tuple)):
        return any(has_lease_key(v) for v in batch if isinstance(v, (Mapping, list, tuple)))
    return False
