"""Moved to :mod:`torch_dataflow.specforge.store` (a store knows bytes only; the
SpecForge layout and its ledger registration live with SpecForge). This name
stays importable: ``from torch_dataflow.stores.specforge_dir import register_directory``
works as before, resolved on first use so ``stores`` itself imports neither the
ledger nor ``eagle3``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..specforge.store import CHECKSUM_PREFIX, SpecForgeDirStore, register_directory

__all__ = ["CHECKSUM_PREFIX", "SpecForgeDirStore", "register_directory"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ..specforge import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
