"""Per-sample and per-batch adapters of :mod:`torch_dataflow.specforge.offline` (which
re-exports them): SpecForge's item layout, the USP refusal, and :class:`CarryLeases`,
the collate wrapper that keeps the ``__``-keys (leases, sample ids) through any collator."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..collate_guard import collate_or_release
from ..errors import ConfigError
from ..ledger import Ledger

RESERVED = "__"
_USP = ("SpecForge's sequence parallelism (USP: sp_ulysses_size / sp_ring_size > 1, use_usp_preprocess=True) "
        "is not supported by torch_dataflow's offline drop-in: its per-rank slices would differ from SpecForge's. "
        "Train with sp_ulysses_size=1 and sp_ring_size=1, or keep SpecForge's own loader for USP runs")


def check_no_usp(collate: Any = None, *, use_usp_preprocess: bool = False) -> None:
    """Raise :class:`ConfigError` if a SpecForge setting asks for sequence parallelism.

    ``collate`` may be SpecForge's ``DataCollatorWithPadding``, which reads its
    ``sp_degree`` / ``ulysses_degree`` from SpecForge's process groups.

    Example:
        >>> class Collator:  # what DataCollatorWithPadding holds under sp_ulysses_size=2
        ...     sp_degree, ulysses_degree = 2, 2
        >>> check_no_usp(Collator())
        Traceback (most recent call last):
        ...
        torch_dataflow.errors.ConfigError: SpecForge's sequence parallelism (USP: ...
    """
    degrees = {k: getattr(collate, k, 1) for k in ("sp_degree", "ulysses_degree")}
    if use_usp_preprocess or any(int(v) > 1 for v in degrees.values()):
        found = "use_usp_preprocess=True" if use_usp_preprocess else ", ".join(f"{k}={v}" for k, v in degrees.items())
        raise ConfigError(f"{_USP} (got {found})")


def to_specforge_item(sample: Mapping[str, Any], max_len: int = 2048) -> dict[str, Any]:
    """One stored SpecForge sample as ``OfflineEagle3Dataset`` returns it.

    Truncated to ``max_len``; ``input_ids`` / ``loss_mask`` / ``attention_mask``
    [1, N] int64 with the last ``loss_mask`` position zeroed; ``hidden_state`` =
    the aux states [1, N, 3H] and ``target`` = the final states [1, N, H], in
    their stored dtype. ``__``-keys (lease, sample id) pass through. The
    sample's tensors are not modified (a store may hand out shared views).

    Raises:
        ConfigError: ``max_len`` < 1, or a key SpecForge needs is missing.

    Example:
        >>> import torch
        >>> s = {"input_ids": torch.arange(5), "loss_mask": torch.ones(5, dtype=torch.long),
        ...      "hidden_state": torch.zeros(1, 5, 2), "aux_hidden_state": torch.zeros(1, 5, 6), "__lease__": "l"}
        >>> item = to_specforge_item(s, max_len=4)
        >>> item["input_ids"].shape, item["loss_mask"].tolist(), item["hidden_state"].shape, item["__lease__"]
        (torch.Size([1, 4]), [[1, 1, 1, 0]], torch.Size([1, 4, 6]), 'l')
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ConfigError(f"max_len must be an int >= 1 (SpecForge's --max-length; default 2048), got {max_len!r}")
    missing = [k for k in ("input_ids", "loss_mask", "hidden_state", "aux_hidden_state") if k not in sample]
    if missing:
        raise ConfigError(f"a SpecForge sample needs {missing} (keys: {sorted(sample)}): is this a SpecForge pool?")

    def seq(t: torch.Tensor) -> torch.Tensor:  # [S] or [1, S] -> [1, N]
        return t.reshape(-1)[:max_len][None, :]

    def states(t: torch.Tensor) -> torch.Tensor:  # [1, S, D] or [S, D] -> [1, N, D]
        return (t[0] if t.dim() == 3 else t)[:max_len][None, :]

    loss_mask = seq(sample["loss_mask"]).clone()
    loss_mask[0, -1] = 0
    item: dict[str, Any] = {
        "attention_mask": torch.ones_like(loss_mask, dtype=torch.long),
        "loss_mask": loss_mask,
        "target": states(sample["hidden_state"]),
        "hidden_state": states(sample["aux_hidden_state"]),
        "input_ids": seq(sample["input_ids"]),
    }
    item.update({k: v for k, v in sample.items() if k.startswith(RESERVED)})
    return item


class CarryLeases:
    """Wrap any collate function so the batch keeps the samples' ``__``-keys.

    Each item's ``__``-keys (``"__lease__"``, ``"__sample_id__"``) are taken out
    before ``collate`` sees it and put back into the batch as lists, in sample
    order, so ``pool.ack(batch, step)`` and the training callbacks work with a
    collator that knows nothing about them (SpecForge's ``DataCollatorWithPadding``
    keeps only its own keys). With ``ledger``, a batch that fails to collate
    gives its leases back at once and raises
    :class:`~torch_dataflow.errors.CollateError` naming its samples.

    Args:
        collate: the collate function (any callable on a list of items).
        ledger: optional ledger for the give-back on failure.

    Raises:
        ConfigError: (when called) the collator does not return a dict, or
            returns a key starting with ``__`` itself.

    Example:
        >>> import torch
        >>> from torch.utils.data import default_collate
        >>> items = [{"x": torch.tensor([i]), "__lease__": f"l{i}", "__sample_id__": f"s{i}"} for i in range(2)]
        >>> batch = CarryLeases(lambda xs: {"x": torch.cat([i["x"] for i in xs])})(items)
        >>> batch["x"].tolist(), batch["__lease__"], batch["__sample_id__"]
        ([0, 1], ['l0', 'l1'], ['s0', 's1'])
    """

    def __init__(self, collate: Callable[[list[Any]], Any], ledger: Ledger | None = None) -> None:
        if not callable(collate):
            raise ConfigError(f"CarryLeases wraps a collate function, got {type(collate).__name__}")
        self.collate, self.ledger = collate, ledger

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        items = list(samples)
        return collate_or_release(self._collate, items, self.ledger)

    def _collate(self, items: list[Mapping[str, Any]]) -> dict[str, Any]:
        keys = sorted({k for item in items for k in item if k.startswith(RESERVED)})
        batch = self.collate([{k: v for k, v in item.items() if not k.startswith(RESERVED)} for item in items])
        if not isinstance(batch, Mapping):
            raise ConfigError(f"CarryLeases needs a collator that returns a dict, got {type(batch).__name__}")
        clash = [k for k in keys if k in batch]
        if clash:
            raise ConfigError(f"the collator returned {clash} itself: CarryLeases would overwrite them")
        out = dict(batch)
        for k in keys:
            out[k] = [str(item.get(k, "")) for item in items]  # "" (no lease): a sample ack skips
        return out

    def __repr__(self) -> str:
        return f"CarryLeases({self.collate!r})"
