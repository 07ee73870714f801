"""Tensor dict <-> bytes: a safetensors file with a checksum. Never pickle.

Layout (a valid safetensors file, so ``safetensors.torch.load(blob)`` reads it)::

    [8 bytes: little-endian u64 N][N bytes: JSON header, space-padded][data]

The header maps each tensor name to ``{"dtype", "shape", "data_offsets"}``
(offsets relative to the start of the data region) and carries
``"__metadata__": {"td.checksum": "<16 hex>", "td.format": "1"}``. Tensors are
laid out by decreasing item size, then name, with no holes. ``N`` is a
multiple of 8 chosen so the data region starts 16-byte aligned: every buffer is
then naturally aligned (complex128 included) when the blob itself is, which
zero-copy views need (torch's complex128 kernels fault on misaligned memory).

Integrity: ``td.checksum`` is xxh3-64 over the header region (the 8-byte
length and the JSON, with the checksum's hex replaced by 16 ``'0'``), then over
the data region. Every byte of the blob is covered, so any flip or truncation
raises :class:`~torch_dataflow.errors.CorruptSample`.

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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from .errors import ConfigError, CorruptSample
from .refs import FeatureSpec

__all__ = ["DTYPES", "Encoded", "LandingHash", "check_landed", "decode", "encode", "header_size", "read_header"]

FORMAT_VERSION = "1"
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
        offset += nbytes

    # __metadata__ first with td.checksum first: its position is then fixed, and
    # _CHECKSUM_RE can never match inside a JSON string (quotes there are escaped).
    meta = {"td.checksum": _ZERO_HEX, "td.format": FORMAT_VERSION}
    text = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":"), ensure_ascii=True)
    raw = text.encode("ascii")
    raw += b" " * (-(8 + len(raw)) % 16)  # data starts at a multiple of 16; N stays a multiple of 8
    header = bytearray(struct.pack("<Q", len(raw)) + raw)
    digest = _checksum(header, buffers)
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


class LandingHash:
    """xxh3 of a blob fed piece by piece as it lands, header first: a batch-direct
    read hashes each chunk right after the kernel wrote it (still in cache) instead
    of reading the whole batch back from memory. Pass it to :func:`check_landed`.

    Example:
        >>> import torch
        >>> enc = encode({"x": torch.arange(4)})
        >>> h = LandingHash(len(enc.header))
        >>> for part in enc.parts():
        ...     h.update(part)
        >>> h.hexdigest() == enc.checksum
        True
    """

    def __init__(self, header_size: int) -> None:
        self._need = int(header_size)
        self._head = bytearray()
        self._h: Any = None

    def update(self, piece: bytes | bytearray | memoryview) -> None:
        """Feed the next bytes of the blob."""
        view = memoryview(piece).cast("B")
        if self._h is None:
            take = view[: self._need - len(self._head)]
            self._head += take
            view = view[len(take) :]
            if len(self._head) < self._need:
                return
            self._h = xxhash.xxh3_64(_zeroed(self._head))
        if len(view):
            self._h.update(view)

    def hexdigest(self) -> str:
        """The checksum of everything fed (the header alone, or nothing, if that is all)."""
        return (self._h or xxhash.xxh3_64(_zeroed(self._head))).hexdigest()


def _verify(raw: bytes, meta: dict[str, str], data: memoryview | list[memoryview] | None, what: str,
            actual: str | None = None) -> None:
    """Check the format version and ``td.checksum`` over the header and ``data`` (in blob order),
    or against ``actual``, a digest computed as the bytes landed."""
    stored = meta.get("td.checksum")
    if meta.get("td.format") != FORMAT_VERSION:
        raise _corrupt(what, f"td.format {meta.get('td.format')!r} is not {FORMAT_VERSION!r}")
    found = list(_CHECKSUM_RE.finditer(raw))
    if stored is None or len(found) != 1 or found[0].group(1).decode() != stored:
        raise _corrupt(what, "header has no single td.checksum field")
    if actual is None:
        assert data is not None
        zeroed = raw[: found[0].start(1)] + _ZERO_HEX.encode() + raw[found[0].end(1) :]
        actual = _checksum(zeroed, data)
    if actual != stored:
        raise _corrupt(what, f"checksum mismatch (stored {stored}, computed {actual})")


def header_size(nbytes: int, specs: tuple[FeatureSpec, ...] | list[FeatureSpec]) -> int:
    """Bytes before the data region of a blob of ``nbytes`` holding ``specs`` (from its ref).

    Example:
        >>> import torch
        >>> enc = encode({"x": torch.zeros(4)})
        >>> header_size(enc.nbytes, enc.specs) == len(enc.header)
        True
    """
    return int(nbytes) - sum(s.nbytes for s in specs)


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
    if sum(len(d) for d in data) != size - data_offset:
        raise _corrupt(what, f"{sum(len(d) for d in data)} data bytes landed, the blob holds {size - data_offset}")
    _verify(raw, meta, data, what, None if landed is None else landed.hexdigest())


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
        _verify(raw, meta, view[data_offset:], what)

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
