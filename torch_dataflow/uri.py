"""The one URI parser, and the one registry of schemes.

A URI is a compact way to write a backend's configuration:

    memory://                         in-process store or ledger
    file:///mnt/features?fsync=1      shared-directory store
    sqlite:///run/ledger.db           SQLite ledger (one host)
    redis://127.0.0.1:6379/0          Redis ledger (many hosts)
    mooncake://127.0.0.1:50051        Mooncake store

Query keys are typed and whitelisted per backend: an unknown key is a
:class:`~torch_dataflow.errors.ConfigError`, never silently ignored.

Example:
    >>> u = parse_uri("file:///tmp/f?fsync=1", {"fsync": bool})
    >>> (u.scheme, u.path, u.query["fsync"])
    ('file', '/tmp/f', True)
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import ConfigError

__all__ = ["ParsedURI", "parse_size", "parse_uri", "resolve_backend", "LEDGER_SCHEMES", "STORE_SCHEMES"]

# scheme -> "module:Class". The only place schemes are listed.
STORE_SCHEMES: dict[str, str] = {
    "memory": "torch_dataflow.stores.memory:MemoryStore",
    "file": "torch_dataflow.stores.shared_dir:SharedDirStore",
    "mooncake": "torch_dataflow.stores.mooncake:MooncakeStore",
    "specforge": "torch_dataflow.specforge.store:SpecForgeDirStore",
}
LEDGER_SCHEMES: dict[str, str] = {
    "memory": "torch_dataflow.ledger.memory:MemoryLedger",
    "sqlite": "torch_dataflow.ledger.sqlite:SQLiteLedger",
    "redis": "torch_dataflow.ledger.redis:RedisLedger",
    "rediss": "torch_dataflow.ledger.redis:RedisLedger",
}

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(value: str | int) -> int:
    """Parse a byte size: ``4096``, ``"64MiB"``, ``"1.5 GB"``.

    Raises:
        ConfigError: not a size.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"size must be >= 0, got {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"not a byte size: {value!r} (examples: 4096, 64MiB, 1.5GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


_CONVERTERS: dict[Any, Any] = {bool: _parse_bool, int: int, float: float, str: str, "size": parse_size}


@dataclass(frozen=True)
class ParsedURI:
    """The parts of a backend URI, with the query converted to typed values."""

    raw: str
    scheme: str
    host: str | None
    port: int | None
    path: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    query: Mapping[str, Any] = field(default_factory=dict)


def parse_uri(uri: str, allowed: Mapping[str, Any] | None = None) -> ParsedURI:
    """Split ``uri`` and convert its query with the ``allowed`` {key: type} table.

    Types are ``bool``, ``int``, ``float``, ``str`` or ``"size"`` (bytes with
    an optional unit). A key given twice, an unknown key or a bad value raise.

    Raises:
        ConfigError: malformed URI, unknown or repeated query key, bad value.
    """
    if not isinstance(uri, str) or "://" not in uri:
        raise ConfigError(f"not a URI (expected scheme://...): {uri!r}")
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"malformed URI {uri!r}: {e}") from e
    if parts.fragment:
        raise ConfigError(f"URI fragments are not supported: {uri!r}")
    allowed = allowed or {}
    query: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ConfigError(f"unknown query key {key!r} in {parts.scheme}:// URI (known: {known})")
        if key in query:
            raise ConfigError(f"query key {key!r} given twice in {uri!r}")
        try:
            query[key] = _CONVERTERS[allowed[key]](value)
        except (ValueError, ConfigError) as e:
            raise ConfigError(f"bad value for {key!r} in {parts.scheme}:// URI: {e}") from e
    return ParsedURI(
        raw=uri,
        scheme=parts.scheme.lower(),
        host=parts.hostname,
        port=port,
        path=unquote(parts.path),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        query=query,
    )


def resolve_backend(uri: str, table: Mapping[str, str], kind: str) -> type:
    """Import and return the backend class registered for ``uri``'s scheme."""
    if not isinstance(uri, str) or "://" not in uri:
        raise ConfigError(f"{kind} must be a URI like {next(iter(table))}://..., got {uri!r}")
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in table:
        raise ConfigError(f"unknown {kind} scheme {scheme!r} in {uri!r} (known: {', '.join(sorted(table))})")
    module, _, name = table[scheme].partition(":")
    return getattr(importlib.import_module(module), name)
