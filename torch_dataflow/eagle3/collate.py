"""Collate EAGLE3 feature samples into SpecForge's offline training batch.

A *feature sample* is what SpecForge's ``scripts/prepare_hidden_states.py``
writes per sample (and what :class:`~torch_dataflow.eagle3.Eagle3FeatureExtractor`
produces)::

    input_ids         int64  [S]        (or [1, S])
    loss_mask         int64  [S]        (or [1, S])
    hidden_state      bf16   [1, S, H]  (or [S, H])   final state, after the norm
    aux_hidden_state  bf16   [1, S, 3H] (or [S, 3H])  three captured layers

The batch is exactly what SpecForge's ``OfflineEagle3Dataset.process_data``
followed by ``DataCollatorWithPadding`` (``sp_degree == 1``) gives::

    input_ids       [B, N]      attention_mask [B, N] int64 (ones, then zero padding)
    loss_mask       [B, N]      hidden_state   [B, N, 3H]  (from aux_hidden_state)
    target          [B, N, H]   (from hidden_state)        position_ids [B, N] (optional)

Per sample, in SpecForge's order: every tensor is truncated to ``max_len``
first, *then* the last kept position of ``loss_mask`` is set to 0 (so a
truncated sample loses the loss of its last kept token, not of its original
last token). Padding is on the right with zeros, up to the longest sample in
the batch (rounded up to ``pad_to_multiple_of``). Dtypes are kept; the
caller's tensors are never modified.

Keys that start with ``"__"`` (``"__lease__"``, ``"__sample_id__"``, added by
:class:`~torch_dataflow.FeatureStoreDataset`) are passed through as lists in
sample order. Other extra keys are ignored, as SpecForge ignores them.

Example:
    >>> import torch
    >>> s = {"input_ids": torch.tensor([5, 6, 7]), "loss_mask": torch.ones(3, dtype=torch.long),
    ...      "hidden_state": torch.zeros(1, 3, 4), "aux_hidden_state": torch.zeros(1, 3, 12),
    ...      "__sample_id__": "a"}
    >>> batch = eagle3_collate([s, s], max_len=2)
    >>> batch["loss_mask"].tolist(), batch["target"].shape, batch["__sample_id__"]
    ([[1, 0], [1, 0]], torch.Size([2, 2, 4]), ['a', 'a'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["BATCH_KEYS", "FEATURE_KEYS", "RESERVED_PREFIX", "Eagle3Collator", "eagle3_collate"]

RESERVED_PREFIX = "__"
"""Keys starting with this are bookkeeping (lease, sample id), passed through as lists."""

FEATURE_KEYS = ("input_ids", "loss_mask", "hidden_state", "aux_hidden_state")
"""Keys every feature sample must carry (SpecForge's offline file layout)."""

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask", "hidden_state", "target")
"""Keys of every batch, in SpecForge's order (``position_ids`` is optional)."""


def _tokens(t: Any, name: str, where: str) -> torch.Tensor:
    """A per-token tensor as [S]; accepts [S] or [1, S]."""
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{where}: {name!r} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ConfigError(f"{where}: {name!r} must have shape [S] or [1, S], got {list(t.shape)}")
    return t


def _states(t: Any, name: str, where: str) -> torch.Tensor:
    """A hidden-state tensor as [S, D]; accepts [S, D] or [1, S, D]."""
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{where}: {name!r} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 2:
        raise ConfigError(
            f"{where}: {name!r} must have shape [S, D] or [1, S, D], got {list(t.shape)}"
            + (" (a file holding a whole batch is not a SpecForge sample file)" if t.dim() == 3 else "")
        )
    return t


def _spec_shape(spec: Any, dims: int) -> tuple[int, ...] | None:
    """A stored tensor's shape without its leading batch dim of 1 (as ``_tokens`` / ``_states``
    drop it); ``None`` unless that leaves ``dims`` dims."""
    shape = tuple(spec.shape)
    if len(shape) == dims + 1 and shape[0] == 1:
        shape = shape[1:]
    return shape if len(shape) == dims else None


def _torch_dtype(name: str) -> torch.dtype | None:
    from ..codec import DTYPES

    d = getattr(torch, name, None)
    return d if isinstance(d, torch.dtype) and d in DTYPES else None


def _pad_right(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 0 of ``t`` up to ``length`` (a new tensor, never a view of ``t``)."""
    out = t.new_zeros((length, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


@dataclass(frozen=True, kw_only=True)
class Eagle3Collator:
    """A ``collate_fn`` producing SpecForge's offline EAGLE3 training batch.

    Attributes:
        max_len: truncate every sample to this many tokens (default 2048,
            SpecForge's ``--max-length`` default); ``None`` keeps full length.
        with_position_ids: add ``position_ids`` = ``arange(S)`` per sample,
            zero-padded like the other ``[B, N]`` keys.
        pad_to_multiple_of: round the batch length up to a multiple of this
            (SpecForge rounds to its sequence-parallel degree; 1 = no rounding).
        num_aux_layers: the aux width must be this many times the target width.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> collate = Eagle3Collator(max_len=2048, with_position_ids=True)
        >>> loader = DataLoader([], batch_size=4, collate_fn=collate)
    """

    max_len: int | None = 2048
    with_position_ids: bool = False
    pad_to_multiple_of: int = 1
    num_aux_layers: int = 3
    #: the ledger the samples were leased from: a batch that fails to collate gives its
    #: leases back to it at once (FeatureLoader does this for any collate_fn).
    ledger: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_len is not None and (isinstance(self.max_len, bool) or int(self.max_len) < 1):
            raise ConfigError(f"max_len must be None or an int >= 1, got {self.max_len!r}")
        if int(self.pad_to_multiple_of) < 1:
            raise ConfigError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of!r}")
        if int(self.num_aux_layers) < 1:
            raise ConfigError(f"num_aux_layers must be >= 1, got {self.num_aux_layers!r}")

    def process(self, sample: Mapping[str, Any], index: int = 0) -> dict[str, torch.Tensor]:
        """One sample as SpecForge's ``process_data`` leaves it, batch dim dropped.

        Returns ``input_ids``, ``attention_mask``, ``loss_mask`` as [n] and
        ``hidden_state`` [n, 3H], ``target`` [n, H], with n = min(S, max_len).

        Raises:
            ConfigError: a key is missing, a shape is wrong, or the lengths or
                widths inside the sample disagree.
        """
        where = f"sample {index}"
        if not isinstance(sample, Mapping):
            raise ConfigError(f"{where} must be a mapping of str to tensor, got {type(sample).__name__}")
        missing = [k for k in FEATURE_KEYS if k not in sample]
        if missing:
            hint = ""
            if "target" in sample:
                hint = " (it has 'target': it looks like an already-collated SpecForge sample, not a feature sample)"
            elif any(k in sample for k in FEATURE_KEYS):
                hint = " (a FeatureStoreDataset or FeaturePool built with fields= reads only those: add these)"
            raise ConfigError(f"{where} is missing {missing}; a feature sample needs {list(FEATURE_KEYS)}{hint}")
        input_ids = _tokens(sample["input_ids"], "input_ids", where)
        loss_mask = _tokens(sample["loss_mask"], "loss_mask", where)
        target = _states(sample["hidden_state"], "hidden_state", where)
        aux = _states(sample["aux_hidden_state"], "aux_hidden_state", where)
        lengths = {k: t.shape[0] for k, t in zip(FEATURE_KEYS, (input_ids, loss_mask, target, aux), strict=True)}
        if len(set(lengths.values())) != 1:
            raise ConfigError(f"{where}: sequence lengths disagree: {lengths}")
        if lengths["input_ids"] == 0:
            raise ConfigError(f"{where} has no tokens")
        h = target.shape[1]
        if aux.shape[1] != self.num_aux_layers * h:
            raise ConfigError(
                f"{where}: aux_hidden_state width {aux.shape[1]} is not {self.num_aux_layers} x hidden_state width {h}"
            )
        n = lengths["input_ids"] if self.max_len is None else min(lengths["input_ids"], int(self.max_len))
        # Truncate first, then zero the last kept loss position: SpecForge's order.
        loss_mask = loss_mask[:n].clone()
        loss_mask[-1] = 0
        return {
            "input_ids": input_ids[:n],
            "attention_mask": torch.ones(n, dtype=torch.long, device=loss_mask.device),
            "loss_mask": loss_mask,
            "hidden_state": aux[:n],
            "target": target[:n],
        }

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate ``samples`` into one batch (see the module docstring).

        Raises:
            CollateError: (a ``ConfigError``) an empty batch, a bad sample, or samples
                whose hidden widths or dtypes differ; the message names the sample ids
                and, with :attr:`ledger`, their leases are given back at once.
        """
        from ..collate_guard import collate_or_release

        direct = getattr(samples, "collate_direct", None)  # a FeaturePool batch (torch_dataflow.batch_read)
        if direct is not None:
            batch = direct(self)
            if batch is not None:
                return batch
            samples = list(samples)  # read here, not inside the guard: a read error stays a read error
        return collate_or_release(self._collate, samples, self.ledger)

    # ---------------------------------------------------- batch-direct layout
    def needed_fields(self) -> tuple[str, ...]:
        """The stored tensors every sample must hold (``fields=`` of a pool read with this
        collator must include them; a batch-direct read refuses a selection without them).

        Example:
            >>> Eagle3Collator().needed_fields()
            ('input_ids', 'loss_mask', 'hidden_state', 'aux_hidden_state')
        """
        return FEATURE_KEYS

    def plan_batch(self, specs: Sequence[tuple[Any, ...]]) -> Any:
        """This collator's batch layout from the samples' committed specs (see
        :class:`torch_dataflow.batch_read.BatchLayout`): rows of ``max_len``-truncated
        tokens and states, padded like :meth:`__call__`. ``None`` for anything
        :meth:`process` would refuse, so the per-sample path raises its usual error.

        Example:
            >>> import torch
            >>> from torch_dataflow import codec
            >>> enc = codec.encode({"input_ids": torch.arange(5), "loss_mask": torch.ones(5, dtype=torch.long),
            ...                     "hidden_state": torch.zeros(1, 5, 4), "aux_hidden_state": torch.zeros(1, 5, 12)})
            >>> plan = Eagle3Collator(max_len=3).plan_batch([enc.specs])
            >>> plan.shapes["hidden_state"][1], plan.lengths
            ((1, 3, 12), [3])
        """
        from ..batch_read import BatchPlan

        rows: list[dict[str, tuple[str, int]]] = []
        lengths: list[int] = []
        kinds: tuple[Any, ...] | None = None
        for sample in specs:
            by = {s.name: s for s in sample}
            if any(k not in by for k in FEATURE_KEYS):
                return None
            ids, lm, hs, aux = (by[k] for k in FEATURE_KEYS)
            shapes = [_spec_shape(ids, 1), _spec_shape(lm, 1), _spec_shape(hs, 2), _spec_shape(aux, 2)]
            if any(sh is None for sh in shapes):
                return None
            seq = {sh[0] for sh in shapes if sh is not None}
            if len(seq) != 1 or 0 in seq:
                return None
            width, aux_width = shapes[2][-1], shapes[3][-1]  # type: ignore[index]
            if aux_width != self.num_aux_layers * width:
                return None
            dtypes = tuple(_torch_dtype(s.dtype) for s in (ids, lm, hs, aux))
            if any(d is None for d in dtypes) or (kinds is not None and kinds != (*dtypes, width)):
                return None
            kinds = (*dtypes, width)
            full = seq.pop()
            n = full if self.max_len is None else min(full, int(self.max_len))
            rows.append({
                "input_ids": ("input_ids", n * ids.nbytes // full),
                "loss_mask": ("loss_mask", n * lm.nbytes // full),
                "aux_hidden_state": ("hidden_state", n * aux.nbytes // full),
                "hidden_state": ("target", n * hs.nbytes // full),
            })
            lengths.append(n)
        if kinds is None:
            return None
        d_ids, d_lm, d_hs, d_aux, width = kinds
        m = int(self.pad_to_multiple_of)
        b, length = len(rows), -(-max(lengths) // m) * m
        shapes_out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
            "input_ids": (d_ids, (b, length)),
            "attention_mask": (torch.long, (b, length)),
            "loss_mask": (d_lm, (b, length)),
            "hidden_state": (d_aux, (b, length, self.num_aux_layers * width)),
            "target": (d_hs, (b, length, width)),
        }
        if self.with_position_ids:
            shapes_out["position_ids"] = (torch.long, (b, length))
        return BatchPlan(shapes=shapes_out, rows=rows, lengths=lengths)

    def finish_batch(self, batch: dict[str, torch.Tensor], plan: Any) -> dict[str, Any]:
        """Masks and positions of a batch read by :meth:`plan_batch`'s layout (SpecForge's
        order: the last *kept* loss position is zeroed)."""
        mask = batch["attention_mask"]
        mask.zero_()
        for i, n in enumerate(plan.lengths):
            batch["loss_mask"][i, n - 1] = 0
            mask[i, :n] = 1
        if "position_ids" in batch:
            pos = batch["position_ids"]
            pos.zero_()
            for i, n in enumerate(plan.lengths):
                pos[i, :n] = torch.arange(n)
        return batch

    def _collate(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if len(samples) == 0:
            raise ConfigError("cannot collate an empty batch")
        rows = [self.process(s, i) for i, s in enumerate(samples)]
        first = rows[0]
        for i, row in enumerate(rows[1:], start=1):
            for key in BATCH_KEYS:
                a, b = first[key], row[key]
                if a.shape[1:] != b.shape[1:]:
                    raise ConfigError(
                        f"sample {i}: {key!r} width {list(b.shape[1:])} differs from sample 0's "
                        f"{list(a.shape[1:])} (mismatched hidden size H in one batch)"
                    )
                if a.dtype != b.dtype:
                    raise ConfigError(f"sample {i}: {key!r} dtype {b.dtype} differs from sample 0's {a.dtype}")
        length = max(row["input_ids"].shape[0] for row in rows)
        m = int(self.pad_to_multiple_of)
        length = -(-length // m) * m
        batch: dict[str, Any] = {key: torch.stack([_pad_right(row[key], length) for row in rows]) for key in BATCH_KEYS}
        if self.with_position_ids:
            batch["position_ids"] = torch.stack(
                [
                    _pad_right(torch.arange(row["input_ids"].shape[0], device=row["input_ids"].device), length)
                    for row in rows
                ]
            )
        reserved = sorted({k for s in samples for k in s if isinstance(k, str) and k.startswith(RESERVED_PREFIX)})
        for key in reserved:
            absent = [i for i, s in enumerate(samples) if key not in s]
            if absent:
                raise ConfigError(f"reserved key {key!r} is missing from samples {absent}")
            batch[key] = [s[key] for s in samples]
        return batch


def eagle3_collate(
    samples: Sequence[Mapping[str, Any]], max_len: int | None = 2048, with_position_ids: bool = False
) -> dict[str, Any]:
    """Collate EAGLE3 feature samples into SpecForge's offline training batch.

    A function form of :class:`Eagle3Collator`; use the class (or
    ``functools.partial``) to give a ``DataLoader`` a ``max_len``.

    Args:
        samples: feature samples (see the module docstring).
        max_len: truncate each sample to this many tokens before padding
            (SpecForge's ``--max-length`` default, 2048; ``None`` keeps full length).
        with_position_ids: also return ``position_ids`` ([B, N] int64).

    Returns:
        ``input_ids``, ``attention_mask``, ``loss_mask`` [B, N]; ``hidden_state``
        [B, N, 3H]; ``target`` [B, N, H]; optional ``position_ids``; and every
        ``"__*"`` key as a list.

    Example:
        >>> import torch
        >>> s = {"input_ids": torch.arange(3), "loss_mask": torch.ones(3, dtype=torch.long),
        ...      "hidden_state": torch.zeros(3, 2), "aux_hidden_state": torch.zeros(3, 6)}
        >>> eagle3_collate([s])["hidden_state"].shape
        torch.Size([1, 3, 6])
    """
    return Eagle3Collator(max_len=max_len, with_position_ids=with_position_ids)(samples)
