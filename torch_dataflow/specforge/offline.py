"""A drop-in for SpecForge's offline EAGLE3 data helpers, with leases and resharding.

SpecForge 0.2.0 trains offline from ``build_offline_eagle3_dataset(path, max_len)``
(an ``OfflineEagle3Dataset``), ``prepare_dp_dataloaders(dataset, batch_size, ...)``
(a ``DistributedSampler`` and its ``DataCollatorWithPadding``) and
``len(loader)``-based step arithmetic. The functions here have the same names
and arguments, so a script changes its imports, passes a ledger and acks each
optimizer step (docs/specforge.md shows the diff):

- :func:`build_offline_eagle3_dataset` returns an :class:`OfflineEagle3Pool`: a
  :class:`~torch_dataflow.pool.FeaturePool` over the directory (read in place)
  whose items are SpecForge's items (:func:`to_specforge_item`: ``input_ids``,
  ``attention_mask``, ``loss_mask`` [1, N], ``hidden_state`` [1, N, 3H],
  ``target`` [1, N, H]) plus ``"__lease__"`` / ``"__sample_id__"``.
- :func:`prepare_dp_dataloaders` uses a
  :class:`~torch_dataflow.sampler.ReshardingSampler` (``DistributedSampler``'s
  indices, ``drop_last=False``) and SpecForge's own ``DataCollatorWithPadding``
  wrapped in :class:`CarryLeases`, which passes the ``__``-keys around any collator.
- The loader (:class:`SpecForgeLoader`) keeps ``len(loader)`` the full epoch,
  as SpecForge's resume arithmetic expects, and says what a resumed pass
  delivers with :meth:`SpecForgeLoader.remaining`.

**Why SpecForge's collator fails on plain pool items.** ``DataCollatorWithPadding``
takes the batch length from ``item["input_ids"].shape[1]`` and reads
``attention_mask`` and ``target``: it expects ``OfflineEagle3Dataset.process_data``'s
output ([1, N] ids, the aux states renamed ``hidden_state``). A stored sample
holds the file's ``input_ids`` [S] (1-D: ``IndexError: tuple index out of range``)
and ``aux_hidden_state``; its string ``"__lease__"`` would be dropped by the
collator, so nothing could be acked. :func:`to_specforge_item` and
:class:`CarryLeases` close both gaps.

**Not supported** (a :class:`~torch_dataflow.errors.ConfigError`, never different
batches): SpecForge's sequence parallelism (USP: ``use_usp_preprocess=True``,
a collator with ``sp_degree`` / ``ulysses_degree`` > 1 from ``sp_ulysses_size`` /
``sp_ring_size`` > 1).

Example:
    >>> import tempfile, torch
    >>> from torch_dataflow.specforge import write_specforge_directory
    >>> d = tempfile.mkdtemp()
    >>> _ = write_specforge_directory(f"{d}/hs", n=6, seq_lens=4, hidden=8)
    >>> ds = build_offline_eagle3_dataset(f"{d}/hs", max_len=2048, ledger=f"sqlite://{d}/ledger.db")
    >>> def cat(items):  # stands in for SpecForge's DataCollatorWithPadding() (the default)
    ...     return {k: torch.cat([i[k] for i in items]) for k in items[0]}
    >>> loader = prepare_dp_dataloaders(ds, batch_size=2, num_workers=0, collate_fn=cat)
    >>> loader.sampler.set_epoch(0)
    >>> len(loader), loader.remaining()
    (3, 3)
    >>> batch = next(iter(loader))
    >>> batch["hidden_state"].shape, len(batch["__lease__"])
    (torch.Size([2, 4, 24]), 2)
    >>> ds.ack(batch, step=1)
    []
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..errors import ConfigError
from ..ledger import Ledger
from ..pool import FeaturePool
from ..stores import FeatureStore
from ._offline_items import RESERVED as RESERVED  # re-exported: the prefix of keys that ride along a batch
from ._offline_items import CarryLeases, check_no_usp, to_specforge_item

__all__ = [
    "CarryLeases",
    "OfflineEagle3Pool",
    "SpecForgeLoader",
    "TrainedBatch",
    "build_offline_eagle3_dataset",
    "check_no_usp",
    "default_specforge_collator",
    "prepare_dp_dataloaders",
    "to_specforge_item",
]

class OfflineEagle3Pool(FeaturePool):
    """A :class:`FeaturePool` whose items are SpecForge's (:func:`to_specforge_item`).

    Build it with :func:`build_offline_eagle3_dataset` (or
    ``OfflineEagle3Pool.from_specforge(path, ledger=..., max_len=...)``).
    """

    max_len: int = 2048

    @classmethod
    def from_specforge(cls, directory: Any, store: str | FeatureStore | None = None,  # type: ignore[override]
                       ledger: str | Ledger | None = None, *, max_len: int = 2048, **kwargs: Any) -> OfflineEagle3Pool:
        """:meth:`FeaturePool.from_specforge` with SpecForge's ``max_len`` (default 2048)."""
        to_specforge_item({"input_ids": torch.zeros(1), "loss_mask": torch.zeros(1),
                           "hidden_state": torch.zeros(1, 1), "aux_hidden_state": torch.zeros(1, 1)}, max_len)
        pool = super().from_specforge(directory, store, ledger, **kwargs)
        assert isinstance(pool, OfflineEagle3Pool)
        pool.max_len = max_len
        return pool

    def __getitem__(self, key: int | str) -> dict[str, Any]:
        """SpecForge's item for ``key`` (see :meth:`FeaturePool.__getitem__`) with its lease keys."""
        return to_specforge_item(super().__getitem__(key), self.max_len)

    def __getitems__(self, keys: Sequence[Any]) -> list[dict[str, Any]]:  # type: ignore[override]
        """One DataLoader batch as the list of SpecForge items (for any collator)."""
        return [self[k] for k in keys]


def build_offline_eagle3_dataset(
    hidden_states_path: str | os.PathLike[str],
    max_len: int = 2048,
    ttt_length: int = 1,
    use_usp_preprocess: bool = False,
    *,
    ledger: str | Ledger,
    store: str | FeatureStore | None = None,
    progress: bool = False,
) -> OfflineEagle3Pool:
    """SpecForge's ``build_offline_eagle3_dataset`` over a store + ledger.

    Same positional arguments as SpecForge 0.2.0's; ``ledger`` is required.
    The directory is registered in place (idempotent, safe on every rank) unless
    ``store`` names where it was imported (``import_directory``). Items equal
    ``OfflineEagle3Dataset``'s, in its file order.

    Args:
        hidden_states_path: SpecForge's ``--hidden-states-path``.
        max_len: SpecForge's ``--max-length``.
        ttt_length: accepted for signature parity (only USP uses it).
        use_usp_preprocess: ``True`` is refused (USP is not supported).
        ledger: ledger URI or instance (``sqlite:///...``, ``redis://...``).
        store: ``None`` (read in place) or the store it was imported into.
        progress: a progress bar while registering.

    Raises:
        ConfigError: USP asked for, a bad ``max_len``, a missing directory, or an
            imported ``store`` that does not hold the directory.

    Example:
        >>> ds = build_offline_eagle3_dataset("/data/hs", 2048, ledger="sqlite:///data/ledger.db")  # doctest: +SKIP
    """
    del ttt_length
    check_no_usp(use_usp_preprocess=use_usp_preprocess)
    return OfflineEagle3Pool.from_specforge(hidden_states_path, store, ledger, max_len=max_len, progress=progress)


class TrainedBatch(dict):  # type: ignore[type-arg]
    """A placeholder for a batch trained before the restart (see :class:`SpecForgeLoader`).

    Skipping it is free; reading it raises :class:`ConfigError` (training on it would
    mean the loop did not skip what the checkpoint already holds)."""

    def __getitem__(self, key: Any) -> Any:
        raise ConfigError(
            "this batch was trained before the restart and is only a placeholder: skip the epoch's first "
            "len(loader) - loader.remaining() batches (SpecForge's skip_steps) or call loader.seek(n)"
        )


class SpecForgeLoader(DataLoader):
    """The ``DataLoader`` of :func:`prepare_dp_dataloaders`: SpecForge's epoch arithmetic on a ledger.

    ``len(loader)`` is the whole epoch's batches on this rank, also after a
    restart, as with ``DistributedSampler`` (``total_steps = epochs * len(loader)``
    and ``skip_steps = global_step - epoch * len(loader)`` keep their meaning).
    :meth:`remaining` is what this pass still delivers (``len(loader)`` in a
    fresh epoch). A resumed epoch delivers exactly the samples its checkpoint
    lacks, whichever way the script skips its trained prefix:

    - ``loader.seek(n)`` (SpecForge 0.2.0's ``TrainerController`` calls it):
      the next iteration yields only the remaining batches; ``n`` must be the
      trained prefix, ``len(loader) - loader.remaining()``, else a
      :class:`ConfigError` (the checkpoint and the ledger disagree);
    - no ``seek`` (a script that skips its first ``skip_steps`` batches, or
      ``itertools.islice``): the iteration first yields that many
      :class:`TrainedBatch` placeholders (nothing read or leased), then the
      remaining batches.
    """

    def __len__(self) -> int:
        """Full-epoch batches on this rank (``DistributedSampler``'s count)."""
        return len(self.sampler) // self._batch()

    def _batch(self) -> int:
        if self.batch_size is None:
            raise ConfigError("SpecForgeLoader needs a batch_size")
        return int(self.batch_size)

    def remaining(self) -> int:
        """Batches the current epoch still delivers on this rank (the rest of the epoch)."""
        return self.sampler.remaining() // self._batch()  # type: ignore[attr-defined]

    def seek(self, num_batches: int) -> None:
        """Skip the trained first ``num_batches`` of the next iteration (one-shot; see the class docs)."""
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0:
            raise ConfigError(f"seek takes a batch count >= 0, got {num_batches!r}")
        self._seek = num_batches

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        """The epoch: the trained prefix skipped or as placeholders, then the remaining batches."""
        full, left = len(self), self.remaining()
        prefix = full - left
        seek, self._seek = getattr(self, "_seek", None), None
        if seek is not None and seek != prefix:
            raise ConfigError(
                f"seek({seek}) but the ledger has {prefix} of this epoch's {full} batches trained on this rank: "
                "resume from the checkpoint the ledger was reconciled to (pool.reconcile(step)), at the same world size"
            )
        if seek is None:
            for _ in range(prefix):
                yield TrainedBatch()
        yield from super().__iter__()


def default_specforge_collator() -> Any:
    """SpecForge's ``DataCollatorWithPadding()`` (needs the ``specforge`` package).

    Raises:
        ConfigError: SpecForge is not importable, or its collator is set up for USP.
    """
    try:
        from specforge.data.utils import DataCollatorWithPadding
    except ImportError as e:
        raise ConfigError(f"SpecForge's collator is not importable ({e}): pip install specforge, or pass "
                          "collate_fn=torch_dataflow.eagle3.Eagle3Collator(max_len=...) to collate stored samples") from e
    collate = DataCollatorWithPadding()
    check_no_usp(collate)
    return collate


def prepare_dp_dataloaders(
    dataset: FeaturePool,
    batch_size: int,
    num_workers: int = 4,
    process_group: Any = None,
    pin_memory: bool | None = False,
    shuffle: bool | None = False,
    prefetch_factor: int | None = 2,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    seed: int = 0,
    lease_ttl: float = 300.0,
    num_replicas: int | None = None,
    rank: int | None = None,
    **dataloader_kwargs: Any,
) -> SpecForgeLoader:
    """SpecForge's ``prepare_dp_dataloaders`` over a pool: same arguments, same batches.

    A :class:`~torch_dataflow.sampler.ReshardingSampler` replaces
    ``DistributedSampler`` (``num_replicas`` / ``rank`` from ``process_group``,
    ``shuffle``, ``drop_last=False``: the same indices per rank), SpecForge's
    ``DataCollatorWithPadding()`` (or ``collate_fn``) is wrapped in
    :class:`CarryLeases`, and the loader drops its last partial batch
    (``drop_last=True``) as SpecForge's does.

    Args:
        dataset: an :class:`OfflineEagle3Pool` (:func:`build_offline_eagle3_dataset`)
            or any :class:`FeaturePool`.
        batch_size, num_workers, pin_memory, shuffle, prefetch_factor: as SpecForge's.
        process_group: the data-parallel group (``None``: the default group, or 1 rank
            when ``torch.distributed`` is not initialised).
        collate_fn: a collator instead of SpecForge's (wrapped too).
        seed: the shuffle seed (``DistributedSampler``'s default 0).
        lease_ttl: see :class:`~torch_dataflow.sampler.ReshardingSampler`.
        num_replicas, rank: override the group's (a launcher without ``torch.distributed``).
        dataloader_kwargs: passed on to ``DataLoader``.

    Raises:
        ConfigError: USP in SpecForge's collator, SpecForge not importable without
            ``collate_fn``, or a dataset that is not a pool.

    Example:
        >>> loader = prepare_dp_dataloaders(ds, 4, num_workers=2, shuffle=True, process_group=dp_group)  # doctest: +SKIP
    """
    from ..sampler import ReshardingSampler

    if not isinstance(dataset, FeaturePool):
        raise ConfigError(f"prepare_dp_dataloaders takes a FeaturePool (build_offline_eagle3_dataset), "
                          f"got {type(dataset).__name__}")
    if num_replicas is not None or rank is not None:
        world, rank = (1 if num_replicas is None else num_replicas), (0 if rank is None else rank)
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        world, rank = torch.distributed.get_world_size(process_group), torch.distributed.get_rank(process_group)
    else:
        world, rank = 1, 0
    collate = default_specforge_collator() if collate_fn is None else collate_fn
    check_no_usp(collate)
    sampler = ReshardingSampler(dataset, num_replicas=world, rank=rank, shuffle=bool(shuffle), seed=seed,
                                lease_ttl=lease_ttl)
    return SpecForgeLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=bool(pin_memory),
        prefetch_factor=None if num_workers == 0 else prefetch_factor,
        collate_fn=CarryLeases(collate, dataset.ledger),
        drop_last=True,
        **dataloader_kwargs,
    )
