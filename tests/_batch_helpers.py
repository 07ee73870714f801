"""Samples, cases and checks shared by the batch-direct read tests of every store
(tests/test_batch_read.py for memory and file, tests/test_mooncake_batch.py for Mooncake)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from torch_dataflow import CorruptSample
from torch_dataflow.batch_read import BufferPool, read_batch
from torch_dataflow.eagle3 import Eagle3Collator
from torch_dataflow.stores.base import FeatureStore


def _sample(s: int, h: int, seed: int, *, batch_dim: bool = True, dtype: torch.dtype = torch.bfloat16,
            extra: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(s, h, generator=g).to(dtype)
    aux = torch.randn(s, 3 * h, generator=g).to(dtype)
    out = {
        "input_ids": torch.randint(0, 32000, (s,), generator=g),
        "loss_mask": torch.randint(0, 2, (s,), generator=g),
        "hidden_state": hs[None] if batch_dim else hs,
        "aux_hidden_state": aux[None] if batch_dim else aux,
    }
    if batch_dim:
        out["input_ids"] = out["input_ids"][None]
    if extra:
        out["extra_scores"] = torch.randn(s, generator=g)  # ignored by the collator, still checksummed
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].stride() == b[k].stride(), k
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


CASES = [
    # (lengths, h, collator kwargs, sample kwargs)
    ([7, 3], 4, {}, {}),
    ([5, 9, 1], 8, {"max_len": 4}, {}),  # truncation: tails land in scratch, still checksummed
    ([6, 6], 2, {"with_position_ids": True, "pad_to_multiple_of": 4}, {}),
    ([3, 8], 4, {"max_len": None}, {"batch_dim": False, "dtype": torch.float32}),
    ([2, 5], 4, {"max_len": 3, "with_position_ids": True}, {"extra": True}),
]


def check_direct_batch(store: FeatureStore, case: int) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]], Any]:
    """Put case ``case``'s samples and check the direct batch against the per-sample path
    (read into a dirty reused buffer: padding must still be zeros). Returns the direct
    batch, the samples and the collator, for checks of the caller's own."""
    lengths, h, ckw, skw = CASES[case]
    collate = Eagle3Collator(**ckw)
    samples = [_sample(s, h, i, **skw) for i, s in enumerate(lengths)]
    refs = [store.put(f"s{i}", 1, t) for i, t in enumerate(samples)]
    dirty = BufferPool(max_buffers=1)
    junk = dirty.take(64 << 20)
    junk.fill_(0xAB)  # a reused buffer full of old bytes: padding must still be zeros
    del junk
    direct = read_batch(store, refs, collate, buffers=dirty)
    assert direct is not None
    _same(direct, collate([store.get(r) for r in refs]))
    _same(direct, collate(samples))
    return direct, samples, collate


def check_corrupt_middle_sample(store: FeatureStore, how: str) -> list[Any]:
    """Put three samples, damage the second's stored bytes (``how``: flip, flip_header,
    truncate, other_blob) and check the batch path and the per-sample path both raise
    :class:`CorruptSample`, the batch path naming row 1. Returns the refs."""
    refs = [store.put(f"s{i}", 1, _sample(5, 4, i)) for i in range(3)]
    blob = bytearray(store._read("s1", 1))
    if how == "flip":
        blob[-7] ^= 0x10
    elif how == "flip_header":
        blob[20] ^= 0x01
    elif how == "truncate":
        blob = blob[:-3]
    else:
        blob = bytearray(store._read("s2", 1))
    rot(store, "s1", 1, bytes(blob))
    seen: list[int] = []
    with pytest.raises(CorruptSample):
        read_batch(store, refs, Eagle3Collator(), on_unreadable=lambda i, e: seen.append(i))
    assert seen == [1]
    with pytest.raises(CorruptSample):
        store.get(refs[1])  # the per-sample path agrees
    return refs


def rot(store: Any, sample_id: str, generation: int, blob: bytes | bytearray) -> None:
    """Replace a stored blob's bytes in place (bit rot, a foreign blob) under its committed ref:
    a file:// put never replaces a file, so the file is rewritten directly."""
    from torch_dataflow.stores.shared_dir import SharedDirStore

    if isinstance(store, SharedDirStore):
        with open(store.path_of(sample_id, generation), "wb") as f:
            f.write(bytes(blob))
    else:
        store._write(sample_id, generation, [bytes(blob)], len(blob))
