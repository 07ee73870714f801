"""Mooncake reads at raw speed: batch-direct reads through one ``batch_get_into_multi_buffers``
into the batch buffer, registered once; ``get`` into registered, reused buffers. Real master."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch
from _batch_helpers import CASES, _same, _sample, check_corrupt_middle_sample, check_direct_batch, rot
from test_mooncake import _store, master  # noqa: F401 - the session's real mooncake_master

from torch_dataflow.batch_read import BufferPool, read_batch
from torch_dataflow.eagle3 import Eagle3Collator
from torch_dataflow.errors import ConfigError, CorruptSample, SampleUnavailable
from torch_dataflow.stores import open_store

pytestmark = [pytest.mark.mooncake, pytest.mark.timeout(300)]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_batch_is_identical_to_the_per_sample_path(master: Any, case: int) -> None:  # noqa: F811
    store = _store(master)
    direct, samples, collate = check_direct_batch(store, case)
    mem = open_store(f"memory://mc-batch-{case}")
    _same(direct, read_batch(mem, [mem.put(f"s{i}", 1, t) for i, t in enumerate(samples)], collate))
    store.close()


@pytest.mark.parametrize("how", ["flip", "flip_header", "truncate", "other_blob"])
def test_corrupt_bytes_are_caught_on_the_batch_path(master: Any, how: str) -> None:  # noqa: F811
    store = _store(master)
    refs = check_corrupt_middle_sample(store, how)
    assert read_batch(store, [refs[0], refs[2]], Eagle3Collator()) is not None  # its neighbours still read
    store.close()


def test_a_grown_blob_is_corrupt_not_a_crash(master: Any) -> None:  # noqa: F811
    store = _store(master)
    refs = [store.put(f"s{i}", 1, _sample(5, 4, i)) for i in range(2)]
    blob = bytes(store._read("s0", 1)) + b"extra"
    rot(store, "s0", 1, blob)
    seen: list[int] = []
    with pytest.raises(CorruptSample):
        read_batch(store, refs, Eagle3Collator(), on_unreadable=lambda i, e: seen.append(i))
    assert seen == [0]
    store.close()


def test_missing_sample_is_unavailable_in_batch_order(master: Any) -> None:  # noqa: F811
    store = _store(master)
    refs = [store.put(f"s{i}", 1, _sample(4, 4, i)) for i in range(3)]
    store.delete(refs[2])
    store.gc(force=True)
    store.delete(refs[1])
    store.gc(force=True)
    seen: list[int] = []
    with pytest.raises(SampleUnavailable):
        read_batch(store, refs, Eagle3Collator(), on_unreadable=lambda i, e: seen.append(i))
    assert seen == [1]  # the first unreadable row, as a row-by-row read reports it
    store.close()


def test_pooled_batch_buffer_is_registered_once_and_released_with_it(master: Any) -> None:  # noqa: F811
    store = _store(master)
    refs = [store.put(f"s{i}", 1, _sample(512, 64, i)) for i in range(4)]  # ~1.6 MB a batch
    owners = store._client().owners
    pool = BufferPool(max_buffers=1)
    first = read_batch(store, refs, Eagle3Collator(), buffers=pool)
    ptr = first["hidden_state"].data_ptr()
    expect = {k: v.clone() for k, v in first.items() if isinstance(v, torch.Tensor)}
    del first
    assert ptr in owners
    before = len(owners)
    second = read_batch(store, refs, Eagle3Collator(), buffers=pool)
    assert second["hidden_state"].data_ptr() == ptr  # the pool's buffer again ...
    assert len(owners) <= before and ptr in owners  # ... and no new registration for it
    for k, v in expect.items():
        assert torch.equal(second[k], v), k
    pool.clear()
    del second
    gc.collect()
    owners.sweep()  # the buffer died with its last batch: its registration goes too
    assert ptr not in owners
    store.close()


def test_gets_reuse_registered_buffers_only_when_the_caller_let_go(master: Any) -> None:  # noqa: F811
    store = _store(master)
    x = torch.arange(1 << 18, dtype=torch.int32)
    ref = store.put("a", 1, {"x": x, "y": torch.ones(3)})
    a = store.get(ref)
    b = store.get(ref)
    assert a["x"].data_ptr() != b["x"].data_ptr()  # a held result is never read into
    b["x"].zero_()
    assert torch.equal(a["x"], x)
    keep = a["y"]  # one small tensor keeps its whole buffer out of the pool
    ptr = a["x"].data_ptr()
    del a, b
    c = store.get(ref)
    assert c["x"].data_ptr() != ptr and torch.equal(c["x"], x)
    del keep, c
    gc.collect()
    pooled = store._client().recv.pooled_bytes
    d = store.get(ref)
    assert torch.equal(d["x"], x)
    assert store._client().recv.pooled_bytes == pooled  # an idle buffer served it: nothing new registered
    store.close()


def test_read_blob_into_lands_in_unregistered_memory(master: Any) -> None:  # noqa: F811
    store = _store(master)
    ref = store.put("a", 1, {"x": torch.arange(1000)})
    blob = bytes(store._read("a", 1))
    head, rest = bytearray(100), bytearray(ref.nbytes - 100)
    pieces: list[bytes] = []
    assert store.read_blob_into(ref, [memoryview(head), memoryview(rest)], lambda p: pieces.append(bytes(p))) == len(
        blob
    )
    assert bytes(head + rest) == blob and b"".join(pieces) == blob
    with pytest.raises(ConfigError, match="cover the whole blob"):
        store.read_blob_into(ref, [memoryview(head)])
    store.close()


def test_ranged_reads_match_the_whole_blob_and_catch_flips(master: Any) -> None:  # noqa: F811
    from torch_dataflow.stores.base import FeatureStore

    store = _store(master)
    t = {"a": torch.arange(300, dtype=torch.int64), "b": torch.randn(64, 8), "c": torch.arange(7, dtype=torch.int16)}
    ref = store.put("s", 1, t)
    ranges = [
        (0, [memoryview(bytearray(40))]),
        (ref.nbytes - 50, [memoryview(bytearray(30)), memoryview(bytearray(40))]),
    ]
    fed: list[bytes] = []
    size = store._read_ranges("s", 1, ranges, lambda p: fed.append(bytes(p)))
    want = [(0, [memoryview(bytearray(40))]), (ref.nbytes - 50, [memoryview(bytearray(30)), memoryview(bytearray(40))])]
    fed_want: list[bytes] = []
    assert size == FeatureStore._read_ranges(store, "s", 1, want, lambda p: fed_want.append(bytes(p))) == ref.nbytes
    assert [[bytes(v) for v in vs] for _, vs in ranges] == [[bytes(v) for v in vs] for _, vs in want]
    assert fed == fed_want  # the tail past the end is not fed, as the default does
    got = store.get_fields(ref, ["a", "c"])
    assert set(got) == {"a", "c"} and torch.equal(got["a"], t["a"]) and torch.equal(got["c"], t["c"])
    blob = bytearray(store._read("s", 1))
    blob[-3] ^= 0x01  # inside "c" (int16 is laid out last)
    rot(store, "s", 1, bytes(blob))
    with pytest.raises(CorruptSample):
        store.get_fields(ref, ["c"])
    assert torch.equal(store.get_fields(ref, ["a"])["a"], t["a"])  # an unselected flip is not read
    store.delete(ref)
    store.gc(force=True)
    with pytest.raises(SampleUnavailable):
        store.get_fields(ref, ["a"])
    store.close()


def test_full_pool_drops_an_idle_buffer_that_is_not_the_first(master: Any) -> None:  # noqa: F811
    # More buffers than the pool keeps, in different sizes, with the oldest one still held: the pool
    # must drop a later idle buffer (found by a user running the demo on Mooncake: it crashed here).
    store = _store(master)
    recv = store._client().recv
    sizes = [(1 << 14) * (k + 1) for k in range(recv.max_buffers + 4)]
    refs = [store.put(f"s{k}", 1, {"x": torch.full((n,), k, dtype=torch.int32)}) for k, n in enumerate(sizes)]
    held = store.get(refs[0])  # the first pooled buffer stays in use throughout
    for k, ref in enumerate(refs[1:], 1):
        got = store.get(ref)
        assert torch.equal(got["x"], torch.full((sizes[k],), k, dtype=torch.int32))
        del got
        gc.collect()
        assert len(recv._entries) <= recv.max_buffers
    assert torch.equal(held["x"], torch.zeros(sizes[0], dtype=torch.int32))  # never read into while held
    store.close()
