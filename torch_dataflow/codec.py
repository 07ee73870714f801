"""Tensor dict <-> bytes: a safetensors file with a checksum. Never pickle.

Layout (a valid safetensors file, so ``safetensors.torch.load(blob)`` reads it)::

    [8 bytes: little-endian u64 N][N bytes: JSON header, space-padded][data]

The header maps each tensor name to ``{"dtype", "shape", "data_offsets"}``
(offsets relative to the start of the data region) and carries
``"__metadata__": {"td.checksum": "<16 hex>", "td.format": "2", "td.sums": "<16 hex>,..."}``.
Tensors are laid out by decreasing item size, then name, with no holes. ``N`` is a
multiple of 8 chosen so the data region starts 16-byte aligned: every buffer is
then naturally aligned (complex128 included) when the blob itself is, which
zero-copy views need (torch's complex128 kernels fault on misaligned memory).

Integrity (format ``"2"``, what :func:`encode` writes): ``td.sums`` holds one
xxh3-64 per tensor, over that tensor's bytes, in data order (comma separated);
``td.checksum`` is xxh3-64 over the header region (the 8-byte length and the
JSON, with the checksum's own hex replaced by 16 ``'0'``). The header holds the
per-tensor sums, so ``td.checksum`` stands for every byte of the blob while each
byte is hashed once, as in format ``"1"``. A full read checks the header and
every tensor: any flip or truncation raises
:class:`~torch_dataflow.errors.CorruptSample`. A *field subset* read (see
:func:`check_fields`) checks the header and the tensors it read: a flip inside
a selected tensor or anywhere in the header is caught; a flip inside a tensor
that was not selected is not read, so it is not detected by that read (the next
full read catches it).

Format ``"1"`` (blobs written before field selection) is still read:
``td.checksum`` there is xxh3-64 over the zeroed header, then the data region.
It has no per-tensor sums, so a subset of it cannot be verified alone: readers
fall back to reading and verifying the whole blob (:func:`check_fields` says so
by returning ``False``).

Why the sums sit in the header and the offsets are not read first: a committed
ref lists every tensor's spec in layout order and the blob's length, so the
header's size (:func:`header_size`) and every tensor's offset are known before
a byte is read. A subset read asks for the header and the chosen tensors in one
go (one round trip; on ``file://`` one ``preadv`` per contiguous range), then
checks that the header it got describes the ref's tensors at those offsets.

Dtype names follow safetensors where it has one. Three are ours and make a
blob unreadable by the safetensors library: ``C32`` (complex32), ``C128``
(complex128) and ``F4_E2M1_X2`` (float4_e2m1fn_x2: two 4-bit values per byte,
whereas safetensors' ``F4`` counts 4-bit elements). ``F8_E8M0`` is in the
safetensors format but its Python loader (0.8) does not map it yet.

Example:
    >>> import torch
    >>> enc = encode({"x": torch.arange(3), "m": torch.ones(2, dtype=torch.bool)})
    >>> [s.name for s in enc.specs]          # largest item size first
    ['x', 'm']
    >>> decode(enc.to_bytes())["x"].tolist()
    [0, 1, 2]
"""

from __future__ import annotations

import contextlib
import json
import mmap
import struct
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from ._codec_check import LandingHash, _verify, check_fields, check_landed
from ._codec_format import (
    _CHECKSUM_RE,
    _EMPTY_SUM,
    _ZERO_HEX,
    DTYPES,
    FORMAT_VERSION,
    _corrupt,
    _dtype_name,
    _parse,
    header_size,
)
from ._codec_format import (
    FORMATS as FORMATS,  # re-exported: part of this module's surface before the split
)
from ._codec_format import (
    MAX_HEADER_BYTES as MAX_HEADER_BYTES,
)
from .errors import ConfigError
from .refs import FeatureSpec

__all__ = [
    "DTYPES", "Encoded", "LandingHash", "Layout", "check_fields", "check_landed", "decode", "encode",
    "header_size", "layout", "read_header",
]
# The examples of the public objects that moved to _codec_check / _codec_format
# run with this module's doctests (tests/test_api.py).
__test__ = {"LandingHash": LandingHash, "check_fields": check_fields, "check_landed": check_landed,
            "header_size": header_size}


@dataclass(frozen=True, eq=False)
class Encoded:
    """One encoded sample, not yet concatenated.

    ``parts()`` lets a store write the header and each tensor's memory straight
    to a file or socket (``os.writev``-style) without building one big buffer.

    Example:
        >>> import torch
        >>> enc = encode({"x": torch.zeros(4)})
        >>> enc.nbytes == len(enc.to_bytes()) == sum(len(p) for p in enc.parts())
        True
    """

    specs: tuple[FeatureSpec, ...]
    nbytes: int
    checksum: str
    header: bytes
    buffers: tuple[memoryview, ...]  # flat uint8 views of contiguous CPU tensors (keep them alive)

    def parts(self) -> list[bytes | memoryview]:
        """The blob as a list of buffers: header bytes, then each non-empty tensor."""
        return [self.header, *self.buffers]

    def to_bytes(self) -> bytes:
        """The whole blob as one ``bytes`` (one copy of the tensor data)."""
        return b"".join(self.parts())

    def write_into(self, out: memoryview | bytearray) -> int:
        """Copy the blob into ``out`` (at least ``nbytes`` long); return ``nbytes``."""
        view = memoryview(out).cast("B")
        if len(view) < self.nbytes:
            raise ValueError(f"buffer of {len(view)} bytes is smaller than the blob ({self.nbytes} bytes)")
        pos = 0
        for part in self.parts():
            view[pos : pos + len(part)] = part
            pos += len(part)
        return pos


def _prepare(name: object, t: object) -> torch.Tensor:
    """Validate one entry and return a contiguous, plain CPU tensor for it."""
    if not isinstance(name, str):
        raise TypeError(f"tensor names must be str, got {type(name).__name__}: {name!r}")
    if name.startswith("__"):
        raise ConfigError(f"tensor name {name!r} is reserved (names starting with '__' are the library's)")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"value of {name!r} is a {type(t).__name__}, not a torch.Tensor")
    if t.requires_grad:
        raise ConfigError(f"tensor {name!r} requires grad: detach() it before storing")
    if t.is_nested or t.layout != torch.strided:
        raise ConfigError(f"tensor {name!r} has layout {t.layout} (nested={t.is_nested}); only dense tensors")
    if t.is_quantized or t.dtype not in DTYPES:
        raise ConfigError(f"tensor {name!r} has dtype {t.dtype}, which has no plain byte layout to store")
    if t.device.type == "meta":
        raise ConfigError(f"tensor {name!r} is on the meta device: it has no data")
    if t.device.type != "cpu":
        t = t.cpu()
    # Conjugate/negative bits are lazy flags: materialise so the bytes are the values.
    t = t.resolve_conj().resolve_neg()
    # contiguous() copies only the visible elements of a strided view.
    return t.contiguous()


class Layout:
    """A sample laid out for encoding, its sums not computed yet: for a writer that
    hashes each piece of a tensor right before writing it (while it is in the CPU
    cache) instead of in a separate pass. The data region starts at ``header_size``;
    ``header(sums)`` gives the header once every tensor's xxh3-64 hex is known (the
    blob is then byte for byte what :func:`encode` makes).

    Example:
        >>> import torch, xxhash
        >>> t = {"x": torch.arange(3), "e": torch.zeros(0)}
        >>> lay = layout(t)
        >>> sums = [xxhash.xxh3_64_hexdigest(b) if b is not None else None for b in lay.buffers]
        >>> header, checksum = lay.header(sums)
        >>> blob = header + b"".join(b for b in lay.buffers if b is not None)
        >>> blob == encode(t).to_bytes() and checksum == encode(t).checksum
        True
    """

    __slots__ = ("_entries", "buffers", "checksum", "header_size", "nbytes", "specs")

    def __init__(self, specs: tuple[FeatureSpec, ...], entries: dict[str, Any],
                 buffers: tuple[memoryview | None, ...]) -> None:
        self.specs, self._entries, self.buffers = specs, entries, buffers  # buffers: None for an empty tensor
        self.header_size = len(self._header_bytes([_ZERO_HEX] * len(buffers)))  # every sum is 16 hex
        self.nbytes = self.header_size + sum(s.nbytes for s in specs)
        self.checksum: str | None = None  # set by a writer that hashed the data (stores/_file_io.py)

    def _header_bytes(self, sums: list[str]) -> bytearray:
        # __metadata__ first with td.checksum first: its position is then fixed, and
        # _CHECKSUM_RE can never match inside a JSON string (quotes there are escaped).
        meta = {"td.checksum": _ZERO_HEX, "td.format": FORMAT_VERSION, "td.sums": ",".join(sums)}
        text = json.dumps({"__metadata__": meta, **self._entries}, separators=(",", ":"), ensure_ascii=True)
        raw = text.encode("ascii")
        raw += b" " * (-(8 + len(raw)) % 16)  # data starts at a multiple of 16; N stays a multiple of 8
        return bytearray(struct.pack("<Q", len(raw)) + raw)

    def header(self, sums: list[str | None]) -> tuple[bytes, str]:
        """``(header bytes, td.checksum)`` given each tensor's xxh3-64 hex (``None`` for an empty one)."""
        if len(sums) != len(self.buffers):
            raise ValueError(f"{len(sums)} sums for {len(self.buffers)} tensors")
        full = [_EMPTY_SUM if h is None else h for h in sums]
        if any(type(h) is not str or len(h) != 16 for h in full):
            raise ValueError("each sum must be 16 hex digits (xxh3_64 hexdigest)")
        header = self._header_bytes(full)
        assert len(header) == self.header_size
        digest = xxhash.xxh3_64_hexdigest(header)  # the header holds every tensor's sum: it stands for the blob
        m = _CHECKSUM_RE.search(header)
        assert m is not None
        header[m.start(1) : m.end(1)] = digest.encode("ascii")
        return bytes(header), digest


def layout(tensors: Mapping[str, torch.Tensor]) -> Layout:
    """Validate and lay out a tensor dict, as :func:`encode` does, without hashing a byte.

    Raises: as :func:`encode`.
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"expected a Mapping[str, Tensor], got {type(tensors).__name__}")
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise ConfigError("the codec stores little-endian data and this host is big-endian")
    prepared = [(name, _prepare(name, t)) for name, t in tensors.items()]
    prepared.sort(key=lambda nt: (-nt[1].element_size(), nt[0]))

    entries: dict[str, Any] = {}
    specs: list[FeatureSpec] = []
    buffers: list[memoryview | None] = []
    offset = 0
    for name, t in prepared:
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        specs.append(FeatureSpec(name=name, dtype=_dtype_name(t.dtype), shape=tuple(t.shape), nbytes=nbytes))
        if nbytes:
            # numpy's buffer keeps the tensor alive for as long as the memoryview lives.
            # as_strided: a contiguous tensor may still carry an odd stride on a
            # size-1 dim, which view(uint8) refuses; stride 1 is the same memory.
            flat = t.reshape(-1).as_strided((t.numel(),), (1,))
            buffers.append(memoryview(flat.view(torch.uint8).numpy()))
        else:
            buffers.append(None)
        offset += nbytes
    return Layout(tuple(specs), entries, tuple(buffers))


def encode(tensors: Mapping[str, torch.Tensor]) -> Encoded:
    """Encode a tensor dict; tensor data is not copied when already contiguous on CPU.

    Args:
        tensors: ``{name: tensor}``; may be empty. Any device, any strides.

    Raises:
        TypeError: not a mapping, a non-str name, or a non-tensor value.
        ConfigError: a name starting with ``"__"``, a tensor that requires grad,
            a sparse / nested / meta / quantized tensor, an unsupported dtype.
    """
    lay = layout(tensors)
    header, digest = lay.header([None if b is None else xxhash.xxh3_64_hexdigest(b) for b in lay.buffers])
    return Encoded(lay.specs, lay.nbytes, digest, header, tuple(b for b in lay.buffers if b is not None))


def read_header(
    buf: bytes | bytearray | memoryview | mmap.mmap, *, what: str = "blob"
) -> tuple[tuple[FeatureSpec, ...], dict[str, str], int]:
    """Return ``(specs, metadata, data_offset)`` without touching tensor data.

    The header and the layout are validated; the checksum is not (that needs the data).

    Raises:
        CorruptSample: malformed header or a layout that does not fit ``buf``.
    """
    entries, meta, data_offset, _ = _parse(memoryview(buf).cast("B"), what)
    specs = tuple(
        FeatureSpec(name=e.name, dtype=_dtype_name(e.dtype), shape=e.shape, nbytes=e.end - e.start) for e in entries
    )
    return specs, meta, data_offset


def decode(
    buf: bytes | bytearray | memoryview | mmap.mmap,
    *,
    copy: bool = True,
    expected_checksum: str | None = None,
    verify: bool = True,
    what: str = "blob",
) -> dict[str, torch.Tensor]:
    """Decode a blob made by :func:`encode` (or, with ``verify=False``, any safetensors file).

    Args:
        buf: the whole blob.
        copy: ``True`` returns tensors that own their memory (one copy each);
            ``False`` returns views into ``buf`` (zero copy; they keep ``buf``
            alive, and are read-only in spirit when ``buf`` is: do not write).
            A tensor whose bytes are not naturally aligned in memory is copied.
        expected_checksum: the checksum the caller's ref recorded; a blob with
            another one is not the blob that was meant.
        verify: check ``td.checksum`` (on by default; the cost is ~0.1 ms/MB).
        what: names the blob in error messages.

    Raises:
        CorruptSample: anything malformed, truncated, or failing a checksum.
    """
    view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf
    entries, meta, data_offset, raw = _parse(view, what)
    stored = meta.get("td.checksum")
    if expected_checksum is not None and stored != expected_checksum:
        raise _corrupt(what, f"checksum {stored!r} is not the expected {expected_checksum!r} (wrong blob)")
    if verify:
        _verify(raw, meta, entries, view[data_offset:], what)

    out: dict[str, torch.Tensor] = {}
    # frombuffer warns for read-only buffers (bytes, mmap.ACCESS_READ): the
    # docstring states the contract instead. The filter costs ~8 us a call,
    # a visible share of small reads, so only pay it when it can fire.
    quiet = view.readonly or any(e.dtype is torch.complex32 for e in entries)
    with warnings.catch_warnings() if quiet else contextlib.nullcontext():
        if quiet:
            warnings.filterwarnings("ignore", message=".*non-writable.*", category=UserWarning)
            warnings.filterwarnings("ignore", message="ComplexHalf support is experimental", category=UserWarning)
        for e in entries:
            count = e.end - e.start
            if count == 0:
                t = torch.empty(e.shape, dtype=e.dtype)  # frombuffer refuses zero-size buffers
            else:
                t = torch.frombuffer(view, dtype=torch.uint8, count=count, offset=data_offset + e.start)
                # A misaligned view (a blob at an odd address) must be copied: torch
                # kernels assume natural alignment and some fault without it.
                if copy or t.data_ptr() % min(e.dtype.itemsize, 16):
                    t = t.clone()  # the one copy; the view below is free
                t = t.view(e.dtype).view(e.shape)
            out[e.name] = t
    return out
