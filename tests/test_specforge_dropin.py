"""The SpecForge offline drop-in against SpecForge 0.2.0's own classes (issue 11 items 1, 2, 5).

SpecForge's ``specforge.data`` imports Hugging Face ``datasets`` for a type name
only; a one-class stand-in is put in ``sys.modules`` (sglang and yunchang are
not imported by these modules). Everything else is SpecForge's own code:
``build_offline_eagle3_dataset`` / ``OfflineEagle3Dataset``,
``DataCollatorWithPadding``, ``prepare_dp_dataloaders`` and its ``DistributedSampler``.
"""

from __future__ import annotations

import ast
import difflib
import os
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DistributedSampler

from torch_dataflow import ConfigError, FeatureLoader, FeatureStoreDataset, FeatureWriter, open_ledger
from torch_dataflow.specforge import (
    CarryLeases,
    SpecForgeDirectory,
    build_offline_eagle3_dataset,
    prepare_dp_dataloaders,
    write_specforge_directory,
)
from torch_dataflow.specforge.offline import TrainedBatch, check_no_usp

ROOT = Path(__file__).resolve().parents[1]
H = 8
RESERVED = ("__lease__", "__sample_id__")


@pytest.fixture(scope="module")
def sf() -> Any:
    """SpecForge 0.2.0's data modules (``datasets`` stood in by a one-class module)."""
    stub = types.ModuleType("datasets")
    stub.Dataset = type("Dataset", (), {})  # type: ignore[attr-defined]
    saved = sys.modules.get("datasets")
    sys.modules.setdefault("datasets", stub)
    try:
        import specforge.data.preprocessing as pre
        import specforge.data.utils as utils
    except ImportError as e:  # the Makefile installs it: pip install --no-deps specforge==0.2.0
        msg = f"specforge 0.2.0 is not installed ({e}); `make setup` installs it (pip install --no-deps specforge==0.2.0)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)  # CI installs it from the Makefile: a skip there would hide a broken set-up
        pytest.skip(msg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pre, "torch", _SafeTorch())  # SpecForge reads its files with weights_only=False: never here
        yield types.SimpleNamespace(pre=pre, utils=utils)
    if saved is None and sys.modules.get("datasets") is stub:
        del sys.modules["datasets"]


class _SafeTorch:
    """``torch`` for SpecForge's preprocessing module, with ``load`` forced to ``weights_only=True``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(*args: Any, **kwargs: Any) -> Any:
        return torch.load(*args, **{**kwargs, "weights_only": True})


@pytest.fixture(scope="module")
def sf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sf") / "hs"
    # 15 files (uneven at world 2 and 4), lengths past max_len=24, two rows_ folders, gz and plain mixed.
    write_specforge_directory(root, n=9, seq_lens=[5, 31, 9, 3, 12, 27, 7], hidden=H, seed=1, group=5)
    more = write_specforge_directory(root.parent / "gz", n=15, seq_lens=[6, 30, 11], hidden=H, seed=2, group=5,
                                     compress=True)
    for p in more[9:]:
        dest = root / p.parent.name / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        p.rename(dest)
    assert len(SpecForgeDirectory(root)) == 15
    return root


class _Dist:
    """``torch.distributed`` as one rank of ``world`` sees it (SpecForge's prepare_dp_dataloaders asks it)."""

    def __init__(self, world: int, rank: int) -> None:
        self.world, self.rank = world, rank

    def get_world_size(self, group: Any = None) -> int:
        return self.world

    def get_rank(self, group: Any = None) -> int:
        return self.rank


def _theirs(sf: Any, root: Path, world: int, rank: int, shuffle: bool, max_len: int, epoch: int,
            monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    monkeypatch.setattr(sf.utils, "dist", _Dist(world, rank))
    ds = sf.pre.build_offline_eagle3_dataset(str(root), max_len=max_len)
    loader = sf.utils.prepare_dp_dataloaders(ds, 2, num_workers=0, shuffle=shuffle)
    loader.sampler.set_epoch(epoch)
    return list(loader)


def _assert_same(ours: dict, theirs: dict) -> None:
    assert set(ours) - set(RESERVED) == set(theirs)
    for k, v in theirs.items():
        if v is None:
            assert ours[k] is None, k
            continue
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, (k, ours[k].dtype, v.dtype, ours[k].shape,
                                                                        v.shape)
        assert torch.equal(ours[k], v), k


# ---------------------------------------------------------------- why SpecForge's collator failed
def test_specforge_collator_on_plain_items_and_wrapped(sf: Any, sf_dir: Path, tmp_path: Path) -> None:
    from torch_dataflow.pool import FeaturePool

    pool = FeaturePool.from_specforge(sf_dir, ledger=f"sqlite://{tmp_path}/l.db")
    plain = [pool[0], pool[1]]
    with pytest.raises(IndexError, match="tuple index out of range"):  # input_ids is [S]: .shape[1]
        sf.utils.DataCollatorWithPadding()(plain)
    sf_pool = build_offline_eagle3_dataset(sf_dir, 24, ledger=f"sqlite://{tmp_path}/l.db")
    items = [sf_pool[0], sf_pool[1]]
    batch = CarryLeases(sf.utils.DataCollatorWithPadding())(items)
    _assert_same(batch, sf.utils.DataCollatorWithPadding()([sf.pre.build_offline_eagle3_dataset(
        str(sf_dir), max_len=24)[i] for i in range(2)]))
    assert batch["__sample_id__"] == pool.sample_ids[:2] and "__lease__" not in batch  # read by index: no lease


# ---------------------------------------------------------------- identical batches, worlds 1-4
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_identical_to_specforge(sf: Any, sf_dir: Path, tmp_path: Path, world: int, shuffle: bool,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = f"sqlite://{tmp_path}/ledger.db"
    ds = build_offline_eagle3_dataset(sf_dir, max_len=24, ledger=ledger)
    assert len(ds) == len(sf.pre.build_offline_eagle3_dataset(str(sf_dir), max_len=24))
    for epoch in (0, 1):
        loaders = [prepare_dp_dataloaders(ds, 2, num_workers=0, shuffle=shuffle, num_replicas=world, rank=r)
                   for r in range(world)]
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
            assert len(loader) == loader.remaining()  # every rank sizes the epoch before any ack (as under DDP)
        ours = [list(loader) for loader in loaders]
        for r in range(world):
            theirs = _theirs(sf, sf_dir, world, r, shuffle, 24, epoch, monkeypatch)
            assert len(ours[r]) == len(theirs) == len(loaders[r])
            for a, b in zip(ours[r], theirs, strict=True):
                _assert_same(a, b)
        leases = [lid for rank in ours for b in rank for lid in b["__lease__"] if lid]
        assert len(leases) == len(set(leases))
        for b in (b for rank in ours for b in rank):
            assert ds.ack(b, step=epoch + 1) == []


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [12, 13, 15])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_indices_equal_distributed_samplers(world: int, n: int, drop_last: bool) -> None:
    from torch_dataflow.pool import FeaturePool
    from torch_dataflow.sampler import ReshardingSampler

    for shuffle in (False, True):
        name = f"sf-parity-{os.getpid()}-{world}-{n}-{drop_last}-{shuffle}"
        with FeatureWriter(f"memory://{name}", f"memory://{name}") as w:
            w.put_many([(f"s{i:03d}", {"x": torch.tensor(i)}) for i in range(n)])
        pool = FeaturePool(f"memory://{name}", f"memory://{name}")
        for epoch in (0, 1, 2):
            ours, theirs = [], []
            for r in range(world):
                s = ReshardingSampler(pool, world, r, shuffle=shuffle, seed=7, drop_last=drop_last)
                d = DistributedSampler(range(n), world, r, shuffle=shuffle, seed=7, drop_last=drop_last)
                s.set_epoch(epoch)
                d.set_epoch(epoch)
                assert len(s) == len(d)
                ours.append([int(i) for i in s])
                theirs.append(list(d))
            assert ours == theirs, (shuffle, epoch)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_shuffled_indices_equal_distributed_samplers_on_shared_ledgers(kind: str, tmp_path: Path,
                                                                      redis_uri: str) -> None:
    from torch_dataflow.pool import FeaturePool
    from torch_dataflow.sampler import ReshardingSampler

    store = f"file://{tmp_path}/f"
    ledger = f"sqlite://{tmp_path}/l.db" if kind == "sqlite" else f"{redis_uri}?namespace=sfpar{os.getpid()}"
    with FeatureWriter(store, ledger) as w:
        w.put_many([(f"s{i:03d}", {"x": torch.tensor(i)}) for i in range(15)])
    pool = FeaturePool(store, ledger)
    for world in (3, 4):
        for epoch in (0, 1):
            epoch += 10 * world  # a fresh epoch per world size
            samplers = [ReshardingSampler(pool, world, r, shuffle=True, seed=5) for r in range(world)]
            for s in samplers:
                s.set_epoch(epoch)
            ours = [[int(i) for i in s] for s in samplers]
            theirs = []
            for r in range(world):
                d = DistributedSampler(range(15), world, r, shuffle=True, seed=5)
                d.set_epoch(epoch)
                theirs.append(list(d))
            assert ours == theirs


# ---------------------------------------------------------------- len and resume arithmetic
def _specforge_loop(loader: Any, ds: Any, epochs: int, global_step: int, stop_after: int | None,
                    trained: list[str], use_seek: bool) -> int:
    """SpecForge's arithmetic: total = epochs * len(loader); skip the epoch's trained prefix."""
    steps = len(loader)
    start_epoch, skip = divmod(global_step, steps)
    for epoch in range(start_epoch, epochs):
        loader.sampler.set_epoch(epoch)
        if use_seek and epoch == start_epoch and skip:
            loader.seek(skip)
            skip = 0
        for i, batch in enumerate(loader):
            if epoch == start_epoch and i < skip:
                assert isinstance(batch, TrainedBatch)
                continue
            global_step += 1
            trained += [f"{epoch}:{s}" for s in batch["__sample_id__"]]
            assert ds.ack(batch, global_step, strict=True) == []
            if global_step == stop_after:
                return global_step
    return global_step


@pytest.mark.parametrize("use_seek", [False, True])
def test_resume_keeps_len_and_trains_each_sample_once(sf: Any, tmp_path: Path, use_seek: bool) -> None:
    write_specforge_directory(tmp_path / "hs", n=28, seq_lens=[4, 6], hidden=H)
    ledger = f"sqlite://{tmp_path}/ledger.db"
    trained: list[str] = []
    ds = build_offline_eagle3_dataset(tmp_path / "hs", 2048, ledger=ledger)
    loader = prepare_dp_dataloaders(ds, 4, num_workers=0, shuffle=True)
    step = _specforge_loop(loader, ds, 2, 0, 5, trained, use_seek)  # 20 samples of 28, then a crash
    assert step == 5
    ds = build_offline_eagle3_dataset(tmp_path / "hs", 2048, ledger=ledger)
    ds.reconcile(step)
    loader = prepare_dp_dataloaders(ds, 4, num_workers=0, shuffle=True)
    loader.sampler.set_epoch(0)
    assert (len(loader), loader.remaining()) == (7, 2)  # the whole epoch; what it still delivers
    assert _specforge_loop(loader, ds, 2, step, None, trained, use_seek) == 14
    assert Counter(trained) == Counter(f"{e}:{s}" for e in (0, 1) for s in ds.sample_ids)


def test_seek_must_match_the_ledger_and_placeholders_refuse_reads(sf: Any, tmp_path: Path) -> None:
    write_specforge_directory(tmp_path / "hs", n=8, seq_lens=4, hidden=H)
    ledger = f"sqlite://{tmp_path}/ledger.db"
    ds = build_offline_eagle3_dataset(tmp_path / "hs", ledger=ledger)
    loader = prepare_dp_dataloaders(ds, 2, num_workers=0)
    batch = next(iter(loader))
    ds.ack(batch, 1)
    ds = build_offline_eagle3_dataset(tmp_path / "hs", ledger=ledger)
    ds.reconcile(1)
    loader = prepare_dp_dataloaders(ds, 2, num_workers=0)
    loader.seek(2)
    with pytest.raises(ConfigError, match="seek.2. but the ledger has 1"):
        next(iter(loader))
    first = next(iter(loader))
    with pytest.raises(ConfigError, match="trained before the restart"):
        first["input_ids"]


def test_len_of_offline_dataset_and_feature_loader(tmp_path: Path) -> None:
    store, ledger = f"file://{tmp_path}/f", f"sqlite://{tmp_path}/l.db"
    with FeatureWriter(store, ledger) as w:
        w.put_many([(f"s{i:02d}", {"x": torch.tensor([i])}) for i in range(10)])
    ds = FeatureStoreDataset(store, ledger, mode="offline", shuffle=False)
    loader = FeatureLoader(ds, batch_size=4)
    assert (len(ds), len(loader), loader.remaining()) == (10, 3, 3)
    batch = next(iter(loader))
    ds.ack(batch, 1)
    ds2 = FeatureStoreDataset(store, ledger, mode="offline", shuffle=False)
    loader2 = FeatureLoader(ds2, batch_size=4)
    assert (len(ds2), ds2.remaining(), len(loader2), loader2.remaining()) == (10, 6, 3, 2)
    assert sorted(s for b in loader2 for s in b["__sample_id__"]) == [f"s{i:02d}" for i in range(4, 10)]
    two = FeatureStoreDataset(store, ledger, mode="offline", rank=0, world_size=2, batch_size=2)
    two.configure(drop_last=False)
    assert len(two) == 6  # ceil(10 / (2 x 2)) = 3 global steps, 2 samples each on this rank
    two.configure(drop_last=True)
    assert len(two) == 4
    with pytest.raises(TypeError, match="online"):
        len(FeatureStoreDataset(store, ledger, mode="online"))


# ---------------------------------------------------------------- what is not supported
def test_usp_is_refused(sf: Any, sf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="USP"):
        build_offline_eagle3_dataset(sf_dir, 2048, 1, True, ledger=f"sqlite://{tmp_path}/l.db")
    collate = sf.utils.DataCollatorWithPadding()
    collate.sp_degree = collate.ulysses_degree = 2  # what SpecForge's groups give under sp_ulysses_size=2
    ds = build_offline_eagle3_dataset(sf_dir, 2048, ledger=f"sqlite://{tmp_path}/l.db")
    with pytest.raises(ConfigError, match="sp_degree=2"):
        prepare_dp_dataloaders(ds, 2, collate_fn=collate)
    with pytest.raises(ConfigError, match="max_len"):
        build_offline_eagle3_dataset(sf_dir, 0, ledger=f"sqlite://{tmp_path}/l.db")
    check_no_usp(sf.utils.DataCollatorWithPadding())  # sp_degree 1: fine


# ---------------------------------------------------------------- layout (item 5)
def test_stores_import_neither_ledger_nor_eagle3() -> None:
    for path in sorted((ROOT / "torch_dataflow" / "stores").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = "." * node.level + (node.module or "")
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                bad = any(part in ("ledger", "eagle3", "producer", "binding") for part in name.split("."))
                assert not bad, f"{path.name} imports {name}"
                if "specforge" in name.split("."):  # only the moved-module re-export, resolved lazily
                    assert path.name == "specforge_dir.py" and node.col_offset > 0, f"{path.name} imports {name}"


def test_old_import_paths_still_work() -> None:
    import torch_dataflow.specforge.directory as directory
    import torch_dataflow.specforge.store as store
    from torch_dataflow.eagle3 import SpecForgeDirectory as Old
    from torch_dataflow.eagle3.specforge import import_directory
    from torch_dataflow.stores import open_store
    from torch_dataflow.stores.specforge_dir import SpecForgeDirStore, register_directory

    assert Old is directory.SpecForgeDirectory and import_directory is directory.import_directory
    assert SpecForgeDirStore is store.SpecForgeDirStore and register_directory is store.register_directory
    assert type(open_store("specforge:///tmp")) is store.SpecForgeDirStore


# ---------------------------------------------------------------- the drop-in scripts
def _code(path: Path) -> list[str]:
    text = path.read_text()
    doc = ast.get_docstring(ast.parse(text), clean=False)
    assert doc is not None
    body = text.split('"""', 2)[2]  # the module docstring may differ: it describes the script
    return body.splitlines()


def changed_lines(before: Path, after: Path) -> tuple[int, int]:
    """``(removed, added)`` code lines between two scripts (module docstrings aside)."""
    diff = list(difflib.unified_diff(_code(before), _code(after), lineterm="", n=0))
    removed = sum(1 for d in diff if d.startswith("-") and not d.startswith("---"))
    added = sum(1 for d in diff if d.startswith("+") and not d.startswith("+++"))
    return removed, added


def test_drop_in_diff_is_at_most_ten_lines_and_runs_identically(sf: Any, tmp_path: Path) -> None:
    before, after = ROOT / "examples/specforge_train_eagle3.py", ROOT / "examples/specforge_migrated_train_eagle3.py"
    removed, added = changed_lines(before, after)
    assert (removed, added) == (4, 4) and removed + added <= 10  # docs/specforge.md quotes these numbers
    stub = tmp_path / "stub" / "datasets"
    stub.mkdir(parents=True)
    # SpecForge imports one type name from Hugging Face datasets; and it reads files with
    # weights_only=False, which this stand-in (imported before SpecForge reads anything) forces to True.
    (stub / "__init__.py").write_text(
        "import torch\n_load = torch.load\n"
        "torch.load = lambda *a, **kw: _load(*a, **{**kw, 'weights_only': True})\n"
        "class Dataset:\n    pass\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub.parent), os.environ.get("PYTHONPATH", "")])}
    outputs = []
    for script in (before, after):
        work = tmp_path / script.stem
        out = ""
        for extra in (["--stop-after", "5"], []):  # a crash after step 5's checkpoint, then the resume
            run = subprocess.run([sys.executable, str(script), "--workdir", str(work), *extra], env=env,
                                 capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stderr[-3000:]
            out += run.stdout
        outputs.append(out)
    assert outputs[0] == outputs[1]  # every step's loss, across the restart
    assert "done: 16/16 steps" in outputs[1]
    led = open_ledger(f"sqlite://{tmp_path / after.stem}/hidden_states.db")
    for epoch in (0, 1):
        assert len(set(led.trained_steps(epoch))) == 16
