"""Field selection: read only some tensors of a sample, and verify what was read.

``FeatureStoreDataset(..., fields=[...])`` and ``FeaturePool(..., fields=[...])``
read each sample's header and the chosen tensors' byte ranges, nothing else. A
committed ref lists every tensor's spec in layout order and the blob's length,
so every offset is known before a byte is read (:func:`plan_ranges`): one
ranged read per sample (:meth:`FeatureStore.read_ranges_into
<torch_dataflow.stores.base.FeatureStore.read_ranges_into>`; ``file://`` issues
``preadv`` per contiguous range, in cache-sized pieces hashed as they land). The header and each chosen tensor are
verified against their own checksums (format 2, see :mod:`torch_dataflow.codec`);
a format-1 blob (written before per-tensor checksums existed) is read and
verified whole, then the chosen tensors are returned.

Names are checked against the committed ref's specs before any byte is read: a
name the sample does not hold is a :class:`~torch_dataflow.errors.ConfigError`
listing the names it does hold.

Example:
    >>> import torch
    >>> from torch_dataflow.stores import open_store
    >>> store = open_store("memory://fields-doc")
    >>> ref = store.put("s1", 1, {"input_ids": torch.arange(3), "hidden_state": torch.ones(1, 3, 4)})
    >>> sorted(store.get_fields(ref, ["input_ids"]))
    ['input_ids']
    >>> store.get_fields(ref, ["logits"])
    Traceback (most recent call last):
    ...
    torch_dataflow.errors.ConfigError: fields ['logits'] are not in sample 's1': it holds ['input_ids', \
'hidden_state']; pass fields= a subset of those (or fields=None for all)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from . import codec
from .errors import ConfigError, CorruptSample
from .refs import FeatureSpec, SampleRef

__all__ = ["check_fields_arg", "check_header_size", "plan_ranges", "read_fields", "read_size", "selected_specs"]

_ALIGN = 64  # each tensor of a subset read starts on a cache line of its buffer
Range = tuple[int, list[memoryview]]


def check_fields_arg(fields: Iterable[str] | None) -> tuple[str, ...] | None:
    """Validate a ``fields=`` argument: ``None`` (every tensor) or names (deduplicated, in the order given).

    Raises:
        ConfigError: a bare string, an empty list, or a name that is not a non-empty str.

    Example:
        >>> check_fields_arg(["input_ids", "loss_mask", "input_ids"])
        ('input_ids', 'loss_mask')
    """
    if fields is None:
        return None
    if isinstance(fields, (str, bytes)):
        raise ConfigError(f"fields must be a list of tensor names, got the string {fields!r}: write fields=[{fields!r}]")
    try:
        names = list(fields)
    except TypeError:
        raise ConfigError(f"fields must be None or a list of tensor names, got {type(fields).__name__}") from None
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise ConfigError(f"fields must hold non-empty str tensor names, got {bad!r}")
    if not names:
        raise ConfigError("fields=[] selects nothing: pass the tensor names to read, or fields=None for all")
    return tuple(dict.fromkeys(names))


def selected_specs(ref: SampleRef, fields: Sequence[str] | None) -> tuple[FeatureSpec, ...]:
    """The specs of ``ref`` that ``fields`` selects, in blob order (all of them for ``None``).

    Raises:
        ConfigError: a name ``ref`` does not hold (the message lists the ones it holds).
    """
    if fields is None:
        return tuple(ref.specs)
    have = {s.name for s in ref.specs}
    unknown = [f for f in fields if f not in have]
    if unknown:
        raise ConfigError(f"fields {unknown} are not in sample {ref.sample_id!r}: it holds "
                          f"{[s.name for s in ref.specs]}; pass fields= a subset of those (or fields=None for all)")
    chosen = set(fields)
    return tuple(s for s in ref.specs if s.name in chosen)


def read_size(ref: SampleRef, fields: Sequence[str] | None) -> int:
    """Bytes a read of ``fields`` of ``ref`` asks for: the header plus the chosen tensors."""
    if fields is None:
        return ref.nbytes
    return codec.header_size(ref.nbytes, ref.specs) + sum(s.nbytes for s in selected_specs(ref, fields))


def plan_ranges(ref: SampleRef, pieces: Sequence[tuple[str, Sequence[memoryview]]],
                header: memoryview) -> list[Range]:
    """The ranged read of ``ref``'s header and the tensors named in ``pieces``.

    ``pieces``: ``(tensor name, buffers its bytes land in, in order)`` in blob
    order. Returns ``[(blob offset, buffers)]`` with ranges that touch merged
    (one ``preadv`` each on ``file://``).

    Example:
        >>> import torch
        >>> from torch_dataflow.refs import FeatureSpec, SampleRef
        >>> specs = (FeatureSpec("a", "int64", (2,), 16), FeatureSpec("b", "int64", (2,), 16),
        ...          FeatureSpec("c", "int64", (2,), 16))
        >>> ref = SampleRef(sample_id="s", generation=1, store="memory://", specs=specs, nbytes=80, checksum="0")
        >>> a, c = memoryview(bytearray(16)), memoryview(bytearray(16))
        >>> [(off, [len(v) for v in vs]) for off, vs in plan_ranges(ref, [("a", [a]), ("c", [c])],
        ...                                                          memoryview(bytearray(32)))]
        [(0, [32, 16]), (64, [16])]
    """
    hsize = codec.header_size(ref.nbytes, ref.specs)
    offsets, pos = {}, hsize
    for s in ref.specs:
        offsets[s.name] = pos
        pos += s.nbytes
    ranges: list[Range] = [(0, [header])]
    end = hsize
    for name, views in pieces:
        start = offsets[name]
        if start == end:
            ranges[-1][1].extend(views)
        else:
            ranges.append((start, list(views)))
        end = start + sum(len(v) for v in views)
    return ranges


def check_header_size(ref: SampleRef, what: str) -> int:
    """``ref``'s header size, refused as corrupt when its sizes cannot be a blob's."""
    hsize = codec.header_size(ref.nbytes, ref.specs)
    if not 8 <= hsize <= codec.MAX_HEADER_BYTES + 8:
        raise CorruptSample(f"{what} is corrupt: its ref's sizes leave a {hsize}-byte header")
    return hsize


def read_fields(store: Any, ref: SampleRef, fields: Sequence[str] | None, *,
                zero_copy: bool = False) -> dict[str, torch.Tensor]:
    """Read and verify the tensors ``fields`` names of ``ref`` from ``store`` (what
    :meth:`FeatureStore.get_fields <torch_dataflow.stores.base.FeatureStore.get_fields>` does).

    Returned tensors are views of one fresh buffer owned by the caller (independent
    of the store), in blob order. ``fields=None`` or every name: a plain ``get``.

    Raises:
        ConfigError: a name ``ref`` does not hold.
        CorruptSample: the header, or a chosen tensor, fails its check.
        SampleUnavailable: the bytes are gone.
    """
    chosen = selected_specs(ref, fields)
    if len(chosen) == len(ref.specs):
        return store.get(ref, zero_copy=zero_copy)
    if not getattr(store, "codec_blobs", True):  # files of another format: load, then keep the chosen
        full = store.get(ref, zero_copy=zero_copy)
        return {s.name: full[s.name] for s in chosen}
    what = store._what(ref)
    hsize = check_header_size(ref, what)
    starts, total = [], 0
    for s in chosen:
        total = -(-total // _ALIGN) * _ALIGN
        starts.append(total)
        total += s.nbytes
    buf = torch.empty(max(total, 1), dtype=torch.uint8)
    mem = memoryview(buf.numpy()).cast("B")
    views = [mem[o : o + s.nbytes] for o, s in zip(starts, chosen, strict=True)]
    header = bytearray(hsize)
    ranges = plan_ranges(ref, [(s.name, [v]) for s, v in zip(chosen, views, strict=True)], memoryview(header))
    landed = codec.LandingHash(hsize, [s.nbytes for s in chosen])
    size = store.read_ranges_into(ref, ranges, landed.update)
    data = {s.name: [v] for s, v in zip(chosen, views, strict=True)}
    if not codec.check_fields(header, data, size=size, specs=ref.specs, expected_checksum=ref.checksum, what=what,
                              landed=landed):
        full = store.get(ref, zero_copy=zero_copy)  # format 1: only the whole blob can be verified
        return {s.name: full[s.name] for s in chosen}
    out: dict[str, torch.Tensor] = {}
    for o, s in zip(starts, chosen, strict=True):
        dtype = getattr(torch, s.dtype)  # the header matched the ref: a codec dtype
        if s.nbytes == 0:
            out[s.name] = torch.empty(s.shape, dtype=dtype)
        else:
            out[s.name] = buf[o : o + s.nbytes].view(dtype).view(s.shape)
    return out
