"""Sampler checks of :class:`torch_dataflow.lightning.FeatureAckCallback`: refuse a
``ReshardingSampler`` wrapped in another ``DistributedSampler``, and restart the in-epoch
batch count of a mid-epoch resume over one (the ledger decides what is left)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from .errors import ConfigError

log = logging.getLogger("torch_dataflow.lightning")  # the callback's logger, as before the split


def _train_loaders(trainer: pl.Trainer) -> list[Any]:
    """The trainer's train loaders as a flat list (one loader, a list, a dict or Lightning's CombinedLoader)."""
    loaders = trainer.train_dataloader
    return loaders.flattened if hasattr(loaders, "flattened") else (
        list(loaders.values()) if isinstance(loaders, Mapping) else
        list(loaders) if isinstance(loaders, (list, tuple)) else [loaders])


_SAMPLER_FIX = ("the ReshardingSampler is wrapped in another DistributedSampler: every rank would lease its "
                "whole share of the epoch but train only 1/world of it. Give the DataLoader the "
                "ReshardingSampler itself (it is a DistributedSampler, so Lightning's default "
                "use_distributed_sampler=True leaves it in place).")


def _refuse_wrapped_sampler(trainer: pl.Trainer) -> None:
    """The train loader's sampler is a DistributedSampler over a ReshardingSampler (wrapped by
    hand: Lightning does not wrap a ReshardingSampler, which is a DistributedSampler)."""
    from torch.utils.data import DistributedSampler

    from .sampler import ReshardingSampler

    flat = _train_loaders(trainer)
    for loader in flat:
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler) and not isinstance(sampler, ReshardingSampler):
            inner = getattr(sampler.dataset, "_sampler", None)  # Lightning's _DatasetSamplerWrapper
            if isinstance(inner, ReshardingSampler):
                raise ConfigError(_SAMPLER_FIX)


def _reset_resharded_progress(trainer: pl.Trainer) -> None:
    """A mid-epoch resume over a :class:`ReshardingSampler`: the sampler's ``len`` is what
    is left of the epoch (the ledger decides), while Lightning restored the count of
    batches already run and would end the epoch when that count reaches ``len``,
    leaving the rest pending. Start the in-epoch count from 0 so the epoch runs exactly
    what is left."""
    from .sampler import ReshardingSampler

    flat = _train_loaders(trainer)
    resharded = any(isinstance(getattr(dl, "sampler", None), ReshardingSampler) or
                    isinstance(getattr(getattr(dl, "batch_sampler", None), "sampler", None), ReshardingSampler)
                    for dl in flat)
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if resharded and progress.current.ready:
        log.info("mid-epoch resume over a ReshardingSampler: running the %d batches left of the epoch "
                 "(Lightning had restored %d)", trainer.num_training_batches, progress.current.ready)
        progress.current.reset()
