"""Online producers (issue 11 item 4): a padded capture batch becomes one trimmed sample per
sequence, equal to per-sample extraction, on CPU with a tiny Hugging Face Llama."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from torch_dataflow import FeatureWriter
from torch_dataflow.eagle3 import Eagle3Collator, Eagle3FeatureExtractor, synthetic_prompts
from torch_dataflow.errors import ConfigError
from torch_dataflow.specforge.capture import CaptureBatch, capture_hf, put_capture, split_capture

pytest.importorskip("transformers")

PAD = 0


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    from torch_dataflow.eagle3 import tiny_llama_target

    return tiny_llama_target(seed=0)


def _seqs(n: int = 6) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    seqs = synthetic_prompts(n, vocab=512, min_len=3, max_len=13, seed=1)
    g = torch.Generator().manual_seed(2)
    masks = [(torch.rand(len(s), generator=g) > 0.4).long() for s in seqs]
    return seqs, masks


def _pad(seqs: list[torch.Tensor], masks: list[torch.Tensor], side: str) -> tuple[torch.Tensor, ...]:
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), PAD, dtype=torch.long)
    att = torch.zeros_like(ids)
    loss = torch.zeros_like(ids)
    for row, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        sl = slice(0, len(s)) if side == "right" else slice(longest - len(s), longest)
        ids[row, sl], att[row, sl], loss[row, sl] = s, 1, m
    return ids, att, loss


@pytest.mark.parametrize("side", ["right", "left"])
def test_puts_equal_per_sample_extraction(model: torch.nn.Module, tmp_path: Any, side: str) -> None:
    seqs, masks = _seqs()
    batch = capture_hf(model, *_pad(seqs, masks, side))
    assert batch.hidden_states.shape[0] == len(seqs) and batch.attention_mask.sum() < batch.attention_mask.numel()
    store, ledger = f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db"
    ids = [f"row{i}" for i in range(len(seqs))]
    with FeatureWriter(store, ledger) as w:
        refs = put_capture(w, batch, ids, [{"row": i} for i in range(len(ids))])
        got = w.store.get_many(refs)
    assert [r.sample_id for r in refs] == ids and [r.metadata["row"] for r in refs] == list(range(len(ids)))
    # per-sample extraction: each sequence alone, no padding at all
    alone = Eagle3FeatureExtractor(model, batch_size=1, dtype=torch.float32, progress=False).extract(seqs, masks)
    for g, a, s, m in zip(got, alone, seqs, masks, strict=True):
        assert sorted(g) == sorted(a) == ["aux_hidden_state", "hidden_state", "input_ids", "loss_mask"]
        assert torch.equal(g["input_ids"], s) and torch.equal(g["loss_mask"], m)  # loss mask intact
        for k in ("hidden_state", "aux_hidden_state"):
            assert g[k].shape == a[k].shape == (1, len(s), a[k].shape[-1]) and g[k].dtype == torch.float32
            # fp32 sums in another order (a padded batch vs one row): CI's CPU differed by 1.7e-5 in one of
            # 1344 elements; padding that leaked into a row would differ by orders of magnitude more
            torch.testing.assert_close(g[k], a[k], rtol=1e-4, atol=1e-4)
    # and the training batches built from them are SpecForge's, as from per-sample files
    collate = Eagle3Collator(max_len=2048)
    left, right = collate(got), collate(alone)
    assert sorted(left) == sorted(right)
    for k in left:
        if left[k].is_floating_point():
            torch.testing.assert_close(left[k], right[k], rtol=1e-4, atol=1e-4)
        else:
            assert torch.equal(left[k], right[k]), k


def test_bf16_cast_matches_per_sample_bf16(model: torch.nn.Module) -> None:
    seqs, masks = _seqs(4)
    got = split_capture(capture_hf(model, *_pad(seqs, masks, "right")), dtype=torch.bfloat16)
    alone = Eagle3FeatureExtractor(model, batch_size=1, progress=False).extract(seqs, masks)  # bf16 by default
    for g, a in zip(got, alone, strict=True):
        assert g["hidden_state"].dtype == a["hidden_state"].dtype == torch.bfloat16
        torch.testing.assert_close(g["aux_hidden_state"].float(), a["aux_hidden_state"].float(), rtol=2e-2, atol=2e-2)


def _batch(att: torch.Tensor, loss: torch.Tensor) -> CaptureBatch:
    b, s = att.shape
    return CaptureBatch(input_ids=torch.ones(b, s, dtype=torch.long), attention_mask=att, loss_mask=loss,
                        hidden_states=torch.zeros(b, s, 6), last_hidden_states=torch.zeros(b, s, 2))


def test_bad_batches_are_refused(tmp_path: Any) -> None:
    ok = torch.tensor([[1, 1, 0]])
    with pytest.raises(ConfigError, match="holes"):
        split_capture(_batch(torch.tensor([[1, 0, 1]]), torch.zeros(1, 3, dtype=torch.long)))
    with pytest.raises(ConfigError, match="loss on padding"):
        split_capture(_batch(ok, torch.tensor([[0, 1, 1]])))
    with pytest.raises(ConfigError, match="no tokens"):
        split_capture(_batch(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)))
    with pytest.raises(ConfigError, match="only 0 and 1"):
        split_capture(_batch(torch.tensor([[2, 1, 0]]), torch.zeros(1, 3, dtype=torch.long)))
    with pytest.raises(ConfigError, match="no tensor 'last_hidden_states'"):
        split_capture({"input_ids": ok, "attention_mask": ok, "loss_mask": ok, "hidden_states": torch.zeros(1, 3, 2)})
    bad = CaptureBatch(ok, ok, ok, torch.zeros(1, 4, 6), torch.zeros(1, 3, 2))
    with pytest.raises(ConfigError, match=r"hidden_states must be \[B, S, hidden\]"):
        split_capture(bad)
    with FeatureWriter(f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db") as w:
        with pytest.raises(ConfigError, match="2 sample ids for a capture batch of 1 rows"):
            put_capture(w, _batch(ok, torch.zeros(1, 3, dtype=torch.long)), ["a", "b"])
        assert w.ledger.counts().committed == 0 and w.store.keys() == []  # nothing reserved or written
