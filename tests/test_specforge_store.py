"""specforge:/// — a SpecForge offline directory served in place: registration, reads, integrity, training."""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from torch_dataflow import ConfigError, CorruptSample, FeatureStoreDataset, SampleUnavailable, open_ledger
from torch_dataflow.eagle3 import eagle3_collate
from torch_dataflow.pool import FeaturePool
from torch_dataflow.refs import SampleRef
from torch_dataflow.sampler import ReshardingSampler
from torch_dataflow.specforge import (
    SpecForgeDirectory,
    SpecForgeDirStore,
    import_directory,
    register_directory,
    write_specforge_directory,
)
from torch_dataflow.stores import open_store
from torch_dataflow.testing import assert_same_tensors

VARIANTS = {
    "ckpt": {},
    "gz": {"compress": True},
    "no-batch-dim": {"batch_dim": False},
    "batch-padded": {"pad_to": 9},
}


def _dir(tmp_path: Path, n: int = 6, **kw: object) -> tuple[Path, str, str]:
    src = tmp_path / "hs"
    args: dict[str, object] = {"seq_lens": [3, 5, 7], "hidden": 8, "group": 4, **kw}
    write_specforge_directory(src, n, **args)  # type: ignore[arg-type]
    return src, f"specforge://{src}", f"sqlite://{tmp_path / 'ledger.db'}"


def _refs(ledger: str, ds: SpecForgeDirectory) -> list[SampleRef]:
    led = open_ledger(ledger)
    refs = [led.get_ref(ds.sample_id(i)) for i in range(len(ds))]
    assert all(r is not None for r in refs)
    return refs  # type: ignore[return-value]


def _keep_mtime(path: Path, data: bytes) -> None:
    """Rewrite ``path`` with ``data`` and put its modification time back."""
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ---------------------------------------------------------------- registration and reads
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_register_is_idempotent_and_reads_equal_the_directory(tmp_path: Path, variant: str) -> None:
    src, store_uri, ledger = _dir(tmp_path, **VARIANTS[variant])
    ds = SpecForgeDirectory(src)
    assert register_directory(src, ledger, progress=False) == 6
    assert register_directory(src, ledger, progress=False) == 0  # nothing changed: nothing committed
    led = open_ledger(ledger)
    assert led.counts().committed == 6 and led.is_closed()
    store = open_store(store_uri)
    assert isinstance(store, SpecForgeDirStore) and store.uri == store_uri
    for i, ref in enumerate(_refs(ledger, ds)):
        assert ref.generation == 1 and ref.store == store_uri and ref.nbytes == ds.paths[i].stat().st_size
        assert ref.metadata["source"] == ds.relative_path(i) and ref.checksum.startswith("sf1:")
        if variant == "gz":
            assert ref.specs == ()  # no header without a full decompression
        else:
            assert [s.name for s in ref.specs] == list(ds[i]) and ref.specs[2].dtype == "bfloat16"
        assert store.exists(ref)
        assert_same_tensors(store.get(ref), ds[i])
        assert_same_tensors(store.get(ref, zero_copy=True), ds[i])
    assert store.keys() == [(ds.sample_id(i), 1) for i in range(6)]
    assert store.health().count == 6
    assert store.health().resident_bytes == sum(p.stat().st_size for p in ds.paths)


def test_a_changed_file_is_registered_again_as_a_new_generation(tmp_path: Path) -> None:
    src, store_uri, ledger = _dir(tmp_path)
    register_directory(src, ledger, progress=False)
    ds = SpecForgeDirectory(src)
    old = _refs(ledger, ds)[2]
    other = tmp_path / "other"
    write_specforge_directory(other, 3, 11, hidden=8, seed=9, group=4)
    ds.paths[2].write_bytes((other / "rows_0-4" / "data_2.ckpt").read_bytes())
    with pytest.raises(CorruptSample, match="changed since it was registered"):
        open_store(store_uri).get(old)
    assert register_directory(src, ledger, progress=False) == 1
    new = _refs(ledger, ds)[2]
    assert new.generation == 2 and new.checksum != old.checksum
    assert open_store(store_uri).get(new)["input_ids"].shape == (11,)


def test_registration_is_safe_from_several_processes_at_once(tmp_path: Path) -> None:
    src, _, ledger = _dir(tmp_path, n=40)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            register_directory(src, ledger, progress=False, batch=7)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert open_ledger(ledger).counts().committed == 40
    assert register_directory(src, ledger, progress=False) == 0


def test_registration_refusals(tmp_path: Path) -> None:
    src, _, ledger = _dir(tmp_path)
    with pytest.raises(ConfigError, match="trim_padding"):
        register_directory(SpecForgeDirectory(src, trim_padding=True), ledger, progress=False)
    # A ledger that already holds the ids from a copy (import) is not reused in place.
    store = f"file://{tmp_path / 'copy'}"
    import_directory(src, store, ledger, progress=False)
    with pytest.raises(ConfigError, match="separate ledger"):
        register_directory(src, ledger, progress=False)
    # '~' in a relative path would make the id ambiguous.
    tilde = tmp_path / "tilde"
    (tilde / "rows~0").mkdir(parents=True)
    (tilde / "rows~0" / "data_0.ckpt").write_bytes((src / "rows_0-4" / "data_0.ckpt").read_bytes())
    with pytest.raises(ConfigError, match="'~'"):
        register_directory(tilde, f"sqlite://{tmp_path / 'l2.db'}", progress=False)
    # A .ckpt that needs more than weights_only is refused before anything is committed.
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"input_ids": torch.arange(3), "x": _Evil(str(tmp_path / "ran"))}, evil / "data_0.ckpt")
    with pytest.raises(CorruptSample, match="weights_only"):
        register_directory(evil, f"sqlite://{tmp_path / 'l3.db'}", progress=False)
    assert not (tmp_path / "ran").exists()
    assert open_ledger(f"sqlite://{tmp_path / 'l3.db'}").counts().committed == 0


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


# ---------------------------------------------------------------- the store's contract
def test_read_only_no_secret_pickles_by_config(tmp_path: Path) -> None:
    src, store_uri, ledger = _dir(tmp_path)
    register_directory(src, ledger, progress=False)
    ds = SpecForgeDirectory(src)
    store, ref = open_store(store_uri), _refs(ledger, ds)[0]
    with pytest.raises(ConfigError, match="read-only"):
        store.put("x.ckpt", 1, {"x": torch.ones(1)})
    with pytest.raises(ConfigError, match="read-only"):
        store.put_many([("x.ckpt", 1, {"x": torch.ones(1)}, None)])
    assert store.delete(ref) is False and ds.paths[0].exists()  # freeing never touches the files
    for bad in (f"{store_uri}?secret=s", f"specforge://:pw@{src}", f"specforge://host{src}", "specforge://"):
        with pytest.raises(ConfigError):
            open_store(bad)
    with pytest.raises(ConfigError, match="no secret"):
        SpecForgeDirStore(src, secret="s")
    with pytest.raises(ConfigError, match="absolute"):
        SpecForgeDirStore("relative/hs")
    with pytest.raises(ConfigError, match="not found"):
        SpecForgeDirStore(tmp_path / "missing").keys()
    clone = pickle.loads(pickle.dumps(store))
    assert type(clone) is SpecForgeDirStore and clone.uri == store.uri
    assert_same_tensors(clone.get(ref), ds[0])


def test_paths_never_escape_the_root(tmp_path: Path) -> None:
    src, store_uri, ledger = _dir(tmp_path)
    store = open_store(store_uri)
    assert isinstance(store, SpecForgeDirStore)
    outside = tmp_path / "outside.ckpt"
    outside.write_bytes((src / "rows_0-4" / "data_0.ckpt").read_bytes())
    for sid in (
        "~outside.ckpt",
        "..~outside.ckpt",
        "rows_0-4~..~..~outside.ckpt",
        "rows_0-4~.~data_0.ckpt",
        "rows_0-4~~data_0.ckpt",
        "rows_0-4~data_0.txt",
        "a/b.ckpt",
        "../outside.ckpt",
    ):
        with pytest.raises(ConfigError):
            store.path_of(sid)
    # A symlink out of the root: refused at registration and at read time.
    (src / "rows_0-4" / "link.ckpt").symlink_to(outside)
    with pytest.raises(ConfigError, match="outside"):
        register_directory(src, ledger, progress=False)
    ref = SampleRef("rows_0-4~link.ckpt", 1, store_uri, (), 1, "sf1:1:1:0")
    with pytest.raises(ConfigError, match="outside"):
        store.get(ref)
    # A symlink that stays inside is the file it points to.
    (src / "rows_0-4" / "link.ckpt").unlink()
    (src / "rows_0-4" / "alias.ckpt").symlink_to(src / "rows_0-4" / "data_1.ckpt")
    assert register_directory(src, ledger, progress=False) == 7


# ---------------------------------------------------------------- integrity (invariant 7)
def test_truncated_rewritten_or_vanished_files(tmp_path: Path) -> None:
    src, store_uri, ledger = _dir(tmp_path, n=4, seq_lens=16, hidden=256)  # ~37 KiB files
    register_directory(src, ledger, progress=False)
    ds = SpecForgeDirectory(src)
    store, refs = open_store(store_uri), _refs(ledger, ds)
    good = ds.paths[0].read_bytes()
    assert len(good) > 16 * 1024
    for bad in (good[: len(good) // 2], good[:-1], b"", good + b"\0"):
        _keep_mtime(ds.paths[0], bad)  # size changes even with the time kept
        with pytest.raises(CorruptSample, match="changed since it was registered"):
            store.get(refs[0])
    for pos in (10, len(good) - 10):  # the hashed ends: caught even with size and time kept
        flipped = bytearray(good)
        flipped[pos] ^= 0x01
        _keep_mtime(ds.paths[0], bytes(flipped))
        with pytest.raises(CorruptSample):
            store.get(refs[0])
    _keep_mtime(ds.paths[0], good)
    assert_same_tensors(store.get(refs[0]), ds[0])  # the errors were about the bytes
    # Documented limit: a same-size edit in the middle with the time kept is not seen.
    middle = bytearray(good)
    middle[len(good) // 2] ^= 0x01
    _keep_mtime(ds.paths[0], bytes(middle))
    store.get(refs[0])
    _keep_mtime(ds.paths[0], good)
    ds.paths[1].unlink()
    with pytest.raises(SampleUnavailable):
        store.get(refs[1])
    assert not store.exists(refs[1])
    ds.paths[2].write_bytes(good)  # another valid file under this name (same size, new time)
    with pytest.raises(CorruptSample):
        store.get(refs[2])


def test_corrupt_gz_never_unpickles(tmp_path: Path) -> None:
    import gzip

    src, store_uri, ledger = _dir(tmp_path, n=2, compress=True)
    marker = tmp_path / "ran"
    path = src / "rows_0-4" / "data_1.ckpt.gz"
    with gzip.open(path, "wb") as f:
        torch.save({"x": _Evil(str(marker))}, f)  # type: ignore[arg-type]
    register_directory(src, ledger, progress=False)  # gz files are not opened at registration
    with pytest.raises(CorruptSample, match="weights_only"):
        open_store(store_uri).get(_refs(ledger, SpecForgeDirectory(src))[1])
    assert not marker.exists()


def test_dataset_quarantines_corrupt_and_vanished_files(tmp_path: Path) -> None:
    src, store_uri, ledger = _dir(tmp_path, n=8)
    register_directory(src, ledger, progress=False)
    ds = SpecForgeDirectory(src)
    ds.paths[3].write_bytes(ds.paths[3].read_bytes()[:100])
    ds.paths[5].unlink()
    data = FeatureStoreDataset(store_uri, ledger, mode="offline", shuffle=False)
    got = [s["__sample_id__"] for s in data]
    assert got == [ds.sample_id(i) for i in (0, 1, 2, 4, 6, 7)]
    assert sorted(data.quarantined) == sorted([ds.sample_id(3), ds.sample_id(5)])
    assert {ref.sample_id for ref, _ in open_ledger(ledger).quarantined()} == set(data.quarantined)


# ---------------------------------------------------------------- training from the directory
def test_offline_dataset_two_epochs_each_file_once_per_epoch(tmp_path: Path) -> None:
    src, store_uri, ledger = _dir(tmp_path, n=10, compress=False)
    write_specforge_directory(src / "gz", 3, [4, 6], hidden=8, seed=1, compress=True, group=4)
    ds = SpecForgeDirectory(src)
    assert len(ds) == 13 and register_directory(src, ledger, progress=False) == 13
    data = FeatureStoreDataset(store_uri, ledger, mode="offline", batch_size=4, seed=1)
    loader = DataLoader(data, batch_size=4, num_workers=2, collate_fn=eagle3_collate)
    step, orders = 0, []
    for epoch in range(2):
        data.set_epoch(epoch)
        seen = []
        for batch in loader:
            assert batch["hidden_state"].shape[-1] == 24 and batch["target"].shape[-1] == 8
            assert batch["hidden_state"].dtype == torch.bfloat16 and batch["input_ids"].dtype == torch.int64
            step += 1
            assert data.ack(batch, step) == []
            seen += batch["__sample_id__"]
        assert sorted(seen) == sorted(ds.sample_id(i) for i in range(13))
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled per epoch
    data.mark_durable(step)
    assert all(p.exists() for p in ds.paths)


def test_online_mode_ends_and_freeing_keeps_the_files(tmp_path: Path) -> None:
    src, store_uri, ledger = _dir(tmp_path, n=5)
    register_directory(src, ledger, progress=False)  # closes the stream: online consumers end
    data = FeatureStoreDataset(store_uri, ledger, mode="online", idle_timeout=30)
    batch = list(data)
    assert len(batch) == 5 and data.ack(batch, 1) == []
    assert data.mark_durable(1, final=True) == 5  # freed in the ledger; the store's delete is a no-op
    assert all(p.exists() for p in SpecForgeDirectory(src).paths)


@pytest.mark.parametrize("world", [1, 2])
def test_resharding_sampler_matches_distributed_sampler(tmp_path: Path, world: int) -> None:
    src, store_uri, ledger = _dir(tmp_path, n=12, group=5)
    ds = SpecForgeDirectory(src)
    pool = FeaturePool.from_specforge(src, ledger=ledger)  # in place: registers, copies nothing
    assert pool.store.uri == store_uri and pool.sample_ids == [ds.sample_id(i) for i in range(12)]
    assert not (tmp_path / "features").exists()
    ours = [[int(i) for i in ReshardingSampler(pool, world, r, shuffle=False)] for r in range(world)]
    assert ours == [list(DistributedSampler(ds, world, r, shuffle=False)) for r in range(world)]
    pool.ledger.reconcile(None)  # forget the parity pass: train the epoch from scratch
    loader = DataLoader(pool, batch_size=4, sampler=ReshardingSampler(pool), collate_fn=eagle3_collate)
    batches = list(loader)
    assert [b["hidden_state"].shape[-1] for b in batches] == [24] * 3
    assert sorted(s for b in batches for s in b["__sample_id__"]) == sorted(pool.sample_ids)
    assert torch.equal(pool[7]["aux_hidden_state"], ds[7]["aux_hidden_state"])


def test_from_specforge_modes(tmp_path: Path) -> None:
    src, store_uri, ledger = _dir(tmp_path)
    with pytest.raises(ConfigError, match="ledger"):
        FeaturePool.from_specforge(src)
    with pytest.raises(ConfigError, match="copy=True"):
        FeaturePool.from_specforge(src, ledger=ledger, copy=True)
    with pytest.raises(ConfigError, match="in place"):
        FeaturePool.from_specforge(src, f"file://{tmp_path / 'f'}", ledger, copy=False)
    in_place = FeaturePool.from_specforge(src, store_uri, ledger)  # a specforge:// store: in place
    assert isinstance(in_place.store, SpecForgeDirStore) and len(in_place) == 6
    # copy=True (inferred for any other store): the imported pool, unchanged behaviour.
    copied_store, copied_ledger = f"file://{tmp_path / 'copy'}", f"sqlite://{tmp_path / 'copy.db'}"
    # Before the import step: a clear refusal, not a pool of 6 that delivers nothing.
    with pytest.raises(ConfigError, match="6 of 6 files .* not committed.*import_directory"):
        FeaturePool.from_specforge(src, copied_store, copied_ledger)
    import_directory(src, copied_store, copied_ledger, progress=False)
    copied = FeaturePool.from_specforge(src, copied_store, copied_ledger)
    assert copied.store.uri == copied_store
    assert_same_tensors(
        {k: v for k, v in copied[4].items() if not k.startswith("__")},
        {k: v for k, v in in_place[4].items() if not k.startswith("__")},
    )
