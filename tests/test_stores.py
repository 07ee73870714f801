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


def test_shared_dir_write_survives_short_writev(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # writev may write less than asked (past 2 GiB per call, or on a signal): the
    # put goes on from the exact byte, across tensor boundaries, and the blob is whole.
    from torch_dataflow.stores import shared_dir

    real, calls = os.writev, []

    def short(fd: int, views: list[memoryview]) -> int:
        calls.append(len(views))
        first = memoryview(views[0]).cast("B")
        return real(fd, [first[:7]] if len(first) > 7 else [first, *views[1:2]])

    s = SharedDirStore(tmp_path / "st")
    t = sample_tensors()
    monkeypatch.setattr(shared_dir.os, "writev", short)
    ref = s.put("s", 1, t)
    monkeypatch.undo()
    assert len(calls) > len(t) + 1  # really written in short pieces
    assert os.path.getsize(s.path_of("s", 1)) == ref.nbytes
    assert_same_tensors(s.get(ref), t)


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
    real, n = os.writev, [0]

    def full(fd: int, views: list[memoryview]) -> int:
        n[0] += 1
        if n[0] > 1:
            raise OSError(28, "No space left on device")
        return real(fd, [memoryview(views[0]).cast("B")[:5]])

    monkeypatch.setattr(shared_dir.os, "writev", full)
    with pytest.raises(OSError, match="No space"):
        s.put("s", 1, sample_tensors())
    monkeypatch.undo()
    assert s.keys() == [("warm", 1)]
    assert s.sweep_temp(older_than_s=0, dry_run=True) == 0
