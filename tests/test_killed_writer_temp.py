"""A writer SIGKILLed in the middle of a blob leaves a half-written temporary file;
the restarted writer removes it before its first put, so the kill leaves no bytes
behind without waiting for `torch-dataflow gc`. Files of live writers and of other
hosts are never touched."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from pathlib import Path

import pytest
import torch

from torch_dataflow import FeatureWriter
from torch_dataflow.ledger import open_ledger
from torch_dataflow.stores import open_store
from torch_dataflow.stores.shared_dir import _HOST, SharedDirStore

IDS = [f"s{i}" for i in range(6)]


def _tensors(sid: str) -> dict[str, torch.Tensor]:
    return {"x": torch.full((256 * 1024,), float(int(sid[1:])))}  # 1 MiB: written in several pieces


def _killed_mid_write(store: str, ledger: str) -> None:
    def half_then_die(self: SharedDirStore, path: str, parts: object) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        first = parts.buffers[0] if hasattr(parts, "buffers") else parts[0]  # a put passes a codec.Layout
        os.write(fd, bytes(memoryview(first))[:4096])
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    w = FeatureWriter(store, ledger, name="p", resume=True)
    for sid in IDS[:3]:
        w.put(sid, _tensors(sid))
    SharedDirStore._write_file = half_then_die  # type: ignore[method-assign]
    w.put(IDS[3], _tensors(IDS[3]))


@pytest.mark.allow_leaks  # multiprocessing's forkserver lives on, as it does for users
def test_a_restarted_writer_removes_what_its_killed_predecessor_half_wrote(tmp_path: Path) -> None:
    store, ledger = f"file://{tmp_path}/feats", f"sqlite://{tmp_path}/ledger.db"
    p = mp.get_context("forkserver").Process(target=_killed_mid_write, args=(store, ledger))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    staging = tmp_path / "feats" / ".staging"
    [half] = list(staging.iterdir())
    assert half.stat().st_size > 0 and half.name.startswith(f"{_HOST}+{p.pid}+")
    live = staging / f"{_HOST}+{os.getpid()}+feedc0de.tmp"  # a write in progress of a live process
    other = staging / "another-host+12345+feedc0de.tmp"  # another host's: its pid means nothing here
    live.write_bytes(b"x")
    other.write_bytes(b"y")
    with FeatureWriter(store, ledger, name="p", resume=True) as w:
        todo = w.missing(IDS)
        assert todo == IDS[3:]
        assert sorted(f.name for f in staging.iterdir()) == sorted([live.name, other.name])  # the dead one's gone
        for sid in todo:
            w.put(sid, _tensors(sid))
    live.unlink()
    other.unlink()
    led, st = open_ledger(ledger), open_store(store)
    refs = led.committed_refs(IDS)
    assert sorted(refs) == IDS
    files = [f for f in (tmp_path / "feats").rglob("*") if f.is_file() and f.name != ".torch_dataflow.json"]
    assert sorted(f.name for f in files) == sorted(f"{s}@{r.generation}.tdf" for s, r in refs.items())  # nothing else
    assert sum(f.stat().st_size for f in files) == sum(r.nbytes for r in refs.values())
    for sid, ref in refs.items():
        assert float(st.get(ref)["x"][0]) == float(int(sid[1:]))
