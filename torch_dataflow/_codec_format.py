"""The blob format of :mod:`torch_dataflow.codec`: dtype names, the header
parser, and the checks of the header's own fields (format, ``td.checksum``,
``td.sums``). The format itself is described in :mod:`torch_dataflow.codec`."""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from .errors import CorruptSample
from .refs import FeatureSpec

__all__ = ["DTYPES", "FORMATS", "FORMAT_VERSION", "MAX_HEADER_BYTES", "header_size"]

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


def header_size(nbytes: int, specs: tuple[FeatureSpec, ...] | list[FeatureSpec]) -> int:
    """Bytes before the data region of a blob of ``nbytes`` holding ``specs`` (from its ref).

    Example:
        >>> import torch
        >>> enc = encode({"x": torch.zeros(4)})
        >>> header_size(enc.nbytes, enc.specs) == len(enc.header)
        True
    """
    return int(nbytes) - sum(s.nbytes for s in specs)
