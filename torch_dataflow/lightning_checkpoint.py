"""Checkpoint I/O of :class:`torch_dataflow.lightning.FeatureAckCallback`: the wrapper
around the trainer's ``CheckpointIO`` that reports a written, resumable checkpoint's
step (so its samples may be freed), and the fsync it does first."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from lightning.pytorch.plugins.io import CheckpointIO

if TYPE_CHECKING:
    from .lightning import FeatureAckCallback

log = logging.getLogger("torch_dataflow.lightning")  # the callback's logger, as before the split


def _fsync(path: Any) -> None:
    """Flush a local checkpoint file and its directory to stable storage."""
    p = str(path)
    if "://" in p and not p.startswith("file://"):
        return  # object stores: the upload returning is their durability point
    p = p.removeprefix("file://")
    try:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(os.path.dirname(os.path.abspath(p)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:  # a directory fsync is not supported everywhere
        log.debug("fsync of %s failed: %s", p, e)


class _DurableCheckpointIO(CheckpointIO):
    """Delegates to the real IO; reports the checkpoint's step once it is written."""

    def __init__(self, inner: CheckpointIO, callback: FeatureAckCallback) -> None:
        super().__init__()
        self.inner = inner
        self.callback = callback

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        state = (checkpoint.get("callbacks") or {}).get(self.callback.state_key)
        if state is None:  # weights-only: training cannot resume from it
            return
        if self.callback.fsync:
            _fsync(path)
        if not self.callback._resumable(path):
            # With ``save_last`` the documented resume is ``last.ckpt``, written
            # after the step file: marking durable now would free samples that a
            # kill before ``last.ckpt`` leaves missing from the checkpoint resumed.
            return
        self.callback._written(int(state["step"]))

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.inner.load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()
