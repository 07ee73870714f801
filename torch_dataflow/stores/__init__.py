"""Data-plane backends behind one contract (:class:`FeatureStore`)."""

from __future__ import annotations

from typing import Any

from ..uri import STORE_SCHEMES, resolve_backend
from .base import FeatureStore, StoreHealth

__all__ = ["FeatureStore", "StoreHealth", "open_store"]


def open_store(store: str | FeatureStore, **overrides: Any) -> FeatureStore:
    """Return ``store`` itself, or the backend its URI names, configured by the
    URI's query and ``overrides`` (keyword arguments win).

    Example:
        >>> open_store("memory://example")
        MemoryStore('memory://example')
    """
    if isinstance(store, FeatureStore):
        if overrides:
            raise TypeError("keyword overrides apply to a URI, not to a store instance")
        return store
    cls = resolve_backend(store, STORE_SCHEMES, "store")
    return cls.from_uri(store, **overrides)
