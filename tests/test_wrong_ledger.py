"""A producer pointed at the right store but a mistyped (new, empty) ledger: it must
be refused before it writes a byte, never reuse the generations of the samples the
real ledger committed (which would overwrite their blobs and make the trainer
quarantine them). And a file:// put never replaces a blob, whatever the ledgers say."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from torch_dataflow import FeatureWriter
from torch_dataflow.errors import ConfigError
from torch_dataflow.ledger import open_ledger
from torch_dataflow.stores import open_store

_NS = itertools.count()


def _blobs(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.rglob("*.tdf")}


def _ledgers(kind: str, tmp_path: Path, redis_uri: str) -> tuple[str, str]:
    if kind == "sqlite":
        return f"sqlite://{tmp_path}/ledger.db", f"sqlite://{tmp_path}/ledgr.db"
    ns = next(_NS)
    return f"{redis_uri}?namespace=real{ns}", f"{redis_uri}?namespace=typo{ns}"


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
@pytest.mark.parametrize("resume", [True, False])
def test_a_new_ledger_over_a_store_with_samples_is_refused(tmp_path: Path, redis_uri: str, kind: str,
                                                           resume: bool) -> None:
    store = f"file://{tmp_path}/feats"
    real, typo = _ledgers(kind, tmp_path, redis_uri)
    with FeatureWriter(store, real, name="p") as w:
        for i in range(6):
            w.put(f"m{i}", {"x": torch.full((64,), float(i))})
    before = _blobs(tmp_path / "feats")
    w2 = FeatureWriter(store, typo, name="p", resume=resume)
    with pytest.raises(ConfigError, match="already holds samples .* committed to another ledger"):
        w2.missing([f"m{i}" for i in range(6)]) if resume else w2.put("m0", {"x": torch.zeros(64)})
    with pytest.raises(ConfigError, match="another ledger"):
        w2.put_many([("m1", {"x": torch.zeros(64)})])
    assert _blobs(tmp_path / "feats") == before  # not a byte changed
    led, st = open_ledger(real), open_store(store)
    assert open_ledger(typo).counts().committed == 0
    for i in range(6):  # the real ledger's samples read back verified, with their own values
        assert torch.equal(st.get(led.get_ref(f"m{i}"))["x"], torch.full((64,), float(i)))


def test_a_file_put_never_replaces_a_blob(tmp_path: Path) -> None:
    """Two ledgers bound to one store while it was empty both reserve generation 1 of an id:
    the second put is refused and the first blob stays as it was."""
    store = f"file://{tmp_path}/feats"
    a = FeatureWriter(store, f"sqlite://{tmp_path}/a.db", name="a")
    b = FeatureWriter(store, f"sqlite://{tmp_path}/b.db", name="b")
    assert a.missing(["s"]) == ["s"] and b.missing(["s"]) == ["s"]  # both bound to the empty store
    ra = a.put("s", {"x": torch.ones(8)})
    before = _blobs(tmp_path / "feats")
    with pytest.raises(ConfigError, match="never replaces a blob"):
        b.put("s", {"x": torch.zeros(8)})
    assert _blobs(tmp_path / "feats") == before
    assert sorted(p.name for p in (tmp_path / "feats").rglob("*") if p.is_file()) == [
        ".torch_dataflow.json", "s@1.tdf"]  # no temporary file left either
    assert torch.equal(open_store(store).get(ra)["x"], torch.ones(8))
    assert open_ledger(f"sqlite://{tmp_path}/b.db").counts().committed == 0


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_pool_over_a_mistyped_ledger_is_refused_and_creates_nothing(tmp_path: Path, redis_uri: str,
                                                                       kind: str) -> None:
    from torch_dataflow.pool import FeaturePool

    store = f"file://{tmp_path}/feats"
    real, typo = _ledgers(kind, tmp_path, redis_uri)
    with FeatureWriter(store, real, name="p") as w:
        w.put("m0", {"x": torch.zeros(4)})
    with pytest.raises(ConfigError, match="a typo.*never creates a ledger"):
        FeaturePool(store, typo)
    assert not (tmp_path / "ledgr.db").exists()
    assert len(FeaturePool(store, real)) == 1
