"""Verifying bytes that landed where a reader put them (batch-direct and field
subset reads) for :mod:`torch_dataflow.codec`: a hash fed as bytes land, and
the checks of a blob read in pieces."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import xxhash

from ._codec_format import (
    _EMPTY_SUM,
    _FORMAT_RE,
    _checksum,
    _corrupt,
    _dtype_name,
    _Entry,
    _parse,
    _stored,
    _sums,
    _zeroed,
)
from .errors import ConfigError
from .refs import FeatureSpec

__all__ = ["LandingHash", "check_fields", "check_landed"]


class _Segments:
    """xxh3 of each segment of a byte stream fed piece by piece (segment sizes known up front)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self._sizes = list(sizes)
        self._i = -1
        self._h: Any = None
        self._left = 0
        self.done: list[str] = []
        self._next()

    def _next(self) -> None:
        self._i += 1
        while self._i < len(self._sizes) and self._sizes[self._i] == 0:
            self.done.append(_EMPTY_SUM)
            self._i += 1
        self._h = xxhash.xxh3_64() if self._i < len(self._sizes) else None
        self._left = self._sizes[self._i] if self._h is not None else 0

    def update(self, view: memoryview) -> None:
        while len(view) and self._h is not None:
            take = view[: self._left]
            self._h.update(take)
            self._left -= len(take)
            view = view[len(take) :]
            if not self._left:
                self.done.append(self._h.hexdigest())
                self._next()
        if len(view):  # more bytes than segments: a digest that matches nothing
            self.done.append("overflow")

    def digests(self) -> list[str]:
        """Every finished segment's digest, then the partly fed one's (it matches no stored sum)."""
        return self.done + ([f"partial:{self._h.hexdigest()}"] if self._h is not None else [])


def _data_sizes(head: bytes) -> list[int]:
    """Tensor sizes in data order from a header's JSON alone (best effort: the
    header is validated where it is checked; a bad one gives digests that match nothing)."""
    try:
        doc = json.loads(head[8:].decode("utf-8"))
        spans = sorted(tuple(e["data_offsets"]) for k, e in doc.items() if k != "__metadata__")
        return [int(b) - int(a) for a, b in spans]
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return []


class LandingHash:
    """xxh3 of a blob fed piece by piece as it lands, header first: a batch-direct
    read hashes each chunk right after the kernel wrote it (still in cache) instead
    of reading the whole batch back from memory. Pass it to :func:`check_landed`
    (or :func:`check_fields`).

    ``sizes``: the byte counts of the tensors that will be fed after the header, in
    blob order (a field subset read feeds only the chosen tensors); ``None``: every
    tensor, sizes taken from the header. Format-1 blobs hash one stream (``sizes``
    is then unused); format-2 blobs hash the header and each tensor separately.

    Example:
        >>> import torch
        >>> enc = encode({"x": torch.arange(4)})
        >>> h = LandingHash(len(enc.header))
        >>> for part in enc.parts():
        ...     h.update(part)
        >>> h.hexdigest() == enc.checksum
        True
    """

    def __init__(self, header_size: int, sizes: Sequence[int] | None = None) -> None:
        self._need = int(header_size)
        self._head = bytearray()
        self._sizes = None if sizes is None else [int(n) for n in sizes]
        self._h: Any = None  # format 1: one stream
        self._seg: _Segments | None = None  # format 2: one digest per tensor
        self._header_sum = ""
        #: the header's ``td.format`` once the header has landed (``None`` before, or if absent)
        self.format: str | None = None

    def update(self, piece: bytes | bytearray | memoryview) -> None:
        """Feed the next bytes of the blob."""
        view = memoryview(piece).cast("B")
        if self._h is None and self._seg is None:
            take = view[: self._need - len(self._head)]
            self._head += take
            view = view[len(take) :]
            if len(self._head) < self._need:
                return
            self._start()
        if len(view):
            (self._seg or self._h).update(view)

    def _start(self) -> None:
        head = bytes(self._head)
        m = _FORMAT_RE.search(head)
        self.format = m.group(1).decode("ascii", "replace") if m else None
        zeroed = _zeroed(head)
        if self.format == "2":
            self._header_sum = xxhash.xxh3_64_hexdigest(zeroed)
            self._seg = _Segments(self._sizes if self._sizes is not None else _data_sizes(head))
        else:
            self._h = xxhash.xxh3_64(zeroed)

    def hexdigest(self) -> str:
        """The blob checksum of everything fed: format 2, the header's; format 1, the
        stream's (the header alone, or nothing, if that is all that was fed)."""
        if self._seg is not None:
            return self._header_sum
        return (self._h or xxhash.xxh3_64(_zeroed(self._head))).hexdigest()

    def digests(self) -> list[str]:
        """Format 2: the digest of each tensor fed, in order (``[]`` for format 1)."""
        return self._seg.digests() if self._seg is not None else []


def _pieces_digests(data: memoryview | Sequence[memoryview], sizes: Sequence[int]) -> list[str]:
    seg = _Segments(sizes)
    for part in (data,) if isinstance(data, memoryview) else data:
        seg.update(memoryview(part).cast("B"))
    return seg.digests()


def _check_sums(names: Sequence[str], got: Sequence[str], want: Sequence[str], what: str) -> None:
    for name, g, w in zip(names, got, want, strict=False):
        if g != w:
            raise _corrupt(what, f"tensor {name!r} fails its checksum (stored {w}, computed {g})")
    if len(got) != len(want):
        raise _corrupt(what, f"{len(got)} tensor digests for {len(want)} tensors (truncated?)")


def _verify(raw: bytes, meta: dict[str, str], entries: list[_Entry], data: memoryview | list[memoryview] | None,
            what: str, landed: LandingHash | None = None) -> None:
    """Check every byte: the header (format, ``td.checksum``) and the data region
    (``data``, in blob order), or what ``landed`` computed as the bytes landed."""
    stored, zeroed = _stored(raw, meta, what)
    if meta["td.format"] == "1":
        actual = landed.hexdigest() if landed is not None else _checksum(zeroed, data)  # type: ignore[arg-type]
        if landed is not None and landed.format not in (None, "1"):
            raise _corrupt(what, f"the landed header says td.format {landed.format!r}, the parsed one '1'")
        if actual != stored:
            raise _corrupt(what, f"checksum mismatch (stored {stored}, computed {actual})")
        return
    sums = _sums(meta, entries, what)
    if landed is not None:
        if landed.format != "2" or landed.hexdigest() != stored:
            raise _corrupt(what, "the header that landed is not the header that was parsed")
        got = landed.digests()
    else:
        assert data is not None
        got = _pieces_digests(data, [e.end - e.start for e in entries])
    _check_sums([e.name for e in entries], got, sums, what)


def _check_ref(view: memoryview, size: int, specs: Sequence[FeatureSpec], expected_checksum: str,
               what: str) -> tuple[list[_Entry], dict[str, str], bytes]:
    """Parse a header read alone and check it is the header of the ref's blob."""
    entries, meta, data_offset, raw = _parse(view, what, size)
    if data_offset != len(view):
        raise _corrupt(what, f"header is {data_offset} bytes, its ref says {len(view)} (not the ref's blob)")
    stored = meta.get("td.checksum")
    if stored != expected_checksum:
        raise _corrupt(what, f"checksum {stored!r} is not the expected {expected_checksum!r} (wrong blob)")
    got = {e.name: (_dtype_name(e.dtype), e.shape, e.start, e.end) for e in entries}
    want, pos = {}, 0
    for s in specs:
        want[s.name] = (s.dtype, tuple(s.shape), pos, pos + s.nbytes)
        pos += s.nbytes
    if got != want:
        raise _corrupt(what, "header does not describe the tensors its committed ref lists (not the ref's blob)")
    return entries, meta, raw


def check_landed(
    header: bytes | bytearray | memoryview,
    data: list[memoryview],
    *,
    size: int,
    specs: tuple[FeatureSpec, ...] | list[FeatureSpec],
    expected_checksum: str,
    what: str = "blob",
    landed: LandingHash | None = None,
) -> None:
    """Verify a blob whose data region was read straight into caller buffers.

    A batch-direct read (:mod:`torch_dataflow.batch_read`) lands each tensor's
    bytes in its batch row instead of one blob: this checks what ``decode``
    checks, over the bytes where they landed. ``header`` is the blob's first
    :func:`header_size` bytes, ``data`` the data region's bytes in blob order
    (rows and any scratch for truncated tails), ``size`` the stored blob's
    length, ``specs`` and ``expected_checksum`` the committed ref's; ``landed``:
    the :class:`LandingHash` fed while the bytes landed (else ``data`` is hashed).

    Raises:
        CorruptSample: a header that does not describe ``specs`` at these
            offsets, a length or checksum mismatch, or another blob's checksum.

    Example:
        >>> import torch
        >>> enc = encode({"x": torch.arange(4)})
        >>> out = torch.empty(4, dtype=torch.int64)
        >>> dest = memoryview(out.numpy()).cast("B")
        >>> dest[:] = enc.buffers[0]
        >>> check_landed(enc.header, [dest], size=enc.nbytes, specs=enc.specs, expected_checksum=enc.checksum)
    """
    view = memoryview(header).cast("B")
    entries, meta, raw = _check_ref(view, size, specs, expected_checksum, what)
    if sum(len(d) for d in data) != size - len(view):
        raise _corrupt(what, f"{sum(len(d) for d in data)} data bytes landed, the blob holds {size - len(view)}")
    _verify(raw, meta, entries, data, what, landed)


def check_fields(
    header: bytes | bytearray | memoryview,
    data: Mapping[str, Sequence[memoryview]],
    *,
    size: int,
    specs: tuple[FeatureSpec, ...] | list[FeatureSpec],
    expected_checksum: str,
    what: str = "blob",
    landed: LandingHash | None = None,
) -> bool:
    """Verify the header and the chosen tensors of a blob read in part (field selection).

    ``header`` is the blob's first :func:`header_size` bytes; ``data`` maps each
    chosen tensor's name to the buffers its bytes landed in (in order); ``size``
    is the stored blob's length; ``specs`` and ``expected_checksum`` come from the
    committed ref; ``landed``: a :class:`LandingHash` fed the header, then the
    chosen tensors in blob order (else ``data`` is hashed here).

    Returns:
        ``True``: the header and every chosen tensor are verified. ``False``: the
        blob is format 1, whose checksum covers only the whole blob: the caller
        must read and verify the whole blob instead. Bytes of tensors that were
        not chosen are neither read nor checked.

    Raises:
        CorruptSample: a header that is not the ref's blob's, a bad header
            checksum, a short blob, or a chosen tensor failing its checksum.
        ConfigError: ``data`` names a tensor the ref does not list.

    Example:
        >>> import torch
        >>> enc = encode({"x": torch.arange(4), "y": torch.ones(2)})
        >>> y = enc.buffers[1]                       # as a ranged read would land it
        >>> check_fields(enc.header, {"y": [y]}, size=enc.nbytes, specs=enc.specs, expected_checksum=enc.checksum)
        True
    """
    view = memoryview(header).cast("B")
    entries, meta, raw = _check_ref(view, size, specs, expected_checksum, what)
    unknown = sorted(set(data) - {e.name for e in entries})
    if unknown:
        raise ConfigError(f"{what}: no tensor named {unknown}; it holds {[e.name for e in entries]}")
    _stored(raw, meta, what)
    if meta["td.format"] == "1":
        return False
    sums = _sums(meta, entries, what)
    chosen = [(i, e) for i, e in enumerate(entries) if e.name in data]
    for _, e in chosen:
        got = sum(len(v) for v in data[e.name])
        if got != e.end - e.start:
            raise _corrupt(what, f"{got} bytes of tensor {e.name!r} landed, it holds {e.end - e.start} (truncated?)")
    if landed is not None:
        if landed.format != "2" or landed.hexdigest() != meta["td.checksum"]:
            raise _corrupt(what, "the header that landed is not the header that was parsed")
        digests = landed.digests()
    else:
        digests = [_pieces_digests(list(data[e.name]), [e.end - e.start])[0] for _, e in chosen]
    _check_sums([e.name for _, e in chosen], digests, [sums[i] for i, _ in chosen], what)
    return True
