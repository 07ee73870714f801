"""Codec: round trips (Hypothesis), hostile input (fuzz), safetensors interop."""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import struct
from typing import Any

import pytest
import safetensors.torch
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torch_dataflow import codec
from torch_dataflow.errors import ConfigError, CorruptSample
from torch_dataflow.testing import assert_same_tensors

DTYPES = list(codec.DTYPES)
SAFETENSORS_READABLE = [d for d, h in codec.DTYPES.items() if h not in ("C32", "C128", "F4_E2M1_X2", "F8_E8M0")]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    return torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def _make(dtype: torch.dtype, shape: tuple[int, ...], how: str, seed: int) -> torch.Tensor:
    """A tensor of ``shape`` presented contiguous or as a strided view of a larger one."""
    if how == "transposed" and len(shape) >= 2:
        return _tensor(dtype, (shape[1], shape[0], *shape[2:]), seed).transpose(0, 1)
    if how == "sliced" and len(shape) >= 1:
        return _tensor(dtype, (2 * shape[0], *shape[1:]), seed)[::2]
    if how == "padded" and len(shape) >= 1:
        return _tensor(dtype, (*shape[:-1], shape[-1] + 1), seed)[..., : shape[-1]]
    return _tensor(dtype, shape, seed)


def _blob(header: dict[str, Any], data: bytes, *, checksum: bool = True) -> bytes:
    """Build a blob by hand (an independent implementation of the format spec)."""
    meta = {"td.checksum": "0" * 16, "td.format": "1"}
    raw = json.dumps({"__metadata__": meta, **header}).encode()
    raw += b" " * (-len(raw) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    if checksum:
        h = xxhash.xxh3_64(head)
        h.update(data)
        head = head.replace(b"0" * 16, h.hexdigest().encode(), 1)
    return head + data


# ------------------------------------------------------------- round trips
tensor_entries = st.tuples(
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
    st.sampled_from(["contiguous", "transposed", "sliced", "padded"]),
    st.integers(0, 2**16),
)


@pytest.mark.filterwarnings("ignore:ComplexHalf support:UserWarning")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12).filter(lambda s: not s.startswith("__")), tensor_entries, max_size=5
    )
)
def test_round_trip(entries: dict[str, Any]) -> None:
    tensors = {name: _make(dt, shape, how, seed) for name, (dt, shape, how, seed) in entries.items()}
    expected = {k: v.contiguous() for k, v in tensors.items()}
    enc = codec.encode(tensors)
    blob = enc.to_bytes()
    assert len(blob) == enc.nbytes
    assert [s.name for s in enc.specs] == list(codec.decode(blob))
    assert {s.name: (s.dtype, s.shape) for s in enc.specs} == {
        k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in expected.items()
    }
    for copy in (True, False):
        assert_same_tensors(codec.decode(blob, copy=copy, expected_checksum=enc.checksum), expected)
    out = bytearray(enc.nbytes)
    assert enc.write_into(out) == enc.nbytes and bytes(out) == blob
    # Layout promises: data starts 8-aligned, buffers are naturally aligned, no holes.
    specs, meta, data_offset = codec.read_header(blob)
    assert data_offset % 16 == 0 and meta["td.checksum"] == enc.checksum
    pos = 0
    for s in specs:
        assert pos % getattr(torch, s.dtype).itemsize == 0
        pos += s.nbytes
    assert data_offset + pos == len(blob)


def test_special_cases() -> None:
    assert codec.decode(codec.encode({}).to_bytes()) == {}
    t = {"zero_d": torch.tensor(3.5, dtype=torch.bfloat16), "b": torch.tensor([True, False]), "e": torch.empty(0, 4)}
    assert_same_tensors(codec.decode(codec.encode(t).to_bytes()), t)
    # a slice of a big storage stores only its visible elements
    big = torch.zeros(1_000_000)
    assert codec.encode({"x": big[10:20]}).nbytes < 1000
    # conj / neg views store the values, not the lazy bits
    c = torch.tensor([1 + 2j, 3 - 1j]).conj()
    assert torch.equal(codec.decode(codec.encode({"c": c}).to_bytes())["c"], c.resolve_conj())


def test_no_copy_of_contiguous_tensor_data() -> None:
    t = torch.arange(1000, dtype=torch.float32)
    enc = codec.encode({"t": t})
    (header, view) = enc.parts()
    assert isinstance(view, memoryview) and view.nbytes == 4000
    t[0] = 42.0  # the part is the tensor's own memory
    assert bytes(view[:4]) == struct.pack("<f", 42.0)


def test_misaligned_buffer_is_copied_not_faulted() -> None:
    t = {"c": _tensor(torch.complex128, (3,), 1), "f": _tensor(torch.float32, (5,), 2)}
    blob = codec.encode(t).to_bytes()
    backing = bytearray(len(blob) + 1)
    backing[1:] = blob
    out = codec.decode(memoryview(backing)[1:], copy=False)  # every buffer at an odd address
    assert_same_tensors({k: v.clone() for k, v in out.items()}, t)


def test_zero_copy_views_share_the_buffer() -> None:
    buf = bytearray(codec.encode({"x": torch.arange(4)}).to_bytes())
    x = codec.decode(buf, copy=False)["x"]
    x[0] = 9
    assert codec.decode(buf, verify=False)["x"][0] == 9
    y = codec.decode(bytes(buf), verify=False)["x"]  # copy=True: independent
    y[1] = 7
    assert codec.decode(buf, verify=False)["x"][1] == 1


def test_decode_accepts_mmap_and_memoryview(tmp_path: Any) -> None:
    t = {"h": torch.randn(3, 5).bfloat16()}
    p = tmp_path / "b.tdf"
    p.write_bytes(codec.encode(t).to_bytes())
    with open(p, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    assert_same_tensors(codec.decode(m, copy=False), t)
    assert_same_tensors(codec.decode(memoryview(p.read_bytes())), t)


# -------------------------------------------------------------- validation
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_encode_rejects_bad_input() -> None:
    with pytest.raises(TypeError):
        codec.encode([("x", torch.ones(1))])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        codec.encode({1: torch.ones(1)})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        codec.encode({"x": [1.0]})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="detach"):
        codec.encode({"x": torch.ones(1, requires_grad=True)})
    with pytest.raises(ConfigError):
        codec.encode({"__lease__": torch.ones(1)})
    with pytest.raises(ConfigError):
        codec.encode({"x": torch.empty(2, device="meta")})
    with pytest.raises(ConfigError):
        codec.encode({"x": torch.eye(2).to_sparse()})
    with pytest.raises(ConfigError):
        codec.encode({"x": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])})
    with pytest.raises(ConfigError):
        codec.encode({"x": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)})


def _valid_parts() -> tuple[dict[str, Any], bytes]:
    data = struct.pack("<4q", 1, 2, 3, 4) + struct.pack("<2f", 1.0, 2.0)
    header = {
        "a": {"dtype": "I64", "shape": [4], "data_offsets": [0, 32]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [32, 40]},
    }
    return header, data


def test_hand_built_blob_is_accepted() -> None:
    header, data = _valid_parts()
    out = codec.decode(_blob(header, data))
    assert out["a"].tolist() == [1, 2, 3, 4] and out["b"].tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h["a"].update(dtype="X99"),
        lambda h: h["a"].update(shape=[5]),
        lambda h: h["a"].update(shape=[-4]),
        lambda h: h["a"].update(shape=["4"]),
        lambda h: h["a"].update(data_offsets=[0, 48]),
        lambda h: h["b"].update(data_offsets=[24, 32], shape=[2]),  # overlap
        lambda h: h["b"].update(data_offsets=[36, 44]),  # hole
        lambda h: h["b"].update(data_offsets=[40, 32]),
        lambda h: h.update(c={"dtype": "U8", "shape": [0], "data_offsets": [40, 40], "extra": 1}),
        lambda h: h.update(__lease__={"dtype": "U8", "shape": [0], "data_offsets": [40, 40]}),
        lambda h: h.update(c=[1, 2]),
    ],
)
def test_bad_headers_raise_corrupt(mutate: Any) -> None:
    header, data = _valid_parts()
    mutate(header)
    with pytest.raises(CorruptSample, match="the-blob"):
        codec.decode(_blob(header, data), what="the-blob")


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x01",
        struct.pack("<Q", 2**63) + b"{}",
        struct.pack("<Q", 4) + b"nope",
        struct.pack("<Q", 8) + b"[1,2,3] ",
        struct.pack("<Q", 8) + b"\xff\xfe{}    ",
        struct.pack("<Q", 40) + b'{"a":1,"a":2}'.ljust(40),
        struct.pack("<Q", 4000) + b"[" * 2000 + b"]" * 2000,
    ],
)
def test_malformed_blobs_raise_corrupt(blob: bytes) -> None:
    with pytest.raises(CorruptSample):
        codec.decode(blob)


def test_checksum_checks() -> None:
    header, data = _valid_parts()
    with pytest.raises(CorruptSample, match="checksum"):
        codec.decode(_blob(header, data, checksum=False))
    good = _blob(header, data)
    assert codec.decode(_blob(header, data, checksum=False), verify=False)["a"].tolist() == [1, 2, 3, 4]
    with pytest.raises(CorruptSample, match="expected"):
        codec.decode(good, expected_checksum="0123456789abcdef")
    # a plain safetensors file has no checksum: readable only with verify=False
    plain = safetensors.torch.save({"x": torch.arange(3)})
    with pytest.raises(CorruptSample):
        codec.decode(plain)
    assert codec.decode(plain, verify=False)["x"].tolist() == [0, 1, 2]


# ------------------------------------------------------------------- fuzz
_FUZZ_BLOB = codec.encode(
    {"ids": torch.arange(16), "h": torch.randn(2, 8).bfloat16(), "m": torch.ones(16).bool(), "s": torch.tensor(1.0)}
).to_bytes()


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_FUZZ_BLOB) - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_fuzz_byte_flips_always_corrupt(flips: list[tuple[int, int]]) -> None:
    bad = bytearray(_FUZZ_BLOB)
    for pos, mask in flips:
        bad[pos] ^= mask
    if bytes(bad) == _FUZZ_BLOB:
        return  # flips cancelled out
    for copy in (True, False):
        with pytest.raises(CorruptSample):
            codec.decode(bytes(bad), copy=copy)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(_FUZZ_BLOB) - 1), st.binary(max_size=16))
def test_fuzz_truncation_and_extension_always_corrupt(n: int, tail: bytes) -> None:
    with pytest.raises(CorruptSample):
        codec.decode(_FUZZ_BLOB[:n])
    if tail:
        with pytest.raises(CorruptSample):
            codec.decode(_FUZZ_BLOB + tail)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_never_crash(data: bytes) -> None:
    for verify in (True, False):
        with contextlib.suppress(CorruptSample):
            codec.decode(data, verify=verify)
    with contextlib.suppress(CorruptSample):
        codec.read_header(data)


# ------------------------------------------------------------ interop
def test_safetensors_reads_our_blobs() -> None:
    tensors = {str(d): _tensor(d, (3, 2), i) for i, d in enumerate(SAFETENSORS_READABLE)}
    tensors["zero_d"] = torch.tensor(7)
    tensors["empty"] = torch.empty(0, 2, dtype=torch.bfloat16)
    blob = codec.encode(tensors).to_bytes()
    assert_same_tensors(safetensors.torch.load(blob), tensors)
    meta = json.loads(blob[8 : 8 + struct.unpack("<Q", blob[:8])[0]])["__metadata__"]
    assert meta["td.format"] == "2" and len(meta["td.checksum"]) == 16
    assert len(meta["td.sums"].split(",")) == len(tensors)  # one per tensor (field selection verifies a subset)


def test_our_own_dtype_names_are_documented_as_unreadable_by_safetensors() -> None:
    blob = codec.encode({"c": torch.zeros(2, dtype=torch.complex128)}).to_bytes()
    assert b'"C128"' in blob
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own error type
        safetensors.torch.load(blob)
