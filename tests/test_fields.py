"""Field selection (issue 13 part 2): ``fields=`` on FeatureStoreDataset and FeaturePool reads
only the chosen tensors' byte ranges and verifies them; identical tensors to a full read,
typed errors for unknown names, corrupt bytes in a chosen tensor or the header caught and
quarantined as a full read's are, format-1 blobs still read. The store-level contract
(every backend, Mooncake included) is in torch_dataflow.testing.store_conformance."""

from __future__ import annotations

import os
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import torch
from _batch_helpers import rot
from torch.utils.data import DataLoader

from torch_dataflow import ConfigError, CorruptSample, FeatureStoreDataset, FeatureWriter, open_ledger
from torch_dataflow.batch_read import read_batch
from torch_dataflow.eagle3 import Eagle3Collator
from torch_dataflow.fields import check_fields_arg, plan_ranges
from torch_dataflow.pool import FeaturePool
from torch_dataflow.refs import SampleRef
from torch_dataflow.sampler import ReshardingSampler
from torch_dataflow.stores import open_store
from torch_dataflow.testing import assert_same_tensors, format1_blob

import test_mooncake as _mc  # isort: skip (the tests directory, not a package)

master = _mc.master  # the real mooncake_master fixture (session scope; skips with an install hint without it)

_names = count()
TRAIN = ["input_ids", "loss_mask", "hidden_state"]  # an EAGLE3 subset: no aux states, no extras
EAGLE3 = ["input_ids", "loss_mask", "hidden_state", "aux_hidden_state"]


def _sample(i: int, s: int = 6, h: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {
        "input_ids": torch.randint(0, 32000, (s,), generator=g),
        "loss_mask": torch.randint(0, 2, (s,), generator=g),
        "hidden_state": torch.randn(1, s, h, generator=g).bfloat16(),
        "aux_hidden_state": torch.randn(1, s, 3 * h, generator=g).bfloat16(),
        "logits": torch.randn(s, 64, generator=g),  # big, and nobody here trains on it
    }


def _fill(store: str, ledger: str, n: int, lengths: tuple[int, ...] = (6, 3, 5)) -> None:
    with FeatureWriter(store, ledger) as w:
        for i in range(n):
            w.put(f"s{i:03d}", _sample(i, lengths[i % len(lengths)]))


def _uris(tmp_path: Path, kind: str) -> tuple[str, str]:
    n = next(_names)
    if kind == "memory":
        return f"memory://fields-{os.getpid()}-{n}", f"memory://fields-{os.getpid()}-{n}"
    return f"file://{tmp_path}/features-{n}", f"sqlite://{tmp_path}/ledger-{n}.db"


def _flip(store: Any, ref: SampleRef, name: str | None, mask: int = 0x04) -> None:
    """Flip one bit in the middle of tensor ``name`` (``None``: inside the JSON header)."""
    blob = bytearray(store._read(ref.sample_id, ref.generation))
    hsize = ref.nbytes - sum(s.nbytes for s in ref.specs)
    pos = hsize
    at = 20
    for s in ref.specs:
        if s.name == name:
            at = pos + s.nbytes // 2
        pos += s.nbytes
    blob[at] ^= mask
    rot(store, ref.sample_id, ref.generation, bytes(blob))


# ------------------------------------------------------------------ arguments
def test_fields_argument_is_checked() -> None:
    assert check_fields_arg(None) is None
    assert check_fields_arg(("a", "b", "a")) == ("a", "b")
    for bad, match in [("input_ids", "write fields="), ([], "selects nothing"), ([""], "non-empty"),
                       ([1], "non-empty"), (3, "list of tensor names")]:
        with pytest.raises(ConfigError, match=match):
            check_fields_arg(bad)  # type: ignore[arg-type]


def test_plan_merges_touching_ranges_and_reads_nothing_else(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/s")
    ref = store.put("a", 1, _sample(0))
    order = [s.name for s in ref.specs]
    assert order == ["input_ids", "loss_mask", "logits", "aux_hidden_state", "hidden_state"]
    calls: list[list[tuple[int, int]]] = []
    real = store._read_ranges

    def spy(sid: str, gen: int, ranges: Any, feed: Any = None) -> int:
        calls.append([(off, sum(len(v) for v in views)) for off, views in ranges])
        return real(sid, gen, ranges, feed)

    store._read_ranges = spy  # type: ignore[method-assign]
    got = store.get_fields(ref, TRAIN)
    hsize = ref.nbytes - sum(s.nbytes for s in ref.specs)
    by = {s.name: s.nbytes for s in ref.specs}
    # header + input_ids + loss_mask touch: one range; hidden_state (last) is the second
    assert calls == [[(0, hsize + by["input_ids"] + by["loss_mask"]), (ref.nbytes - by["hidden_state"],
                                                                         by["hidden_state"])]]
    assert sum(n for _, n in calls[0]) < ref.nbytes // 3
    assert_same_tensors(got, {k: _sample(0)[k] for k in TRAIN})
    with pytest.raises(KeyError):
        plan_ranges(ref, [("nope", [])], memoryview(bytearray(hsize)))


# ------------------------------------------------------------------ dataset face
@pytest.mark.parametrize(("kind", "workers"), [("memory", 0), ("file", 0), ("file", 2)])
def test_dataset_fields_equal_the_full_read(tmp_path: Path, kind: str, workers: int) -> None:
    store, ledger = _uris(tmp_path, kind)
    _fill(store, ledger, 7)
    ds = FeatureStoreDataset(store, ledger, mode="offline", fields=TRAIN)
    seen = []
    for sample in DataLoader(ds, batch_size=None, num_workers=workers):
        sid = sample["__sample_id__"]
        assert sorted(sample) == sorted([*TRAIN, "__lease__", "__sample_id__"])
        assert_same_tensors({k: sample[k] for k in TRAIN}, {k: _sample(int(sid[1:]), [6, 3, 5][int(sid[1:]) % 3])[k]
                                                           for k in TRAIN})
        seen.append(sid)
        ds.ack(sample, step=len(seen))
    assert sorted(seen) == [f"s{i:03d}" for i in range(7)]
    assert open_ledger(ledger).counts().trained == 7  # acking does not care which fields were read


def test_dataset_unknown_field_is_a_config_error_and_changes_nothing(tmp_path: Path) -> None:
    store, ledger = _uris(tmp_path, "file")
    _fill(store, ledger, 3)
    ds = FeatureStoreDataset(store, ledger, mode="offline", fields=["input_ids", "target"])
    with pytest.raises(ConfigError, match="target") as info:
        next(iter(ds))
    for name in ("input_ids", "loss_mask", "hidden_state", "aux_hidden_state", "logits"):
        assert repr(name) in str(info.value)  # lists what the sample holds
    c = open_ledger(ledger).counts()
    assert (c.pending, c.leased) == (3, 0) and not open_ledger(ledger).quarantined()  # leases given back


@pytest.mark.parametrize("where", ["hidden_state", None])
def test_dataset_quarantines_a_flip_in_a_chosen_field_or_the_header_like_a_full_read(
        tmp_path: Path, where: str | None) -> None:
    outcomes = []
    for fields in (TRAIN, None):
        store, ledger = _uris(tmp_path, "file")
        _fill(store, ledger, 4)
        led = open_ledger(ledger)
        ref = led.get_ref("s002")
        assert ref is not None
        _flip(open_store(store), ref, where)
        ds = FeatureStoreDataset(store, ledger, mode="offline", fields=fields)
        got = sorted(s["__sample_id__"] for s in ds)
        outcomes.append((got, ds.quarantined, [r.sample_id for r, _ in led.quarantined() if r is not None]))
    assert outcomes[0] == outcomes[1] == (["s000", "s001", "s003"], ["s002"], ["s002"])


def test_a_flip_in_a_field_not_chosen_is_not_read(tmp_path: Path) -> None:
    store, ledger = _uris(tmp_path, "file")
    _fill(store, ledger, 2)
    led = open_ledger(ledger)
    ref = led.get_ref("s001")
    assert ref is not None
    _flip(open_store(store), ref, "logits")
    ds = FeatureStoreDataset(store, ledger, mode="offline", fields=TRAIN)
    assert sorted(s["__sample_id__"] for s in ds) == ["s000", "s001"]  # documented: not detected by this read
    with pytest.raises(CorruptSample, match="logits"):
        open_store(store).get(ref)  # a full read still covers every byte


def test_format1_blobs_are_read_whole_and_verified(tmp_path: Path) -> None:
    store_uri, ledger_uri = _uris(tmp_path, "file")
    _fill(store_uri, ledger_uri, 2)
    store, led = open_store(store_uri), open_ledger(ledger_uri)
    old = _sample(9)
    blob, specs, checksum = format1_blob(old)
    (gen,) = led.reserve(["old"])
    ref = SampleRef(sample_id="old", generation=gen, store=store.uri, specs=specs, nbytes=len(blob), checksum=checksum)
    store._write("old", gen, [blob], len(blob))  # a blob written by an earlier version of the codec
    led.commit([ref])
    got = {s["__sample_id__"]: s for s in FeatureStoreDataset(store_uri, ledger_uri, mode="offline", fields=TRAIN)}
    assert sorted(got) == ["old", "s000", "s001"]
    assert_same_tensors({k: got["old"][k] for k in TRAIN}, {k: old[k] for k in TRAIN})
    _flip(store, ref, "logits")  # not chosen, but a format-1 blob can only be verified whole
    with pytest.raises(CorruptSample):
        store.get_fields(ref, TRAIN)
    pool = FeaturePool(store_uri, ledger_uri, fields=EAGLE3)
    index = pool.index_of("old")
    with pytest.raises(CorruptSample):  # the batch-direct path falls back to the whole blob too
        read_batch(pool.store, [ref], Eagle3Collator(), fields=pool.fields)
    rot(store, "old", gen, blob)
    direct = read_batch(pool.store, [ref], Eagle3Collator(), fields=pool.fields)
    assert direct is not None
    full = Eagle3Collator()([pool[index]])
    assert all(torch.equal(direct[k], full[k]) for k in ("input_ids", "loss_mask", "hidden_state", "target"))


# ------------------------------------------------------------------ pool face
def _loader_batches(pool: FeaturePool, workers: int, collate: Any) -> list[dict[str, Any]]:
    sampler = ReshardingSampler(pool, shuffle=True, seed=3, lease_ttl=60)
    out = []
    it = iter(DataLoader(pool, batch_size=3, sampler=sampler, num_workers=workers, collate_fn=collate))
    try:
        for step, batch in enumerate(it, start=1):
            assert pool.ack(batch, step, strict=True) == []
            out.append(batch)
    finally:
        it._shutdown_workers() if workers else None  # an error must not leave the workers running
    return out


@pytest.mark.parametrize(("kind", "workers"), [("memory", 0), ("file", 0), ("file", 2)])
def test_pool_eagle3_batches_with_fields_equal_the_full_read(tmp_path: Path, kind: str, workers: int) -> None:
    store, ledger = _uris(tmp_path, kind)
    _fill(store, ledger, 8)
    collate = Eagle3Collator(max_len=4, with_position_ids=True)
    pool = FeaturePool(store, ledger, fields=EAGLE3)
    full = FeaturePool(store, ledger)
    ranged: list[int] = []
    if workers == 0:  # count the ranged reads (in this process): the batch-direct path used them
        real = pool.store.read_ranges_into

        def spy(ref: SampleRef, ranges: Any, feed: Any = None) -> int:
            ranged.append(sum(len(v) for _, views in ranges for v in views))
            return real(ref, ranges, feed)

        pool.store.read_ranges_into = spy  # type: ignore[method-assign]
    seen = []
    for batch in _loader_batches(pool, workers, collate):
        expect = collate([full[full.index_of(sid)] for sid in batch["__sample_id__"]])
        for k in ("input_ids", "attention_mask", "loss_mask", "hidden_state", "target", "position_ids"):
            assert torch.equal(batch[k], expect[k]) and batch[k].dtype == expect[k].dtype, k
        seen += batch["__sample_id__"]
    assert sorted(seen) == pool.sample_ids
    if workers == 0:
        refs = [pool.ledger.get_ref(sid) for sid in pool.sample_ids]
        logits = sum(next(s.nbytes for s in r.specs if s.name == "logits") for r in refs if r is not None)
        assert len(ranged) == 8 and sum(ranged) == sum(r.nbytes for r in refs if r is not None) - logits
    # per-sample face of the pool: only the chosen tensors
    item = pool[0]
    assert sorted(item) == sorted([*EAGLE3, "__sample_id__"])
    assert_same_tensors({k: item[k] for k in EAGLE3}, {k: full[0][k] for k in EAGLE3})


def test_pool_unknown_field_is_refused_at_construction(tmp_path: Path) -> None:
    store, ledger = _uris(tmp_path, "file")
    _fill(store, ledger, 2)
    with pytest.raises(ConfigError, match=r"\['target'\] are not in sample 's000'.*'aux_hidden_state'"):
        FeaturePool(store, ledger, fields=["input_ids", "target"])


@pytest.mark.parametrize("workers", [0, 2])
def test_collator_needing_an_unselected_field_names_it(tmp_path: Path, workers: int) -> None:
    store, ledger = _uris(tmp_path, "file")
    _fill(store, ledger, 4)
    pool = FeaturePool(store, ledger, fields=TRAIN)
    with pytest.raises(ConfigError, match="aux_hidden_state"):
        _loader_batches(pool, workers, Eagle3Collator())
    c = open_ledger(ledger).counts()
    assert c.trained == 0 and not open_ledger(ledger).quarantined()


def test_dataset_face_with_the_collator_names_the_missing_field(tmp_path: Path) -> None:
    store, ledger = _uris(tmp_path, "file")
    _fill(store, ledger, 2)
    ds = FeatureStoreDataset(store, ledger, mode="offline", fields=TRAIN)
    with pytest.raises(ConfigError, match=r"missing \['aux_hidden_state'\].*fields="):
        next(iter(DataLoader(ds, batch_size=2, collate_fn=Eagle3Collator())))


@pytest.mark.parametrize("where", ["hidden_state", "aux_hidden_state", None])
def test_pool_direct_path_quarantines_a_corrupt_chosen_field(tmp_path: Path, where: str | None) -> None:
    store, ledger = _uris(tmp_path, "file")
    _fill(store, ledger, 4)
    pool = FeaturePool(store, ledger, fields=EAGLE3)
    ref = pool.ledger.get_ref("s001")
    assert ref is not None
    _flip(pool.store, ref, where)
    indices = list(ReshardingSampler(pool, shuffle=False))
    with pytest.raises(CorruptSample):
        Eagle3Collator()(pool.__getitems__(indices[:3]))
    assert [r.sample_id for r, _ in pool.ledger.quarantined() if r is not None] == ["s001"]


def test_pool_direct_path_skips_a_flip_in_a_field_not_chosen(tmp_path: Path) -> None:
    store, ledger = _uris(tmp_path, "file")
    _fill(store, ledger, 3)
    pool = FeaturePool(store, ledger, fields=EAGLE3)
    ref = pool.ledger.get_ref("s001")
    assert ref is not None
    _flip(pool.store, ref, "logits")
    indices = list(ReshardingSampler(pool, shuffle=False))
    batch = Eagle3Collator()(pool.__getitems__(indices))
    assert batch["__sample_id__"] == ["s000", "s001", "s002"] and not pool.ledger.quarantined()
    with pytest.raises(CorruptSample):  # without fields= the direct path reads (and checks) logits too
        read_batch(pool.store, [ref], Eagle3Collator())


# ------------------------------------------------------------------ a real Mooncake store
@pytest.mark.mooncake
@pytest.mark.timeout(300)
def test_mooncake_fields_equal_the_full_read_on_both_faces(tmp_path: Path, master: Any) -> None:
    store = _mc_store(master)
    try:
        ledger = f"sqlite://{tmp_path}/ledger.db"
        _fill(store, ledger, 6)  # type: ignore[arg-type]
        ds = FeatureStoreDataset(store, ledger, mode="offline", fields=TRAIN)
        got = {s["__sample_id__"]: s for s in ds}
        assert sorted(got) == [f"s{i:03d}" for i in range(6)]
        for sid, sample in got.items():
            assert sorted(sample) == sorted([*TRAIN, "__lease__", "__sample_id__"])
            ref = ds.ledger.get_ref(sid)
            assert ref is not None
            assert_same_tensors({k: sample[k] for k in TRAIN}, {k: store.get(ref)[k] for k in TRAIN})
        pool, full = FeaturePool(store, ledger, fields=EAGLE3), FeaturePool(store, ledger)
        collate = Eagle3Collator(max_len=4)
        for batch in _loader_batches(pool, 0, collate):
            expect = collate([full[full.index_of(sid)] for sid in batch["__sample_id__"]])
            assert all(torch.equal(batch[k], expect[k]) for k in ("input_ids", "loss_mask", "hidden_state", "target"))
        ref = pool.ledger.get_ref("s003")
        assert ref is not None
        data = bytearray(store._read("s003", ref.generation))
        data[-5] ^= 0x01  # inside hidden_state (last in the blob)
        rot(store, "s003", ref.generation, bytes(data))
        with pytest.raises(CorruptSample, match="hidden_state"):
            store.get_fields(ref, TRAIN)
    finally:
        for sid, gen in list(store.keys()):
            store._delete(sid, gen)
        store.gc(force=True)
        store.close()


def _mc_store(m: Any) -> Any:
    return _mc._store(m)
