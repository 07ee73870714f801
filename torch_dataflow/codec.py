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
import math
import mmap
import re
import struct
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from .errors import ConfigError, CorruptSample
from .refs import FeatureSpec

__all__ = [
    "DTYPES", "Encoded", "LandingHash", "check_fields", "check_landed", "decode", "encode", "header_size",
    "read_header",
]

FORMAT_VERSION = "2"
FORMATS = ("1", "2")  # every format this codec reads
MAX_HEADER_BYTES = 100 * 2**20  # same bound as safetensors: a header past it is hostile
_ZERO_HEX = "0" * 16

# torch dtype attribute -> header name. An explicit whitelist: quantized and
# sub-byte dtypes have no plain byte layout (and some crash torch when viewed).
_DTYPE_TO_HEADER: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
    # ours (not readable by safetensors):
    "complex32": "C32",
    "complex128": "C128",
    "float4_e2m1fn_x2": "F4_E2M1_X2",
}
#: Every dtype this torch build can encode, as ``{torch.dtype: header name}``.
DTYPES: dict[torch.dtype, str] = {
    getattr(torch, n): h for n, h in _DTYPE_TO_HEADER.items() if isinstance(getattr(torch, n, None), torch.dtype)
}
_HEADER_TO_DTYPE: dict[str, torch.dtype] = {h: d for d, h in DTYPES.items()}
# JSON whitespace is allowed around the colon (other writers may emit it). A
# match cannot start inside a JSON string: quotes there are escaped as \".
_CHECKSUM_RE = re.compile(rb'"td\.checksum"[ \t\r\n]*:[ \t\r\n]*"([0-9a-f]{16})"')
_FORMAT_RE = re.compile(rb'"td\.format"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*)"')
_HEX16 = re.compile(r"[0-9a-f]{16}")
_EMPTY_SUM = xxhash.xxh3_64_hexdigest(b"")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _checksum(header: bytes | memoryview, data: memoryview | list[memoryview]) -> str:
    h = xxhash.xxh3_64(header)
    for part in data if isinstance(data, list) else (data,):
        h.update(part)  # incremental: never concatenate (that would copy the data)
    return h.hexdigest()


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


def encode(tensors: Mapping[str, torch.Tensor]) -> Encoded:
    """Encode a tensor dict; tensor data is not copied when already contiguous on CPU.

    Args:
        tensors: ``{name: tensor}``; may be empty. Any device, any strides.

    Raises:
        TypeError: not a mapping, a non-str name, or a non-tensor value.
        ConfigError: a name starting with ``"__"``, a tensor that requires grad,
            a sparse / nested / meta / quantized tensor, an unsupported dtype.
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"expected a Mapping[str, Tensor], got {type(tensors).__name__}")
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise ConfigError("the codec stores little-endian data and this host is big-endian")
    prepared = [(name, _prepare(name, t)) for name, t in tensors.items()]
    prepared.sort(key=lambda nt: (-nt[1].element_size(), nt[0]))

    entries: dict[str, Any] = {}
    specs: list[FeatureSpec] = []
    buffers: list[memoryview] = []
    sums: list[str] = []
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
            sums.append(xxhash.xxh3_64_hexdigest(buffers[-1]))
        else:
            sums.append(_EMPTY_SUM)
        offset += nbytes

    # __metadata__ first with td.checksum first: its position is then fixed, and
    # _CHECKSUM_RE can never match inside a JSON string (quotes there are escaped).
    meta = {"td.checksum": _ZERO_HEX, "td.format": FORMAT_VERSION, "td.sums": ",".join(sums)}
    text = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":"), ensure_ascii=True)
    raw = text.encode("ascii")
    raw += b" " * (-(8 + len(raw)) % 16)  # data starts at a multiple of 16; N stays a multiple of 8
    header = bytearray(struct.pack("<Q", len(raw)) + raw)
    digest = xxhash.xxh3_64_hexdigest(header)  # the header holds every tensor's sum: it stands for the blob
    m = _CHECKSUM_RE.search(header)
    assert m is not None
    header[m.start(1) : m.end(1)] = digest.encode("ascii")
    return Encoded(tuple(specs), len(header) + offset, digest, bytes(header), tuple(buffers))


# ---------------------------------------------------------------- decoding
def _corrupt(what: str, why: str) -> CorruptSample:
    return CorruptSample(f"{what} is corrupt: {why}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in header")
    return out


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _parse(view: memoryview, what: str, size: int | None = None) -> tuple[list[_Entry], dict[str, str], int, bytes]:
    """Validate the header against the buffer; return entries, metadata, data offset, raw header.

    ``size``: the whole blob's length when ``view`` holds only its leading bytes
    (a batch-direct read lands the data elsewhere; see :func:`check_landed`)."""
    size = len(view) if size is None else size
    if size < 8 or len(view) < 8:
        raise _corrupt(what, f"{min(size, len(view))} bytes is shorter than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", view, 0)
    if n > min(size - 8, MAX_HEADER_BYTES) or n < 2 or 8 + n > len(view):
        raise _corrupt(what, f"header length {n} does not fit a {size}-byte blob (truncated?)")
    raw = bytes(view[: 8 + n])
    try:
        doc = json.loads(raw[8:].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _corrupt(what, f"header is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise _corrupt(what, "header is not a JSON object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _corrupt(what, "__metadata__ is not a str -> str object")
    entries: list[_Entry] = []
    for name, e in doc.items():
        if name.startswith("__"):
            raise _corrupt(what, f"reserved tensor name {name!r}")
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise _corrupt(what, f"entry {name!r} is not {{dtype, shape, data_offsets}}")
        dtype = _HEADER_TO_DTYPE.get(e["dtype"]) if isinstance(e["dtype"], str) else None
        shape, offs = e["shape"], e["data_offsets"]
        if dtype is None:
            raise _corrupt(what, f"entry {name!r} has unknown dtype {e['dtype']!r}")
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape) or len(shape) > 64:
            raise _corrupt(what, f"entry {name!r} has a bad shape {shape!r}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs) or offs[0] > offs[1]:
            raise _corrupt(what, f"entry {name!r} has bad data_offsets {offs!r}")
        if math.prod(shape) * dtype.itemsize != offs[1] - offs[0]:
            raise _corrupt(what, f"entry {name!r}: shape {shape} x {dtype.itemsize} bytes != span {offs}")
        entries.append(_Entry(name, dtype, tuple(shape), offs[0], offs[1]))
    entries.sort(key=lambda e: (e.start, e.end))
    pos = 0
    for e in entries:  # contiguous cover of the data region: no overlap, no hole
        if e.start != pos:
            raise _corrupt(what, f"entry {e.name!r} starts at {e.start}, expected {pos} (overlap or hole)")
        pos = e.end
    if 8 + n + pos != size:
        raise _corrupt(what, f"data region is {size - 8 - n} bytes, header describes {pos} (truncated?)")
    return entries, meta, 8 + n, raw


def _zeroed(raw: bytes | bytearray) -> bytes:
    """The header as the checksum covers it: its ``td.checksum`` hex replaced by zeros."""
    m = _CHECKSUM_RE.search(raw)
    return bytes(raw) if m is None else bytes(raw[: m.start(1)]) + _ZERO_HEX.encode() + bytes(raw[m.end(1) :])


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


def _stored(raw: bytes, meta: dict[str, str], what: str) -> tuple[str, bytes]:
    """Check the format and the ``td.checksum`` field (format 2: the header's hash too);
    return the stored checksum and the header as the checksum covers it."""
    fmt = meta.get("td.format")
    if fmt not in FORMATS:
        raise _corrupt(what, f"td.format {fmt!r} is not one of {list(FORMATS)}")
    stored = meta.get("td.checksum")
    found = list(_CHECKSUM_RE.finditer(raw))
    if stored is None or len(found) != 1 or found[0].group(1).decode() != stored:
        raise _corrupt(what, "header has no single td.checksum field")
    zeroed = raw[: found[0].start(1)] + _ZERO_HEX.encode() + raw[found[0].end(1) :]
    if fmt == "2":
        actual = xxhash.xxh3_64_hexdigest(zeroed)
        if actual != stored:
            raise _corrupt(what, f"header checksum mismatch (stored {stored}, computed {actual})")
    return stored, zeroed


def _sums(meta: dict[str, str], entries: list[_Entry], what: str) -> list[str]:
    """Format 2's per-tensor sums, one per entry in data order."""
    text = meta.get("td.sums")
    sums = text.split(",") if text else []
    if text is None or len(sums) != len(entries) or not all(_HEX16.fullmatch(x) for x in sums):
        raise _corrupt(what, f"td.sums does not hold one 16-hex sum for each of the {len(entries)} tensors")
    return sums


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


def header_size(nbytes: int, specs: tuple[FeatureSpec, ...] | list[FeatureSpec]) -> int:
    """Bytes before the data region of a blob of ``nbytes`` holding ``specs`` (from its ref).

    Example:
        >>> import torch
        >>> enc = encode({"x": torch.zeros(4)})
        >>> header_size(enc.nbytes, enc.specs) == len(enc.header)
        True
    """
    return int(nbytes) - sum(s.nbytes for s in specs)


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
