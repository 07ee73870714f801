"""EAGLE3: SpecForge-exact batches, SpecForge directories, the tiny target and draft."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from torch_dataflow.errors import ConfigError, CorruptSample
from torch_dataflow.refs import validate_sample_id

eagle3 = pytest.importorskip("torch_dataflow.eagle3")
from torch_dataflow.eagle3 import (  # noqa: E402
    BATCH_KEYS,
    Eagle3Collator,
    Eagle3Draft,
    Eagle3FeatureExtractor,
    SpecForgeDirectory,
    default_aux_layers,
    eagle3_collate,
    synthetic_prompts,
    tiny_llama_target,
    write_specforge_directory,
)

H = 16


# ---------------------------------------------------------------------------
# A reference of SpecForge's documented offline pipeline, written from its
# facts (specforge/data/preprocessing.py: list_local_files, OfflineEagle3Dataset
# .process_data; specforge/data/utils.py: DataCollatorWithPadding with
# sp_degree == 1), independently of torch_dataflow.eagle3.collate.
# ---------------------------------------------------------------------------
def ref_list_files(root: str) -> list[str]:
    paths = []
    for dirpath, _, files in os.walk(root):
        paths += [os.path.join(dirpath, f) for f in files]
    return sorted(p for p in paths if p.endswith(".ckpt") or p.endswith(".ckpt.gz"))


def ref_load(path: str) -> dict:
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            import io

            return torch.load(io.BytesIO(f.read()), weights_only=True)
    return torch.load(path, weights_only=True, mmap=True)


def ref_process(data: dict, max_len: int) -> dict:
    loss_mask = data["loss_mask"][:max_len][None, :].clone()
    loss_mask[0, -1] = 0  # after truncation
    return {
        "attention_mask": torch.ones_like(loss_mask, dtype=torch.long),
        "loss_mask": loss_mask,
        "target": data["hidden_state"].squeeze(0)[:max_len][None, :],
        "hidden_state": data["aux_hidden_state"].squeeze(0)[:max_len][None, :],
        "input_ids": data["input_ids"][:max_len][None, :],
    }


def ref_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[1] = n - shape[1]
    return torch.cat([t, torch.zeros(shape, dtype=t.dtype)], dim=1)


def ref_collate(items: list[dict]) -> dict:
    n = max(x["input_ids"].shape[1] for x in items)
    return {
        "input_ids": torch.cat([ref_pad(x["input_ids"], n) for x in items]),
        "attention_mask": torch.cat([ref_pad(x["attention_mask"], n) for x in items]),
        "loss_mask": torch.cat([ref_pad(x["loss_mask"], n) for x in items]),
        "hidden_state": torch.cat([ref_pad(x["hidden_state"], n) for x in items]),
        "target": torch.cat([ref_pad(x["target"], n) for x in items]),
    }


def _specforge() -> tuple | None:
    """SpecForge 0.2.0's own (OfflineEagle3Dataset, DataCollatorWithPadding, list_local_files), if importable
    (its ``datasets`` import is a type name only: a one-class stand-in is enough); else ``None``."""
    import sys
    import types

    if "datasets" not in sys.modules:
        try:
            import datasets  # noqa: F401
        except ImportError:
            sys.modules["datasets"] = types.SimpleNamespace(Dataset=object)  # type: ignore[assignment]
    try:
        from specforge.data.preprocessing import OfflineEagle3Dataset, list_local_files
        from specforge.data.utils import DataCollatorWithPadding
    except ImportError:
        return None
    return OfflineEagle3Dataset, DataCollatorWithPadding, list_local_files


def ref_batches(root: str, batch_size: int, max_len: int) -> list[dict]:
    """SpecForge's batches: from the installed package (issue 11), else from the reference above."""
    sf = _specforge()
    if sf is not None:
        dataset_cls, collator_cls, list_files = sf
        from unittest import mock

        real = torch.load
        ds = dataset_cls(list_files(root), max_len=max_len)
        # SpecForge reads with weights_only=False; never here (no unpickling of file bytes).
        with mock.patch.object(torch, "load", lambda *a, **kw: real(*a, **{**kw, "weights_only": True})):
            return list(DataLoader(ds, batch_size=batch_size, drop_last=True, collate_fn=collator_cls()))
    items = [ref_process(ref_load(p), max_len) for p in ref_list_files(root)]
    return [ref_collate(items[i : i + batch_size]) for i in range(0, len(items) - batch_size + 1, batch_size)]


def assert_batches_equal(ours: dict, ref: dict) -> None:
    tensors = {k: v for k, v in ours.items() if not k.startswith("__")}
    assert set(tensors) == set(ref)
    for key in ref:
        assert tensors[key].dtype == ref[key].dtype, key
        assert tensors[key].shape == ref[key].shape, key
        assert torch.equal(tensors[key], ref[key]), key


@pytest.fixture(scope="module")
def sf_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("specforge")
    # 12 samples in groups of 5: three rows_* folders and data_10 sorting before data_2.
    write_specforge_directory(root, n=12, seq_lens=[5, 9, 3, 12, 7], hidden=H, seed=1, group=5)
    return str(root)


# (1) equivalence with SpecForge's dataset + padding collator ------------------
@pytest.mark.parametrize("max_len", [2048, 8, 1])
def test_reader_and_collator_match_specforge(sf_dir: str, max_len: int) -> None:
    ds = SpecForgeDirectory(sf_dir)
    assert [str(p) for p in ds.paths] == ref_list_files(sf_dir)
    loader = DataLoader(ds, batch_size=4, drop_last=True, collate_fn=Eagle3Collator(max_len=max_len))
    ours = list(loader)
    ref = ref_batches(sf_dir, 4, max_len)
    assert len(ours) == len(ref) == 3
    for a, b in zip(ours, ref, strict=True):
        assert_batches_equal(a, b)
        assert a["hidden_state"].dtype == torch.bfloat16 and a["loss_mask"].dtype == torch.int64


def test_order_and_sample_ids(sf_dir: str) -> None:
    ds = SpecForgeDirectory(sf_dir)
    rel = [ds.relative_path(i) for i in range(len(ds))]
    assert rel[:3] == ["rows_0-5/data_0.ckpt", "rows_0-5/data_1.ckpt", "rows_0-5/data_2.ckpt"]
    assert rel.index("rows_10-15/data_10.ckpt") < rel.index("rows_5-10/data_5.ckpt")  # lexicographic
    ids = [ds.sample_id(i) for i in range(len(ds))]
    assert ids[0] == "rows_0-5~data_0.ckpt"
    assert len(set(ids)) == len(ids) and all(validate_sample_id(s) == s for s in ids)


def test_function_form_position_ids_and_reserved_keys(sf_dir: str) -> None:
    ds = SpecForgeDirectory(sf_dir, include_sample_id=True)
    samples = [dict(ds[i], __lease__=f"lease-{i}") for i in (3, 0, 2)]
    before = [s["loss_mask"].clone() for s in samples]
    batch = eagle3_collate(samples, max_len=10, with_position_ids=True)
    assert batch["__lease__"] == ["lease-3", "lease-0", "lease-2"]
    assert batch["__sample_id__"] == [ds.sample_id(i) for i in (3, 0, 2)]
    assert list(batch)[:5] == list(BATCH_KEYS)
    assert batch["position_ids"].tolist() == [list(range(10)), list(range(5)) + [0] * 5, list(range(3)) + [0] * 7]
    assert batch["position_ids"].dtype == torch.int64
    assert all(torch.equal(s["loss_mask"], b) for s, b in zip(samples, before, strict=True))  # inputs untouched
    assert batch["attention_mask"].sum(1).tolist() == [10, 5, 3]


def test_pad_to_multiple_of(sf_dir: str) -> None:
    ds = SpecForgeDirectory(sf_dir)
    batch = Eagle3Collator(pad_to_multiple_of=8)([ds[0], ds[2]])  # lengths 5 and 3
    assert batch["input_ids"].shape == (2, 8) and batch["hidden_state"].shape == (2, 8, 3 * H)


# (2) gz, [S, .] and batch-padded variants ------------------------------------
def test_gz_and_unbatched_variants_give_the_same_batches(tmp_path: Path, sf_dir: str) -> None:
    gz, flat = tmp_path / "gz", tmp_path / "flat"
    write_specforge_directory(gz, n=12, seq_lens=[5, 9, 3, 12, 7], hidden=H, seed=1, group=5, compress=True)
    write_specforge_directory(flat, n=12, seq_lens=[5, 9, 3, 12, 7], hidden=H, seed=1, group=5, batch_dim=False)
    assert SpecForgeDirectory(flat)[0]["hidden_state"].shape == (5, H)
    assert SpecForgeDirectory(gz).relative_path(0) == "rows_0-5/data_0.ckpt.gz"
    collate = Eagle3Collator(max_len=8)
    for variant in (gz, flat):
        ours = list(DataLoader(SpecForgeDirectory(variant), batch_size=4, collate_fn=collate))
        base = list(DataLoader(SpecForgeDirectory(sf_dir), batch_size=4, collate_fn=collate))
        for a, b in zip(ours, base, strict=True):
            assert_batches_equal(a, b)
    for a, b in zip(
        list(DataLoader(SpecForgeDirectory(gz), batch_size=4, collate_fn=collate)),
        ref_batches(str(gz), 4, 8),
        strict=True,
    ):
        assert_batches_equal(a, b)


def test_reader_is_copy_on_write_and_works_in_workers(tmp_path: Path) -> None:
    write_specforge_directory(tmp_path, n=4, seq_lens=[4, 6], hidden=H)
    item = SpecForgeDirectory(tmp_path)[0]
    before = item["input_ids"].clone()
    item["input_ids"][:] = 7  # a memory-mapped tensor, privately mapped
    assert torch.equal(SpecForgeDirectory(tmp_path)[0]["input_ids"], before)
    loader = DataLoader(
        SpecForgeDirectory(tmp_path, include_sample_id=True),
        batch_size=2,
        num_workers=2,
        collate_fn=Eagle3Collator(max_len=5),
    )
    batches = list(loader)
    assert [b["input_ids"].shape for b in batches] == [(2, 5), (2, 5)]
    assert [sid for b in batches for sid in b["__sample_id__"]] == [f"rows_0-2000~data_{i}.ckpt" for i in range(4)]


def test_gz_is_decompressed_per_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_specforge_directory(tmp_path, n=4, seq_lens=4, hidden=H, compress=True)
    opened: list[str] = []
    real_open = gzip.open
    monkeypatch.setattr(gzip, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    ds = SpecForgeDirectory(tmp_path)
    assert opened == []
    ds[2]
    assert opened == [str(ds.paths[2])]


def test_batch_padded_files(tmp_path: Path) -> None:
    write_specforge_directory(tmp_path, n=3, seq_lens=[4, 6, 2], hidden=H, pad_to=8)
    raw = SpecForgeDirectory(tmp_path)
    assert [raw[i]["input_ids"].shape[0] for i in range(3)] == [8, 8, 8]
    # Default: kept as SpecForge trains on them.
    assert_batches_equal(Eagle3Collator()([raw[i] for i in range(3)]), ref_batches(str(tmp_path), 3, 2048)[0])
    trimmed = SpecForgeDirectory(tmp_path, trim_padding=True)
    for i, n in enumerate([4, 6, 2]):
        t, r = trimmed[i], raw[i]
        assert t["input_ids"].shape == (n,) and t["hidden_state"].shape == (1, n, H)
        assert t["aux_hidden_state"].shape == (1, n, 3 * H)
        assert torch.equal(t["aux_hidden_state"], r["aux_hidden_state"][:, :n])


# (3) the producer's extractor ------------------------------------------------
@pytest.fixture(scope="module")
def target():
    pytest.importorskip("transformers")
    return tiny_llama_target(seed=0)


def test_default_aux_layers_rule() -> None:
    assert default_aux_layers(8) == (1, 3, 4)
    assert default_aux_layers(32) == (1, 15, 28)  # Llama-3-8B: SpecForge captures layers 1, 15, 28


def test_extractor_shapes_and_documented_layers(target) -> None:
    ex = Eagle3FeatureExtractor(target, batch_size=3, progress=False)
    assert ex.aux_layers == (1, 3, 4) and ex.hidden_state_indices == (2, 4, 5)
    prompts = synthetic_prompts(5, vocab=512, min_len=3, max_len=12, seed=0)
    masks = [torch.randint(0, 2, (len(p),)) for p in prompts]
    feats = ex.extract(prompts, masks)
    for p, m, f in zip(prompts, masks, feats, strict=True):
        s = len(p)
        assert f["input_ids"].dtype == torch.int64 and torch.equal(f["input_ids"], p)
        assert torch.equal(f["loss_mask"], m)
        assert f["hidden_state"].shape == (1, s, 64) and f["aux_hidden_state"].shape == (1, s, 192)
        assert f["hidden_state"].dtype == f["aux_hidden_state"].dtype == torch.bfloat16
        # Unpadded single-sample reference; decoder-layer outputs caught by hooks.
        caught: list[torch.Tensor] = []

        def catch(_m, _i, o, caught=caught):
            caught.append(o[0] if isinstance(o, tuple) else o)

        hooks = [layer.register_forward_hook(catch) for layer in target.model.layers]
        try:
            with torch.no_grad():
                out = target(input_ids=p[None], output_hidden_states=True)
        finally:
            for h in hooks:
                h.remove()
        want_aux = torch.cat([out.hidden_states[2], out.hidden_states[4], out.hidden_states[5]], -1)
        assert torch.allclose(torch.cat([caught[1], caught[3], caught[4]], -1), want_aux)
        torch.testing.assert_close(f["aux_hidden_state"].float(), want_aux, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(f["hidden_state"].float(), out.hidden_states[-1], atol=2e-2, rtol=1e-2)
        logits = torch.nn.functional.linear(out.hidden_states[-1], ex.lm_head_weight())
        torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)
    batch = eagle3_collate(feats)
    assert batch["hidden_state"].shape == (5, max(map(len, prompts)), 192)


def test_extractor_rejects_bad_layers(target) -> None:
    with pytest.raises(ConfigError, match="aux_layers"):
        Eagle3FeatureExtractor(target, aux_layers=[1, 3, 7])
    with pytest.raises(ConfigError, match="aux_layers"):
        Eagle3FeatureExtractor(target, aux_layers=[1, 3])
    ex = Eagle3FeatureExtractor(target, progress=False)
    with pytest.raises(ConfigError, match="loss mask length"):
        ex.extract([torch.tensor([1, 2, 3])], [torch.tensor([1, 1])])


# (4) a draft learns ------------------------------------------------------------
@pytest.fixture(scope="module")
def features(target):
    ex = Eagle3FeatureExtractor(target, batch_size=16, progress=False)
    return ex, ex.extract(synthetic_prompts(96, vocab=512, min_len=16, max_len=48, seed=0))


def test_draft_loss_goes_down(features) -> None:
    ex, feats = features
    torch.manual_seed(0)
    draft = Eagle3Draft(
        hidden_size=64, vocab_size=512, lm_head_weight=ex.lm_head_weight(), embed_weight=ex.embed_weight()
    )
    collate = Eagle3Collator(max_len=64)
    held_out = collate(feats[:32])
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    with torch.no_grad():
        start = draft(held_out)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(32, len(feats), (8,), generator=gen).tolist()
        loss = draft(collate([feats[i] for i in idx])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = draft(held_out)
    assert end.loss < start.loss - 0.05, (float(start.loss), float(end.loss))
    assert all(e < s for e, s in zip(end.step_losses, start.step_losses, strict=True))
    assert end.step_accuracies[0] > start.step_accuracies[0]


def test_lightning_module_trains(features) -> None:
    lightning = pytest.importorskip("lightning")
    ex, feats = features
    module = eagle3.Eagle3DraftModule(hidden_size=64, vocab_size=512, lm_head_weight=ex.lm_head_weight(), ttt_steps=1)
    samples = [dict(f, __sample_id__=f"s{i}") for i, f in enumerate(feats[:32])]
    loader = DataLoader(samples, batch_size=8, collate_fn=Eagle3Collator(max_len=32))
    trainer = lightning.Trainer(
        max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, loader)
    assert trainer.global_step == 6 and torch.isfinite(trainer.callback_metrics["train_loss"])


# (5) bad input ----------------------------------------------------------------
def _sample(s: int = 4, h: int = H, dtype: torch.dtype = torch.bfloat16) -> dict:
    return {
        "input_ids": torch.arange(s),
        "loss_mask": torch.ones(s, dtype=torch.long),
        "hidden_state": torch.zeros(1, s, h, dtype=dtype),
        "aux_hidden_state": torch.zeros(1, s, 3 * h, dtype=dtype),
    }


@pytest.mark.parametrize(
    ("samples", "match"),
    [
        ([], "empty batch"),
        ([{k: v for k, v in _sample().items() if k != "aux_hidden_state"}], "missing"),
        (
            [{"input_ids": torch.arange(3), "loss_mask": torch.ones(3), "target": torch.zeros(1, 3, H)}],
            "already-collated",
        ),
        ([_sample(), _sample(h=8)], "mismatched hidden size"),
        ([dict(_sample(), aux_hidden_state=torch.zeros(1, 4, 2 * H))], "not 3 x"),
        ([dict(_sample(), hidden_state=torch.zeros(1, 5, H))], "lengths disagree"),
        ([dict(_sample(), hidden_state=torch.zeros(2, 4, H))], "whole batch"),
        ([dict(_sample(), input_ids=[1, 2, 3, 4])], "torch.Tensor"),
        ([_sample(), _sample(dtype=torch.float32)], "dtype"),
        ([_sample(s=0)], "no tokens"),
        (["not a dict"], "mapping"),
        ([dict(_sample(), __lease__="a"), _sample()], "reserved key"),
    ],
)
def test_collator_errors(samples: list, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        eagle3_collate(samples)


def test_collator_config_errors() -> None:
    with pytest.raises(ConfigError):
        Eagle3Collator(max_len=0)
    with pytest.raises(ConfigError):
        Eagle3Collator(pad_to_multiple_of=0)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_reader_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        SpecForgeDirectory(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no .ckpt"):
        SpecForgeDirectory(tmp_path)
    rows = tmp_path / "rows_0-2000"
    rows.mkdir()
    torch.save({"input_ids": torch.arange(3), "x": _Evil()}, rows / "data_0.ckpt")
    (rows / "data_1.ckpt").write_bytes(b"not a torch file")
    with gzip.open(rows / "data_2.ckpt.gz", "wb") as f:
        f.write(pickle.dumps({"input_ids": _Evil()}))
    torch.save([torch.arange(3)], rows / "data_3.ckpt")
    torch.save({"hidden_state": torch.zeros(2, 3, H)}, rows / "data_4.ckpt")
    ds = SpecForgeDirectory(tmp_path)
    assert len(ds) == 5
    for i in range(3):
        with pytest.raises(CorruptSample):
            ds[i]
    with pytest.raises(ConfigError, match="dict of tensors"):
        ds[3]
    with pytest.raises(ConfigError, match="a batch"):
        ds[4]
    with pytest.raises(IndexError):
        ds[5]


def test_draft_errors() -> None:
    with pytest.raises(ConfigError, match="lm_head_weight"):
        Eagle3Draft(hidden_size=8, vocab_size=16, lm_head_weight=torch.zeros(16, 4))
    draft = Eagle3Draft(hidden_size=H, vocab_size=32, lm_head_weight=torch.zeros(32, H))
    batch = eagle3_collate([_sample(h=8)])
    with pytest.raises(ConfigError, match="width"):
        draft(batch)
    with pytest.raises(ConfigError, match="missing"):
        draft({"input_ids": batch["input_ids"]})


# import into a store + ledger (needs the producer) -----------------------------
def test_import_directory(tmp_path: Path) -> None:
    pytest.importorskip("torch_dataflow.producer", reason="torch_dataflow.producer not built yet")
    from torch_dataflow.ledger import open_ledger
    from torch_dataflow.stores import open_store

    src = tmp_path / "src"
    write_specforge_directory(src, n=5, seq_lens=[3, 6], hidden=H, group=2, compress=True)
    store_uri, ledger_uri = f"file://{tmp_path / 'store'}", f"sqlite://{tmp_path / 'ledger.db'}"
    assert eagle3.import_directory(src, store_uri, ledger_uri, progress=False) == 5
    ds, store, ledger = SpecForgeDirectory(src), open_store(store_uri), open_ledger(ledger_uri)
    assert ledger.is_closed() and ledger.counts(epoch=None).pending == 5
    for i in range(len(ds)):
        ref = ledger.get_ref(ds.sample_id(i))
        assert ref is not None and ref.metadata["source"] == ds.relative_path(i)
        got, want = store.get(ref), ds[i]
        assert set(got) == set(want) and all(
            torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want
        )
    # Imported samples collate exactly like the directory's.
    assert_batches_equal(eagle3_collate([store.get(ledger.get_ref(ds.sample_id(i))) for i in range(4)]),
                         ref_batches(str(src), 4, 2048)[0])  # fmt: skip
