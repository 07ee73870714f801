"""Checkpoint-true durability: which bytes a resume may still need.

The ledger remembers the steps of recent durable marks (one per checkpoint
written, :meth:`~torch_dataflow.ledger.base.Ledger.mark_durable`). A mark at
step ``N`` makes everything trained at or before ``N`` DURABLE, but frees (with
``retain=True``, the default) only what was trained at or before the
**previous** mark: a resume from the previous checkpoint — the one a
``last.ckpt`` still points at when a crash hit between two checkpoint files,
or any older file the user keeps — replays exactly what that checkpoint lacks,
from bytes that are still there.

:meth:`~torch_dataflow.ledger.base.Ledger.reconcile` ``(R)`` therefore turns
DURABLE deliveries trained after ``R`` back to PENDING (they are not in the
checkpoint being resumed), and refuses with
:class:`~torch_dataflow.errors.CheckpointTooOld` — changing nothing — when any
of them lost its bytes: the resume starts from a checkpoint older than the
retention kept. ``retain=False`` frees up to the mark itself (the end of a run,
or the at-most-once ``free="step"`` mode).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import CheckpointTooOld

__all__ = ["KEEP_MARKS", "add_mark", "free_upto", "too_old"]

KEEP_MARKS = 32  # recent checkpoint steps kept (messages and the previous-mark rule)


def add_mark(marks: Sequence[int], step: int) -> tuple[list[int], int | None]:
    """``(new marks, previous mark below step or None)``."""
    prev = max((m for m in marks if m < step), default=None)
    return sorted({*marks, int(step)})[-KEEP_MARKS:], prev


def free_upto(step: int, prev: int | None, retain: bool) -> int | None:
    """The highest step whose samples a mark at ``step`` frees (``None``: nothing)."""
    return int(step) if not retain else prev


def too_old(uri: str, resume_step: int | None, n: int, lo: int, hi: int, marks: Sequence[int]) -> CheckpointTooOld:
    newest = max(marks) if marks else hi
    start = "this run starts without a checkpoint" if resume_step is None else \
        f"resuming from the checkpoint of step {resume_step}"
    return CheckpointTooOld(
        f"{start}, but ledger {uri} already freed the bytes of {n} samples trained after it (steps {lo}..{hi}), "
        f"because a later checkpoint was marked durable; the newest checkpoint the ledger knows is at step "
        f"{newest} (recent marks: {list(marks)[-8:]}). Resume from a checkpoint at step >= {hi} (the newest is "
        "safe), or start a new ledger; nothing was changed.", resume_step, newest)
