"""The same source as a ``torch.utils.data.IterDataPipe`` and a ``torchdata.nodes`` node.

torch core still ships ``IterDataPipe`` (torchdata >= 0.10 removed its own
DataPipes); ``torchdata.nodes`` is the successor API. Both faces read a
:class:`~torch_dataflow.FeatureStoreDataset`, so sharding, leases and acks are
the dataset's. Their state (``get_state`` / ``state_dict``) carries the epoch
and a counter, never a position to skip to: which samples remain is the
ledger's to say, so restoring a state can neither re-deliver an acked sample
nor skip an unacked one. Importing this module imports ``torchdata``.

Example:
    >>> import tempfile, torch
    >>> from torchdata.nodes import Loader
    >>> from torch_dataflow import FeatureStoreDataset, FeatureWriter
    >>> from torch_dataflow.nodes import feature_nodes
    >>> d = tempfile.mkdtemp()
    >>> store, ledger = f"file://{d}/s", f"sqlite://{d}/l.db"
    >>> with FeatureWriter(store, ledger) as w:
    ...     for i in range(5):
    ...         _ = w.put(f"s{i}", {"x": torch.ones(3) * i})
    >>> ds = FeatureStoreDataset(store, ledger, mode="offline", batch_size=2)
    >>> loader = Loader(feature_nodes(ds, batch_size=2))
    >>> [b["x"].shape[0] for b in loader]
    [2, 2, 1]
    >>> state = loader.state_dict()        # restore with Loader(...).load_state_dict(state)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch.utils.data import IterDataPipe
from torch.utils.data._utils.collate import default_collate
from torchdata.nodes import BaseNode, Batcher, Mapper, ParallelMapper, Prefetcher

from .dataset import FeatureStoreDataset

__all__ = ["FeatureDataPipe", "FeatureNode", "feature_nodes"]

_VERSION = 1


def _check(dataset: Any) -> FeatureStoreDataset:
    if not isinstance(dataset, FeatureStoreDataset):
        raise TypeError(f"expected a FeatureStoreDataset, got {type(dataset).__name__}")
    return dataset


class FeatureNode(BaseNode[dict[str, Any]]):
    """A ``torchdata.nodes`` source yielding the samples of a dataset (with their
    ``"__lease__"`` / ``"__sample_id__"`` strings), in the calling thread.

    ``get_state()`` is ``{"dataset": {"epoch": e}, "yielded": n}``;
    ``reset(state)`` restores the epoch and the counter and starts a fresh
    pass that leases whatever the ledger still has pending.

    Args:
        dataset: the :class:`~torch_dataflow.FeatureStoreDataset` to read.

    Example:
        >>> from torch_dataflow import FeatureStoreDataset
        >>> node = FeatureNode(FeatureStoreDataset("memory://fn-doc", "memory://fn-doc", mode="offline"))
        >>> node.reset({"dataset": {"epoch": 3}, "yielded": 7, "version": 1})
        >>> node.dataset.epoch, node.get_state()["yielded"]
        (3, 7)
    """

    def __init__(self, dataset: FeatureStoreDataset) -> None:
        super().__init__()
        self.dataset = _check(dataset)
        self.yielded = 0
        self._it: Iterator[dict[str, Any]] | None = None

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        if initial_state is not None:
            self.dataset.load_state_dict(initial_state["dataset"])
            self.yielded = int(initial_state.get("yielded", 0))
        else:
            self.yielded = 0
        self._it = None  # opened lazily: leasing starts with the first next()

    def next(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(self.dataset)
        item = next(self._it)
        self.yielded += 1
        return item

    def get_state(self) -> dict[str, Any]:
        return {"version": _VERSION, "dataset": self.dataset.state_dict(), "yielded": self.yielded}


def feature_nodes(dataset: FeatureStoreDataset, batch_size: int, *, num_workers: int = 0,
                  map_fn: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                  collate_fn: Callable[[list[Any]], Any] = default_collate, drop_last: bool = False,
                  prefetch: int = 2) -> BaseNode[Any]:
    """A ready pipeline: :class:`FeatureNode` -> per-sample ``map_fn`` (on
    ``num_workers`` threads if > 0) -> ``Batcher`` -> collate -> ``Prefetcher``.
    Wrap it in ``torchdata.nodes.Loader`` for ``state_dict`` / ``load_state_dict``.

    Args:
        dataset: the source; its ``batch_size`` is set to ``batch_size``.
        batch_size: samples per batch.
        num_workers: threads for ``map_fn`` (0: in the calling thread).
        map_fn: a per-sample transform (must keep the ``"__"`` keys).
        collate_fn: builds a batch from a list of samples.
        drop_last: drop a short final batch. Its samples stay leased, never
            acked, so they are delivered again after the lease expires or on
            the next reconcile: prefer ``False``.
        prefetch: batches prefetched ahead (0: none).

    Example:
        >>> from torch_dataflow import FeatureStoreDataset
        >>> root = feature_nodes(FeatureStoreDataset("memory://fnp", "memory://fnp", mode="offline"), 4)
        >>> type(root).__name__
        'Prefetcher'
    """
    dataset.configure(batch_size=batch_size)
    node: BaseNode[Any] = FeatureNode(dataset)
    if num_workers > 0:
        node = ParallelMapper(node, map_fn=map_fn or _identity, num_workers=num_workers, in_order=True,
                              method="thread")
    elif map_fn is not None:
        node = Mapper(node, map_fn)
    node = Mapper(Batcher(node, batch_size=batch_size, drop_last=drop_last), collate_fn)
    return Prefetcher(node, prefetch_factor=prefetch) if prefetch > 0 else node


def _identity(x: dict[str, Any]) -> dict[str, Any]:
    return x


class FeatureDataPipe(IterDataPipe):
    """An ``IterDataPipe`` over a dataset: ``DataLoader(FeatureDataPipe(ds),
    batch_size=B, num_workers=W)`` works like ``DataLoader(ds, ...)`` (rank and
    worker sharding are the dataset's). :meth:`get_state` and
    ``reset(initial_state)`` mirror :class:`FeatureNode`.

    Under ``StatefulDataLoader`` pass the dataset itself, not this pipe: the
    loader wraps every ``IterDataPipe`` in torch's serialization wrapper, which
    hides the pipe's state, so on resume it would fast-forward by position
    (leasing and dropping batches that were never trained; they would only
    come back after their lease expires or at the next reconcile).

    Args:
        dataset: the :class:`~torch_dataflow.FeatureStoreDataset` to read.

    Example:
        >>> from torch_dataflow import FeatureStoreDataset
        >>> pipe = FeatureDataPipe(FeatureStoreDataset("memory://dp-doc", "memory://dp-doc", mode="offline"))
        >>> pipe.load_state_dict({"epoch": 2}); pipe.state_dict()
        {'epoch': 2}
    """

    def __init__(self, dataset: FeatureStoreDataset) -> None:
        super().__init__()
        self.dataset = _check(dataset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self.dataset

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.dataset.load_state_dict(state)

    def get_state(self) -> dict[str, Any]:
        return {"version": _VERSION, "dataset": self.dataset.state_dict()}

    def reset(self, initial_state: Mapping[str, Any] | None = None) -> None:
        # Also called with no argument by the DataPipe machinery at each new iterator.
        if initial_state is not None:
            self.dataset.load_state_dict(initial_state["dataset"])

    def ack(self, batch: Any, step: int, *, strict: bool = False) -> list[str]:
        """Forward to :meth:`FeatureStoreDataset.ack`."""
        return self.dataset.ack(batch, step, strict=strict)
