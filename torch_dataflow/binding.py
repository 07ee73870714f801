"""Which store a ledger's samples live in: the guard against a mistyped store.

The producer records its store's :meth:`~torch_dataflow.stores.FeatureStore.store_id`
in the ledger at its first commit (:func:`bind_store`). Consumers open the store
without creating anything (:func:`consumer_store`) and, before their first lease,
check that it is the recorded one (:func:`check_store`); a wrong, missing or
foreign store is a :class:`~torch_dataflow.errors.ConfigError` naming both, with
nothing leased or quarantined. Otherwise a typo in a path would make every
sample look lost and quarantine the whole run.

Example:
    >>> import tempfile, torch
    >>> from torch_dataflow import FeatureWriter, FeatureStoreDataset
    >>> d = tempfile.mkdtemp()
    >>> with FeatureWriter(f"file://{d}/features", f"sqlite://{d}/l.db") as w:
    ...     _ = w.put("s0", {"x": torch.zeros(1)})
    >>> ds = FeatureStoreDataset(f"file://{d}/featuers", f"sqlite://{d}/l.db")
    >>> next(iter(ds))
    Traceback (most recent call last):
    ...
    torch_dataflow.errors.ConfigError: store file://.../featuers cannot serve ledger sqlite://.../l.db ...
"""

from __future__ import annotations

import logging
import os
import urllib.parse
import weakref
from typing import Any

from .errors import ConfigError, ForkedClient
from .ledger import Ledger, open_ledger
from .stores import FeatureStore, open_store
from .stores.shared_dir import SharedDirStore

__all__ = ["STORE_ID_KEY", "bind_store", "check_store", "consumer_ledger", "consumer_store", "existing_ledger"]

log = logging.getLogger(__name__)

# FeatureWriters alive in this process (registered by the writer): a consumer opened beside one on the same
# ledger is not warned that no producer wrote it yet (the writer connects at its first put).
_WRITERS: weakref.WeakSet[Any] = weakref.WeakSet()


def _ledger_key(ledger: Any) -> str:
    return os.path.realpath(ledger.path) if getattr(ledger, "path", None) else str(getattr(ledger, "uri", ""))


def note_writer(writer: Any) -> None:
    """A :class:`~torch_dataflow.FeatureWriter` of this process writes to ``writer.ledger``."""
    _WRITERS.add(writer)


def _writer_here(ledger: Ledger) -> bool:
    key = _ledger_key(ledger)
    return any(not getattr(w, "_closed", False) and _ledger_key(w.ledger) == key for w in list(_WRITERS))

STORE_ID_KEY = "store_id"


def consumer_store(store: str | FeatureStore) -> FeatureStore:
    """Open ``store`` for a consumer: a ``file://`` directory is never created."""
    if isinstance(store, str):
        is_file = store.split("://", 1)[0].lower() == "file"
        return open_store(store, create=False) if is_file else open_store(store)
    if isinstance(store, SharedDirStore) and store.create:
        return SharedDirStore(**{**store._config_state(), "create": False})
    return store


def consumer_ledger(ledger: str | Ledger) -> Ledger:
    """Open ``ledger`` for a consumer. A ledger no producer ever registered on is
    served (a consumer may start before its producer) with a warning: a mistyped
    path, Redis db or namespace would otherwise wait quietly for a producer that
    writes elsewhere. A ``sqlite://`` file that does not exist yet is created."""
    if not isinstance(ledger, str) or ledger.split("://", 1)[0].lower() == "memory":
        return open_ledger(ledger)  # an instance is the caller's; a memory ledger cannot be mistyped elsewhere
    opened = open_ledger(ledger)
    path = getattr(opened, "path", None) if ledger.split("://", 1)[0].lower() == "sqlite" else None
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        opened._connect()  # the ledger's own error for a missing directory, before any "is created" warning
    if _writer_here(opened):
        return opened  # its producer is in this process (it registers at its first put): no typo to warn of
    if path and not os.path.exists(path):
        log.warning("ledger file %s does not exist: a new, empty ledger is created there and this consumer "
                    "waits for a producer to register on it. If the path is a typo, stop and fix it: the "
                    "producer's FeatureWriter on the right path is what fills a ledger", path)
        return opened
    try:
        empty = not opened.producers() and not opened.counts().committed
    except (ConnectionError, OSError):  # unreachable: the first lease says so, with the retries it makes
        return opened
    if empty:
        log.warning("ledger %s has no producer and no sample yet: this consumer waits for a producer to register "
                    "on it. If the URI is a typo (path, Redis db number, ?namespace=), stop and fix it",
                    opened.uri)
    return opened


# A status look is a few short reads: a Redis port that accepts but never answers fails in
# about 15 s instead of the trainer-grade default (30 s per command, 10 retries: minutes).
# The URI's own keys (?socket_timeout=...&retries=...) still win.
_LOOK = {"socket_timeout": 5.0, "retries": 2}


def existing_ledger(uri: str, *, look: bool = False, who: str = "this command") -> Ledger:
    """Open a ledger, refusing to create a new SQLite file for a mistyped path
    (``look``: short Redis timeouts for a one-off status read; ``who`` never creates one)."""
    overrides: dict[str, Any] = {}
    if look and uri.startswith(("redis:", "rediss:")):
        given = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query)
        overrides = {k: v for k, v in _LOOK.items() if k not in given}
    ledger = open_ledger(uri, **overrides)  # parses the backend's own query keys (secret=..., timeout=...)
    path = getattr(ledger, "path", None)
    if uri.startswith("sqlite:") and path and not os.path.exists(path):
        raise ConfigError(f"no ledger at {path} (a typo? {who} never creates a ledger)")
    if uri.startswith(("redis:", "rediss:")) and not _redis_ledger_exists(ledger):
        raise ConfigError(f"no ledger in namespace {ledger.namespace!r} of db {ledger.db} at {ledger.host}:"
                          f"{ledger.port} (a typo in the db number or ?namespace=? {who} never creates a "
                          "ledger)")
    return ledger


def _redis_ledger_exists(ledger: Any) -> bool:
    """Whether a Redis ledger's namespace holds a ledger, asked without creating one
    (opening the ledger itself initialises an empty namespace). Unreachable: ``True``,
    so the ledger's own call reports the error with its retries."""
    try:
        import redis
    except ImportError:
        return True
    kw: dict[str, Any] = {}
    if ledger.ssl:
        kw = {"ssl": True, "ssl_ca_certs": ledger.ssl_ca_certs, "ssl_certfile": ledger.ssl_certfile,
              "ssl_keyfile": ledger.ssl_keyfile, "ssl_cert_reqs": ledger.ssl_cert_reqs}
    client = redis.Redis(host=ledger.host, port=ledger.port, db=ledger.db, username=ledger.username,
                         password=ledger._password, socket_timeout=ledger.connect_timeout,
                         socket_connect_timeout=ledger.connect_timeout, **kw)
    try:
        return bool(client.exists("{" + ledger.namespace + "}:meta"))
    except redis.exceptions.RedisError:
        return True
    finally:
        client.close()


def bind_store(store: FeatureStore, ledger: Ledger) -> str:
    """Record ``store``'s id in ``ledger`` (first writer wins) and return it.

    Raises:
        ConfigError: the ledger already records another store.
    """
    sid = store.store_id()
    if ledger.get_meta(STORE_ID_KEY) is None and not getattr(store, "registers_in_place", False):
        held = next(iter(store._keys()), None)  # listable stores; Mooncake lists only this process's keys
        if held is not None and not ledger.counts().committed:
            raise ConfigError(
                f"ledger {ledger.uri} is new (no store bound, nothing committed) but store {store.uri} already "
                f"holds samples (e.g. {held[0]!r} generation {held[1]}) committed to another ledger: a mistyped "
                "ledger path, Redis db or ?namespace=? Writing here would reuse their generations. Use the "
                "ledger those samples were committed to, or an empty store")
    recorded = ledger.claim_meta(STORE_ID_KEY, sid)
    if recorded != sid:
        raise ConfigError(f"store {store.uri} (id {sid}) is not the store of ledger {ledger.uri}, which records "
                          f"store id {recorded}: check the store path/URI, or use a separate ledger for another store")
    return sid


def check_store(store: FeatureStore, ledger: Ledger, *, unchanged: str = "Nothing was leased") -> bool:
    """Whether ``store`` is the store ``ledger`` records: ``True`` (checked),
    ``False`` (nothing recorded yet: ask again before the next lease).
    ``unchanged`` is the error's word on what the refusal left alone.

    Raises:
        ConfigError: the store is missing, not a torch_dataflow store, or another
            store than the recorded one (the message names both).
    """
    recorded = ledger.get_meta(STORE_ID_KEY)
    try:
        sid = store.store_id()
    except ForkedClient:
        raise  # not a path problem: its message says what to do
    except ConfigError as e:
        if recorded is None and not ledger.counts().committed:
            return False  # nothing committed: the producer may not have created the store yet
        rec = f" (it records store id {recorded})" if recorded else ""
        raise ConfigError(f"store {store.uri} cannot serve ledger {ledger.uri}{rec}: {e}. {unchanged}; "
                          "check the store path/URI") from e
    if recorded is None:
        return False  # a ledger without a binding (empty, or written before store ids): nothing to compare
    if sid != recorded:
        raise ConfigError(f"store {store.uri} cannot serve ledger {ledger.uri}: it is store id {sid}, the ledger's "
                          f"samples were committed to store id {recorded}. {unchanged}; check the store "
                          "path/URI")
    return True
