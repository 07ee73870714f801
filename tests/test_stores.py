"""The store conformance suite against the in-process and shared-directory backends,
plus the backend-specific behaviour each one documents."""

from __future__ import annotations

import os
import stat
import time
import uuid
from typing import Any

import pytest
import torch

from torch_dataflow.errors import ConfigError, SampleUnavailable
from torch_dataflow.stores import open_store
from torch_dataflow.stores.memory import MemoryStore
from torch_dataflow.stores.shared_dir import MARKER, SharedDirStore
from torch_dataflow.testing import StoreConformance, assert_same_tensors, sample_tensors


class TestMemoryStore(StoreConformance):
    shares_across_processes = False  # process-local by design
    zero_copy_survives_delete = True

    def make_store(self, **kw: Any) -> MemoryStore:
        return MemoryStore(f"test-{uuid.uuid4().hex}", **kw)

    def attach_store(self, store: Any, **kw: Any) -> MemoryStore:
        return MemoryStore(store.name, **kw)

    def discard_store(self, store: Any) -> None:
        MemoryStore.destroy(store.name)


class TestSharedDirStore(StoreConformance):
    zero_copy_survives_delete = True

    def make_store(self, **kw: Any) -> SharedDirStore:
        return SharedDirStore(self.tmp_path / f"store-{uuid.uuid4().hex[:8]}", **kw)

    def attach_store(self, store: Any, **kw: Any) -> SharedDirStore:
        return SharedDirStore(store.root, **kw)


# ------------------------------------------------------------- memory only
def test_memory_uri_and_sharing() -> None:
    a = open_store("memory://Shared-Name?max_bytes=1MiB")
    assert isinstance(a, MemoryStore) and a.max_bytes == 2**20 and a.name == "Shared-Name"
    ref = a.put("s", 1, {"x": torch.ones(3)})
    assert open_store("memory://Shared-Name").get(ref)["x"].sum() == 3
    assert not open_store("memory://shared-name").exists(ref)  # names are case-sensitive
    MemoryStore.destroy("Shared-Name")
    with pytest.raises(ConfigError):
        open_store("memory://x?bogus=1")


# --------------------------------------------------------- shared dir only
def test_shared_dir_uri_options(tmp_path: Any) -> None:
    s = open_store(f"file://{tmp_path}/st?fsync=1&max_bytes=2GiB&create=true")
    assert isinstance(s, SharedDirStore) and s.fsync and s.max_bytes == 2 * 2**30
    ref = s.put("s", 1, {"x": torch.arange(4)})
    assert s.get(ref)["x"].tolist() == [0, 1, 2, 3]
    with pytest.raises(ConfigError):
        open_store(f"file://{tmp_path}/missing?create=0").keys()
    with pytest.raises(ConfigError):
        open_store("file://remotehost/x")
    with pytest.raises(ConfigError):
        SharedDirStore("relative/path")


def test_shared_dir_layout_and_modes(tmp_path: Any) -> None:
    old = os.umask(0o022)
    try:
        s = SharedDirStore(tmp_path / "st")
        ref = s.put("sample-1", 3, sample_tensors())
    finally:
        os.umask(old)
    path = s.path_of("sample-1", 3)
    assert os.path.basename(path) == "sample-1@3.tdf"
    assert os.path.dirname(os.path.dirname(path)) == s.root
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(s.root).st_mode) == 0o700
    assert os.path.getsize(path) == ref.nbytes
    assert os.path.exists(os.path.join(s.root, MARKER))


def test_shared_dir_refuses_foreign_directory(tmp_path: Any) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        SharedDirStore(tmp_path).keys()
    other = tmp_path / "other"
    other.mkdir()
    (other / MARKER).write_text('{"kind": "something-else"}')
    with pytest.raises(ConfigError, match="not a torch_dataflow"):
        SharedDirStore(other).keys()


def test_shared_dir_temp_files_invisible_and_swept(tmp_path: Any) -> None:
    s = SharedDirStore(tmp_path / "st")
    ref = s.put("s", 1, {"x": torch.ones(2)})
    d = os.path.dirname(s.path_of("s", 1))
    leftover = os.path.join(d, ".1.999.deadbeef.tmp")
    with open(leftover, "wb") as f:
        f.write(b"partial")
    assert s.keys() == [("s", 1)] and s.health().count == 1
    assert s.sweep_temp(older_than_s=3600) == 0  # young: may be a write in progress
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    assert s.sweep_temp(older_than_s=3600) == 1
    assert not os.path.exists(leftover) and s.exists(ref)


def test_shared_dir_stale_generation_file(tmp_path: Any) -> None:
    s = SharedDirStore(tmp_path / "st")
    ref1 = s.put("s", 1, {"x": torch.ones(2)})
    s.delete(ref1)
    s.put("s", 2, {"x": torch.zeros(2)})
    with pytest.raises(SampleUnavailable):
        s.get(ref1)


def test_shared_dir_zero_copy_views_are_private(tmp_path: Any) -> None:
    s = SharedDirStore(tmp_path / "st")
    t = sample_tensors()
    ref = s.put("s", 1, t)
    v = s.get(ref, zero_copy=True)
    v["input_ids"].fill_(7)  # copy-on-write mapping: the file is untouched
    assert_same_tensors(s.get(ref), t)


def test_shared_dir_concurrent_first_attach(tmp_path: Any) -> None:
    # Many clients race to create the store: exactly one marker wins, none sees a
    # half-made store as foreign, and all agree on the secret.
    import threading

    root = tmp_path / "race"
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            s = SharedDirStore(root, secret="s")
            ref = s.put(f"c{k}", 1, {"x": torch.full((4,), k)})
            assert s.get(ref)["x"].tolist() == [k] * 4
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert SharedDirStore(root, secret="s").health().count == 16


def test_shared_dir_write_survives_short_pwritev(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # pwritev may write less than asked (past 2 GiB per call, or on a signal): the
    # put goes on from the exact byte, across tensor boundaries, and the blob is whole.
    from torch_dataflow.stores import shared_dir

    real, calls = os.pwritev, []

    def short(fd: int, views: list[memoryview], pos: int) -> int:
        calls.append(len(views))
        first = memoryview(views[0]).cast("B")
        return real(fd, [first[:7]] if len(first) > 7 else [first, *views[1:2]], pos)

    s = SharedDirStore(tmp_path / "st")
    t = sample_tensors()
    monkeypatch.setattr(shared_dir.os, "pwritev", short)
    ref = s.put("s", 1, t)
    monkeypatch.undo()
    assert len(calls) > len(t) + 1  # really written in short pieces
    assert os.path.getsize(s.path_of("s", 1)) == ref.nbytes
    assert_same_tensors(s.get(ref), t)


@pytest.mark.parametrize("order", ["small_first", "big_first"])
def test_shared_dir_hashed_write_is_the_encoded_blob(tmp_path: Any, order: str) -> None:
    # The put hashes each 4 MiB piece right before writing it and writes the header last:
    # the file must be byte for byte codec.encode's blob, with its checksum, for tensors
    # under, at and over the piece size, empty ones, and either order of small and big.
    from torch_dataflow import codec
    from torch_dataflow.stores._file_io import _HASH_CHUNK

    g = torch.Generator().manual_seed(5)
    big = {"big": torch.randn(_HASH_CHUNK // 2 + 123, generator=g, dtype=torch.float64),  # 2 pieces + a tail
           "exact": torch.randint(0, 255, (_HASH_CHUNK,), generator=g, dtype=torch.uint8)}
    small = {"ids": torch.arange(7), "mask": torch.ones(5, dtype=torch.bool), "empty": torch.zeros(0, 3)}
    t = {**small, **big} if order == "small_first" else {**big, **small}
    s = SharedDirStore(tmp_path / "st")
    ref = s.put("s", 1, t)
    enc = codec.encode(t)
    with open(s.path_of("s", 1), "rb") as f:
        assert f.read() == enc.to_bytes()
    assert (ref.checksum, ref.nbytes, ref.specs) == (enc.checksum, enc.nbytes, enc.specs)
    assert_same_tensors(s.get(ref), t)
    refs = s.put_many([("m1", 1, t, {"k": 1}), ("m2", 1, small, None)])
    assert [r.checksum for r in refs] == [enc.checksum, codec.encode(small).checksum]
    with pytest.raises(TypeError):  # a bad item refuses the whole call before any byte is written
        s.put_many([("m3", 1, t, None), ("m4", 1, {"x": object()}, None)])
    held = s.keys()  # a list of (sample_id, generation)
    assert ("m3", 1) not in held


def test_shared_dir_write_more_tensors_than_iov_max(tmp_path: Any) -> None:
    from torch_dataflow.stores.shared_dir import _IOV_MAX

    s = SharedDirStore(tmp_path / "st")
    t = {f"t{i:05d}": torch.full((3,), i, dtype=torch.int32) for i in range(_IOV_MAX + 5)}
    ref = s.put("many", 1, t)
    assert_same_tensors(s.get(ref), t)


def test_shared_dir_failed_write_leaves_no_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A write that fails midway (disk full) publishes nothing and leaves no temp file.
    from torch_dataflow.stores import shared_dir

    s = SharedDirStore(tmp_path / "st")
    s.put("warm", 1, {"x": torch.ones(2)})  # attached, marker written
    real, n = os.pwritev, [0]

    def full(fd: int, views: list[memoryview], pos: int) -> int:
        n[0] += 1
        if n[0] > 1:
            raise OSError(28, "No space left on device")
        return real(fd, [memoryview(views[0]).cast("B")[:5]], pos)

    monkeypatch.setattr(shared_dir.os, "pwritev", full)
    with pytest.raises(OSError, match="No space"):
        s.put("s", 1, sample_tensors())
    monkeypatch.undo()
    assert s.keys() == [("warm", 1)]
    assert s.sweep_temp(older_than_s=0, dry_run=True) == 0


def _same_fanout_ids(store: SharedDirStore, n: int) -> list[str]:
    ids = [f"s{i}" for i in range(4096)]
    d = store._dir(ids[0])
    return [s for s in ids if store._dir(s) == d][:n]


def test_shared_dir_freed_store_keeps_no_empty_directories(tmp_path: Any) -> None:
    store = SharedDirStore(str(tmp_path / "s"))
    refs = [store.put(f"s{i}", 1, sample_tensors(seed=i)) for i in range(64)]
    assert len([d for d in os.listdir(store.root) if len(d) == 2]) > 16
    for ref in refs:
        assert store.delete(ref)
    assert sorted(os.listdir(store.root)) == [".staging", MARKER]  # fan-out dirs go with their last file
    assert os.listdir(os.path.join(store.root, ".staging")) == []
    ref = store.put("s0", 2, sample_tensors(seed=0))  # and come back at the next put
    assert_same_tensors(store.get(ref), sample_tensors(seed=0))


def test_shared_dir_put_survives_its_dir_removed_before_the_link(tmp_path: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A delete that empties a fan-out dir removes it: if that happens between a put's mkdir and its
    link (fault injected there), the put makes the dir again and publishes."""
    import torch_dataflow.stores.shared_dir as sd

    store = SharedDirStore(str(tmp_path / "s"))
    a, b = _same_fanout_ids(store, 2)
    ra = store.put(a, 1, sample_tensors(seed=1))
    real = sd._mkdir_private
    raced = []

    def mkdir_then_lose_it(path: str) -> None:
        real(path)
        if not raced and os.path.basename(path) != ".staging":
            raced.append(path)
            os.rmdir(path)  # the other process's delete of the dir's last file got here first

    monkeypatch.setattr(sd, "_mkdir_private", mkdir_then_lose_it)
    store.delete(ra)  # the dir is empty and gone
    rb = store.put(b, 1, sample_tensors(seed=2))
    assert raced and os.path.isfile(store.path_of(b, 1))
    assert_same_tensors(store.get(rb), sample_tensors(seed=2))


def test_shared_dir_put_survives_its_dir_removed_between_mkdir_and_chmod(tmp_path: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import torch_dataflow.stores._file_io as fio

    store = SharedDirStore(str(tmp_path / "s"))
    a, b = _same_fanout_ids(store, 2)
    store.delete(store.put(a, 1, sample_tensors(seed=1)))  # the dir is gone
    real, raced = os.chmod, []

    def chmod_after_a_delete(path: Any, mode: int, *args: Any, **kw: Any) -> None:
        if not raced and os.path.basename(str(path)) == os.path.basename(store._dir(b)):
            raced.append(path)
            os.rmdir(path)  # the other process's delete removed the dir just made
        real(path, mode, *args, **kw)

    monkeypatch.setattr(fio.os, "chmod", chmod_after_a_delete)
    rb = store.put(b, 1, sample_tensors(seed=2))
    assert raced and os.path.isfile(store.path_of(b, 1))
    assert stat.S_IMODE(os.stat(os.path.dirname(store.path_of(b, 1))).st_mode) == 0o700
    assert_same_tensors(store.get(rb), sample_tensors(seed=2))


def test_shared_dir_puts_and_deletes_in_one_dir_from_two_processes(tmp_path: Any) -> None:
    """Two processes: one puts and deletes ids of one fan-out dir over and over (the dir empties
    each time), the other puts the rest of that dir's ids. Every put lands, nothing is left over."""
    import multiprocessing as mp

    store = SharedDirStore(str(tmp_path / "s"))
    ids = _same_fanout_ids(store, 12)
    ctx = mp.get_context("spawn")
    churn = ctx.Process(target=_churn, args=(store.root, ids[0], 300))
    churn.start()
    kept = []
    for rnd in range(30):
        for sid in ids[1:]:
            ref = store.put(sid, rnd + 1, {"x": torch.full((64,), float(rnd))})
            kept.append(ref)
        for ref in kept:
            assert torch.equal(store.get(ref)["x"], torch.full((64,), float(ref.generation - 1)))
            store.delete(ref)
        kept.clear()
    churn.join(120)
    assert churn.exitcode == 0
    assert list(store.keys()) == []
    assert sorted(os.listdir(store.root)) == [".staging", MARKER]


def _churn(root: str, sid: str, n: int) -> None:
    store = SharedDirStore(root)
    for gen in range(1, n + 1):
        store.delete(store.put(sid, gen, {"x": torch.ones(64)}))
