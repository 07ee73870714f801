"""A DataLoader that takes ``shuffle`` and ``drop_last`` for a FeatureStoreDataset.

``torch.utils.data.DataLoader`` rejects ``shuffle=True`` for an
``IterableDataset``; :class:`FeatureLoader` hands ``batch_size`` and
``shuffle`` to the dataset (which shuffles and balances through the ledger)
and calls the base class with ``shuffle=None``. Offline, ``len(loader)`` is
the whole epoch's batches on this rank (also after a restart) and
:meth:`FeatureLoader.remaining` what the epoch still yields. With workers over a store whose
client does not survive ``fork()`` (Mooncake: a resumed run's drain already used
it in this process), the workers start with ``forkserver`` unless
``multiprocessing_context`` is given.

Example:
    >>> from torch_dataflow import FeatureLoader, FeatureStoreDataset
    >>> ds = FeatureStoreDataset("memory://fl-doc", "memory://fl-doc", mode="offline")
    >>> loader = FeatureLoader(ds, batch_size=4, shuffle=True)
    >>> ds.batch_size, len(loader), loader.remaining()
    (4, 0, 0)
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, default_collate, default_convert

from .collate_guard import GuardedCollate
from .dataset import FeatureStoreDataset

__all__ = ["FeatureLoader"]


class FeatureLoader(DataLoader):
    """``DataLoader`` for :class:`FeatureStoreDataset` with DataLoader-style arguments."""

    def __init__(self, dataset: FeatureStoreDataset, batch_size: int | None = 1, shuffle: bool | None = None,
                 **kwargs: Any) -> None:
        if not isinstance(dataset, FeatureStoreDataset):
            raise TypeError(f"FeatureLoader takes a FeatureStoreDataset, got {type(dataset).__name__}")
        dataset.configure(batch_size=batch_size or 1, shuffle=shuffle, drop_last=bool(kwargs.get("drop_last", False)))
        # A batch that fails to collate names its sample ids and gives its leases back at once.
        collate = kwargs.pop("collate_fn", None)
        if collate is None:
            collate = default_convert if batch_size is None else default_collate
        if not isinstance(collate, GuardedCollate):
            collate = GuardedCollate(collate, dataset.ledger)
        if (kwargs.get("num_workers") or 0) > 0 and kwargs.get("multiprocessing_context") is None \
                and not getattr(dataset.store, "fork_safe", True):
            # A resumed run's drain or an earlier epoch used the store in this process: forked
            # workers could not start a client of their own (Mooncake), forkserver ones can.
            kwargs["multiprocessing_context"] = "forkserver"
        super().__init__(dataset, batch_size=batch_size, shuffle=None, collate_fn=collate, **kwargs)

    def remaining(self) -> int:
        """Offline: batches the current epoch still yields on this rank (``len(loader)``
        is the whole epoch's, also after a restart; see ``FeatureStoreDataset.__len__``)."""
        n, b = self.dataset.remaining(), self.batch_size or 1  # type: ignore[attr-defined]
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Forward to the dataset (Lightning and training loops call this per epoch)."""
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
