"""Online producers: a target model's padded capture batch in, one trimmed sample per sequence out.

A target model captures EAGLE3 features a batch at a time: SpecForge's
``OfflineSGLangCapture.capture`` returns an ``OfflineCaptureBatch`` of padded
``[B, S]`` ``input_ids`` / ``attention_mask`` / ``loss_mask`` with the
auxiliary states ``hidden_states`` ``[B, S, 3H]`` and the final states
``last_hidden_states`` ``[B, S, H]``. Training wants one sample per sequence
without its padding. :func:`split_capture` trims each row to its attention
mask (right or left padding), keeps its loss mask exactly, and returns
SpecForge's offline layout (``input_ids`` [s], ``loss_mask`` [s],
``hidden_state`` [1, s, H], ``aux_hidden_state`` [1, s, 3H]), the layout
:class:`~torch_dataflow.eagle3.Eagle3Collator` reads; :func:`put_capture`
puts those samples with a :class:`~torch_dataflow.FeatureWriter`.
:func:`capture_hf` makes such a batch with a Hugging Face causal LM (CPU is
enough for tests).

Example:
    >>> import torch
    >>> from torch_dataflow import FeatureWriter
    >>> from torch_dataflow.specforge.capture import CaptureBatch, put_capture
    >>> mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    >>> batch = CaptureBatch(input_ids=torch.tensor([[5, 6, 7], [8, 9, 0]]), attention_mask=mask,
    ...                      loss_mask=torch.tensor([[0, 1, 1], [0, 1, 0]]),
    ...                      hidden_states=torch.zeros(2, 3, 6), last_hidden_states=torch.zeros(2, 3, 2))
    >>> with FeatureWriter("memory://cap-doc", "memory://cap-doc") as w:
    ...     refs = put_capture(w, batch, ["a", "b"])
    >>> [dict((s.name, s.shape) for s in r.specs)["hidden_state"] for r in refs]
    [(1, 3, 2), (1, 2, 2)]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..producer import FeatureWriter
    from ..refs import SampleRef

__all__ = ["CaptureBatch", "capture_hf", "put_capture", "split_capture"]

_FIELDS = ("input_ids", "attention_mask", "loss_mask", "hidden_states", "last_hidden_states")


@dataclass(frozen=True)
class CaptureBatch:
    """A padded capture batch, field for field SpecForge's ``OfflineCaptureBatch``.

    Attributes:
        input_ids: ``[B, S]`` token ids (padding positions hold anything).
        attention_mask: ``[B, S]`` 1 on each sequence's tokens, 0 on padding.
        loss_mask: ``[B, S]`` 1 where the draft is trained; 0 on padding.
        hidden_states: ``[B, S, 3H]`` the three auxiliary layers, concatenated.
        last_hidden_states: ``[B, S, H]`` the final (normed) hidden states.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    hidden_states: torch.Tensor
    last_hidden_states: torch.Tensor


def _field(batch: Any, name: str) -> torch.Tensor:
    value = batch.get(name) if isinstance(batch, Mapping) else getattr(batch, name, None)
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"capture batch has no tensor {name!r} (got {type(value).__name__}): give an object or "
                          f"mapping with {', '.join(_FIELDS)}, e.g. SpecForge's OfflineCaptureBatch")
    return value


def _spans(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of each row's tokens; the ones of a row must be contiguous."""
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ConfigError("attention_mask must hold only 0 and 1")
    out = []
    for row, m in enumerate(mask.to(torch.bool)):
        idx = m.nonzero().flatten()
        if idx.numel() == 0:
            raise ConfigError(f"row {row} of the capture batch has no tokens (its attention_mask is all 0)")
        start, end = int(idx[0]), int(idx[-1]) + 1
        if end - start != idx.numel():
            raise ConfigError(f"row {row}'s attention_mask has holes: padding must be on the right or the left only")
        out.append((start, end))
    return out


def split_capture(batch: Any, *, dtype: torch.dtype | None = None) -> list[dict[str, torch.Tensor]]:
    """One SpecForge-layout feature dict per row of a padded capture batch, padding trimmed.

    Args:
        batch: a :class:`CaptureBatch`, SpecForge's ``OfflineCaptureBatch`` or a
            mapping with the same five tensors (on any device).
        dtype: cast the hidden states to this dtype (default: keep theirs).

    Returns:
        Per row: ``input_ids`` [s] int64, ``loss_mask`` [s] (its dtype kept),
        ``hidden_state`` [1, s, H] and ``aux_hidden_state`` [1, s, 3H], on CPU.

    Raises:
        ConfigError: mismatched shapes, a mask that is not 0/1, a row with no
            tokens or with holes in its mask, or loss on a padding position.

    Example:
        >>> import torch
        >>> b = {"input_ids": torch.tensor([[0, 4, 5]]), "attention_mask": torch.tensor([[0, 1, 1]]),
        ...      "loss_mask": torch.tensor([[0, 0, 1]]), "hidden_states": torch.zeros(1, 3, 3),
        ...      "last_hidden_states": torch.zeros(1, 3, 1)}
        >>> [(k, tuple(v.shape)) for k, v in split_capture(b)[0].items()]
        [('input_ids', (2,)), ('loss_mask', (2,)), ('hidden_state', (1, 2, 1)), ('aux_hidden_state', (1, 2, 3))]
    """
    ids, mask, loss, aux, last = (_field(batch, f) for f in _FIELDS)
    if ids.dim() != 2 or mask.shape != ids.shape or loss.shape != ids.shape:
        raise ConfigError(f"input_ids, attention_mask and loss_mask must share one [B, S] shape, got "
                          f"{tuple(ids.shape)}, {tuple(mask.shape)}, {tuple(loss.shape)}")
    for name, t in (("hidden_states", aux), ("last_hidden_states", last)):
        if t.dim() != 3 or t.shape[:2] != ids.shape:
            raise ConfigError(f"{name} must be [B, S, hidden] with [B, S] = {list(ids.shape)}, got {list(t.shape)}")
    mask, loss = mask.cpu(), loss.cpu()
    stray = (loss != 0) & (mask == 0)
    if bool(stray.any()):
        row = int(stray.any(dim=1).nonzero()[0])
        raise ConfigError(f"row {row} has loss on padding positions: loss_mask and attention_mask disagree "
                          "(trimming would drop trained tokens)")
    out = []
    for row, (a, b) in enumerate(_spans(mask)):
        h, x = last[row, a:b], aux[row, a:b]
        if dtype is not None:
            h, x = h.to(dtype), x.to(dtype)
        out.append({"input_ids": ids[row, a:b].to("cpu", torch.long).contiguous(),
                    "loss_mask": loss[row, a:b].contiguous(),
                    "hidden_state": h.cpu().contiguous()[None],
                    "aux_hidden_state": x.cpu().contiguous()[None]})
    return out


def put_capture(writer: FeatureWriter, batch: Any, sample_ids: Sequence[str],
                metadata: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None, *,
                dtype: torch.dtype | None = None) -> list[SampleRef]:
    """Trim ``batch`` (see :func:`split_capture`) and put row ``i`` as ``sample_ids[i]``
    with one reserve and one commit; returns the committed refs in row order.

    Args:
        writer: the producer's :class:`~torch_dataflow.FeatureWriter`.
        batch: the padded capture batch.
        sample_ids: one id per row.
        metadata: one mapping for all rows, or one per row (JSON values only).
        dtype: cast the hidden states (e.g. ``torch.bfloat16``, as SpecForge saves).

    Raises:
        ConfigError: ``sample_ids``/``metadata`` do not match the batch, or see :func:`split_capture`.
    """
    samples = split_capture(batch, dtype=dtype)
    ids = list(sample_ids)
    if len(ids) != len(samples):
        raise ConfigError(f"{len(ids)} sample ids for a capture batch of {len(samples)} rows: give one id per row")
    if metadata is None or isinstance(metadata, Mapping):
        metas: list[Any] = [metadata] * len(ids)
    else:
        metas = list(metadata)
        if len(metas) != len(ids):
            raise ConfigError(f"{len(metas)} metadata entries for {len(ids)} rows: give one per row, or one mapping")
    return writer.put_many(list(zip(ids, samples, metas, strict=True)))


@torch.no_grad()
def capture_hf(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               loss_mask: torch.Tensor, *, aux_layers: Sequence[int] | None = None) -> CaptureBatch:
    """Run a Hugging Face causal LM on a padded batch and return its :class:`CaptureBatch`.

    Position ids count each row's tokens from 0, so a left-padded row gets the
    states it would get alone; the auxiliary layers follow SpecForge's default
    rule unless ``aux_layers`` is given (see :class:`~torch_dataflow.eagle3.Eagle3FeatureExtractor`).

    Raises:
        ConfigError: bad ``aux_layers``, or see :func:`split_capture` for the masks.
    """
    from ..eagle3.target import Eagle3FeatureExtractor

    layers = Eagle3FeatureExtractor(model, aux_layers, progress=False)
    _spans(attention_mask.cpu())  # refuse holes before spending a forward pass
    device = next(model.parameters()).device
    mask = attention_mask.to(device, torch.long)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=input_ids.to(device), attention_mask=mask, position_ids=positions,
                output_hidden_states=True, use_cache=False)
    states = out.hidden_states
    if len(states) != layers.num_layers + 1:
        raise ConfigError(f"expected {layers.num_layers + 1} hidden states from the model, got {len(states)}")
    aux = torch.cat([states[k] for k in layers.hidden_state_indices], dim=-1)
    return CaptureBatch(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                        hidden_states=aux, last_hidden_states=states[-1])
