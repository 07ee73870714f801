"""What the two halves of :class:`torch_dataflow.stores.mooncake.MooncakeStore`
(``_mooncake_reads``, ``_mooncake_writes``) take from it, declared once for type checkers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import _mooncake_client as mc
from .base import FeatureStore


class _MooncakeBase(FeatureStore):
    """The configuration and plumbing ``MooncakeStore`` provides to its read and write halves."""

    # Set by MooncakeStore (see its __init__ and plumbing); declared for type checkers.
    namespace: str
    transfer: str
    read_retries: int
    uri: str
    force_after: float
    cfg: mc.MooncakeConfig

    if TYPE_CHECKING:

        def _key(self, sample_id: str, generation: int) -> str: ...

        def _client(self) -> mc._Client: ...

        def _staging(self, nbytes: int) -> torch.Tensor | None: ...

        def _maybe_gc(self) -> None: ...
