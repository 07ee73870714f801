"""IterDataPipe / torchdata.nodes faces, and resume under StatefulDataLoader and
the nodes Loader: one resume check reused across resume points x num_workers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _procs import sample
from torch.utils.data import DataLoader
from torchdata.nodes import Loader
from torchdata.stateful_dataloader import StatefulDataLoader

from torch_dataflow import FeatureStoreDataset, FeatureWriter
from torch_dataflow.nodes import FeatureDataPipe, FeatureNode, feature_nodes

N, B, EPOCH = 22, 2, 1


@pytest.fixture
def uris(tmp_path: Path) -> tuple[str, str]:
    store, ledger = f"file://{tmp_path}/store", f"sqlite://{tmp_path}/ledger.db"
    with FeatureWriter(store, ledger) as w:
        for i in range(N):
            w.put(f"s{i:05d}", sample(i, 4))
    return store, ledger


def _stateful(ds: FeatureStoreDataset, nw: int) -> Any:
    return StatefulDataLoader(ds, batch_size=B, num_workers=nw)


class _PipeLoader(DataLoader):
    """A plain DataLoader over the DataPipe, with the pipe's get_state / reset as its state."""

    def __init__(self, pipe: FeatureDataPipe, **kwargs: Any) -> None:
        super().__init__(pipe, **kwargs)
        self.pipe = pipe  # DataLoader keeps a serialization wrapper as .dataset

    def state_dict(self) -> dict[str, Any]:
        return self.pipe.get_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pipe.reset(state)


def _pipe(ds: FeatureStoreDataset, nw: int) -> Any:
    return _PipeLoader(FeatureDataPipe(ds), batch_size=B, num_workers=nw)


def _nodes(ds: FeatureStoreDataset, nw: int) -> Any:
    return Loader(feature_nodes(ds, B, num_workers=nw))


LOADERS: dict[str, Callable[[FeatureStoreDataset, int], Any]] = {
    "stateful_dataloader": _stateful, "datapipe": _pipe, "nodes.Loader": _nodes}


def _close(loader: Any, it: Any) -> None:
    """Stop the old loader's workers / threads, as a crash would: nothing of it leases after the restart."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    todo = [getattr(loader, "root", None)]
    while todo:  # the nodes graph: each node's iterator (_it) and its source
        node = todo.pop()
        if node is None:
            continue
        if hasattr(node, "_shutdown"):
            node._shutdown()
        todo += [getattr(node, "_it", None), getattr(node, "source", None)]


def check_resume(uris: tuple[str, str], make: Callable[[FeatureStoreDataset, int], Any], nw: int, at: int) -> None:
    """Ack ``at`` batches, snapshot, take 2 more without acking and "crash";
    restart (reconcile at the last acked step) with a *fresh* dataset and the
    snapshot. Every sample is acked exactly once, the 4 unacked ones come back,
    and the epoch in the snapshot (not the fresh dataset's 0) is the one read."""
    ds = FeatureStoreDataset(*uris, mode="offline", batch_size=B, seed=1)
    ds.set_epoch(EPOCH)
    loader = make(ds, nw)
    it = iter(loader)
    acked: list[str] = []
    for step in range(1, at + 1):
        batch = next(it)
        assert ds.ack(batch, step) == []
        acked += batch["__sample_id__"]
    state = loader.state_dict()
    lost = [sid for _ in range(2) for sid in next(it)["__sample_id__"]]
    _close(loader, it)
    del it, loader

    fresh = FeatureStoreDataset(*uris, mode="offline", batch_size=B, seed=1)  # epoch 0 unless the state says 1
    fresh.reconcile(at)
    loader = make(fresh, nw)
    loader.load_state_dict(state)
    again: list[str] = []
    for step, batch in enumerate(loader, at + 1):
        assert fresh.ack(batch, step) == []
        again += batch["__sample_id__"]
    assert not set(acked) & set(again), "an acked sample was delivered again"
    assert sorted(acked + again) == [f"s{i:05d}" for i in range(N)], "a sample was skipped or duplicated"
    assert set(lost) <= set(again)
    e0, e1 = fresh.ledger.counts(epoch=0), fresh.ledger.counts(epoch=EPOCH)
    assert e0.trained + e0.durable + e0.leased == 0 and e1.trained + e1.durable == N


@pytest.mark.parametrize("nw", [0, 2])
@pytest.mark.parametrize("at", [1, 4, 8])
@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_resume_never_redelivers_acked_nor_skips_unacked(uris: tuple[str, str], kind: str, at: int, nw: int) -> None:
    check_resume(uris, LOADERS[kind], nw, at)


@pytest.mark.parametrize("nw", [0, 2])
def test_datapipe_in_a_plain_dataloader_delivers_each_sample_once(uris: tuple[str, str], nw: int) -> None:
    ds = FeatureStoreDataset(*uris, batch_size=3)
    seen = []
    for step, batch in enumerate(DataLoader(FeatureDataPipe(ds), batch_size=3, num_workers=nw), 1):
        ds.ack(batch, step)
        seen += batch["__sample_id__"]
    assert sorted(seen) == [f"s{i:05d}" for i in range(N)]


def test_node_state_is_epoch_and_counter_only(uris: tuple[str, str]) -> None:
    node = FeatureNode(FeatureStoreDataset(*uris, mode="offline"))
    node.reset()
    first = [node.next()["__sample_id__"] for _ in range(3)]
    assert node.get_state() == {"version": 1, "dataset": {"epoch": 0}, "yielded": 3}
    node.reset({"version": 1, "dataset": {"epoch": 0}, "yielded": 3})
    # Not acked and still leased: a fresh pass does not hand them out twice.
    rest = [s["__sample_id__"] for s in node]
    assert not set(first) & set(rest) and len(first) + len(rest) == N and node.get_state()["yielded"] == 3 + len(rest)
    with pytest.raises(TypeError):
        FeatureNode([1, 2])  # type: ignore[arg-type]
