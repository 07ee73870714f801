"""The data-plane contract: :class:`FeatureStore`.

A store keeps the encoded bytes of one generation of one sample under
``(sample_id, generation)``. It knows nothing of leases, ranks or training:
the ledger decides lifetime and the store obeys.

Backends implement five byte-level primitives (``_write``, ``_read``,
``_delete``, ``_exists``, ``_keys``) plus ``health``; the tensor-level API
(``put``/``get``/... with encoding, integrity and auth checks) is implemented
once here. A backend may override ``put``/``get`` and the batch methods for
speed (the Mooncake store does, for zero-copy transfers) but must keep their
contract, which ``torch_dataflow.testing.store_conformance`` checks.

Example:
    >>> import torch
    >>> from torch_dataflow.stores import open_store
    >>> store = open_store("memory://doc-example")
    >>> ref = store.put("s1", 1, {"x": torch.arange(3)})
    >>> store.get(ref)["x"].tolist()
    [0, 1, 2]
    >>> store.delete(ref)
    True
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import codec
from ..auth import SecretGuard
from ..errors import ConfigError, SampleUnavailable
from ..refs import SampleRef, validate_metadata, validate_sample_id

__all__ = ["FeatureStore", "StoreHealth"]

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class StoreHealth:
    """What a store holds now: encoded bytes resident and number of samples."""

    resident_bytes: int
    count: int


class FeatureStore(ABC):
    """Bytes of sample generations, addressed by :class:`SampleRef`.

    Subclasses set ``self.uri`` (without credentials) and, at attach, set
    ``self._guard = SecretGuard.attach(secret, verifier, ...)`` with the
    verifier the backend keeps (see :mod:`torch_dataflow.auth`).
    """

    uri: str
    _guard: SecretGuard | None = None
    # True: blobs are codec blobs and ``read_blob_into`` lands them without a private
    # copy, so torch_dataflow.batch_read may read a batch straight into its rows.
    direct_reads: bool = False
    # False: the store serves tensors (get), not codec blobs: field selection reads the
    # whole sample and keeps the chosen tensors (a SpecForge directory served in place).
    codec_blobs: bool = True
    # False: a process forked after this backend's client ran cannot start another one
    # (Mooncake), so loaders start their workers with forkserver (FeatureLoader does).
    fork_safe: bool = True

    def _check_auth(self) -> None:
        """Check this client's credential (constant time); attach first if needed."""
        if self._guard is None:
            self._attach()
        assert self._guard is not None
        self._guard.check()

    @abstractmethod
    def _attach(self) -> None:
        """Connect (lazily, again after a fork) and set ``self._guard``."""

    # ------------------------------------------------------- byte primitives
    @abstractmethod
    def _write(self, sample_id: str, generation: int, parts: Sequence[Buffer], nbytes: int) -> None:
        """Publish ``parts`` (concatenated, ``nbytes`` long) atomically under the key."""

    @abstractmethod
    def _read(self, sample_id: str, generation: int) -> Buffer:
        """Return the whole blob; raise :class:`SampleUnavailable` if absent."""

    @abstractmethod
    def _delete(self, sample_id: str, generation: int) -> bool:
        """Remove the blob of exactly this generation; ``False`` if it was absent."""

    @abstractmethod
    def _exists(self, sample_id: str, generation: int) -> bool:
        """Whether the blob of exactly this generation is present."""

    @abstractmethod
    def _keys(self) -> Iterator[tuple[str, int]]:
        """Every ``(sample_id, generation)`` currently held."""

    @abstractmethod
    def health(self) -> StoreHealth:
        """Resident bytes and sample count (cheap: used for backpressure)."""

    @abstractmethod
    def store_id(self) -> str:
        """A stable identity of the store behind this client (not of the client):
        the same from every process and every URI spelling that reaches it, and
        different for a different store. The ledger records it at the first
        commit so consumers refuse a mistyped store before leasing anything.

        Raises:
            ConfigError: the store does not exist or is not a torch_dataflow store.
        """

    def close(self) -> None:  # noqa: B027 - optional for backends with no resources
        """Release connections and handles. The store may be reopened lazily."""

    # ------------------------------------------------------- tensor-level API
    def put(
        self,
        sample_id: str,
        generation: int,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any] | None = None,
    ) -> SampleRef:
        """Encode ``tensors`` and publish them under ``(sample_id, generation)``.

        Nothing is visible to readers until the whole blob is written. The
        returned ref is not yet committed: commit it to a ledger to deliver it.

        Raises:
            TypeError: a value is not a tensor.
            ConfigError: bad sample id or generation, a tensor that requires grad.
            AuthError: wrong or missing secret.
            StoreFull: the backend has no room (stores that cannot wait).
        """
        return self._put_all([(sample_id, generation, tensors, metadata)])[0]

    def _put_all(self, todo: Sequence[tuple[str, int, Mapping[str, torch.Tensor], Mapping[str, Any] | None]],
                 ) -> list[SampleRef]:
        """``put`` and the default ``put_many``: validate every item (key, tensors, metadata), then write."""
        self._check_auth()
        encoded = [self._encode(sid, gen, tensors) for sid, gen, tensors, _ in todo]
        for *_, meta in todo:
            validate_metadata(meta)
        for (sid, gen, _, _), enc in zip(todo, encoded, strict=True):
            self._write(sid, gen, self._payload(enc), enc.nbytes)
        # after the writes: a layout's checksum is known once its bytes are written
        return [self._ref(sid, gen, enc, meta) for (sid, gen, _, meta), enc in zip(todo, encoded, strict=True)]

    # How a put encodes: the whole blob, sums included (encode), or a layout whose sums the
    # write computes as it goes (codec.layout, file://); _payload is what _write is given.
    _codec = staticmethod(codec.encode)

    @staticmethod
    def _payload(enc: Any) -> Any:
        return enc.parts()

    def _encode(self, sample_id: str, generation: int, tensors: Mapping[str, torch.Tensor]) -> Any:
        """Validate the key, then encode: what every ``put`` does before writing."""
        validate_sample_id(sample_id)
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
            raise ConfigError(f"generation must be an int >= 1, got {generation!r}")
        return self._codec(tensors)

    def _ref(self, sample_id: str, generation: int, enc: codec.Encoded | codec.Layout,
             metadata: Mapping[str, Any] | None) -> SampleRef:
        """The ref of bytes just written under ``(sample_id, generation)``."""
        return SampleRef(sample_id=sample_id, generation=generation, store=self.uri, specs=enc.specs,
                         nbytes=enc.nbytes, checksum=enc.checksum, metadata=dict(metadata or {}))

    def get(self, ref: SampleRef, *, zero_copy: bool = False) -> dict[str, torch.Tensor]:
        """Read and verify one sample generation.

        Returned tensors own their memory unless ``zero_copy=True``, in which
        case they may be read-only views into the store's buffer (valid after
        the sample is deleted only for stores that say so).

        Raises:
            SampleUnavailable: absent, freed, aborted or superseded generation.
            CorruptSample: length or checksum mismatch, or not the ref's blob.
            AuthError: wrong or missing secret.
        """
        self._check_auth()
        blob = self._read(ref.sample_id, ref.generation)
        return codec.decode(blob, copy=not zero_copy, expected_checksum=ref.checksum, what=self._what(ref))

    def read_blob_into(self, ref: SampleRef, views: Sequence[memoryview], feed: Any = None) -> int:
        """Fill ``views`` in order with the leading bytes of ``ref``'s blob; return the
        blob's stored length (a batch-direct read's primitive: the caller verifies
        with :func:`~torch_dataflow.codec.check_landed`; views past a short blob
        stay as they were). ``feed``: called with each landed piece, in blob order
        (a :class:`~torch_dataflow.codec.LandingHash`'s ``update``). The default reads
        the blob with ``_read`` and copies it; a backend may land the bytes directly
        (the shared-dir store uses ``preadv``, in cache-sized chunks).

        Raises:
            SampleUnavailable: absent, freed, aborted or superseded generation.
            AuthError: wrong or missing secret.
        """
        self._check_auth()
        blob = memoryview(self._read(ref.sample_id, ref.generation)).cast("B")
        pos = 0
        for v in views:
            n = max(0, min(len(v), len(blob) - pos))
            v[:n] = blob[pos : pos + n]
            if feed is not None:
                feed(v[:n])
            pos += n
        return len(blob)

    def _read_ranges(self, sample_id: str, generation: int, ranges: Sequence[tuple[int, Sequence[memoryview]]],
                     feed: Any = None) -> int:
        """Fill the views of each ``(blob offset, views)`` range in order with the blob's
        bytes from that offset; return the blob's stored length (views past the end of a
        short blob stay as they were). ``feed``: called with each landed piece, in range
        order. The default reads the whole blob with ``_read`` and copies the ranges out
        (correct everywhere; ``memory://`` keeps it: its ``_read`` copies nothing); a
        backend with ranged reads overrides it (``file://``: one ``preadv`` per range)."""
        blob = memoryview(self._read(sample_id, generation)).cast("B")
        for offset, views in ranges:
            pos = offset
            for v in views:
                n = max(0, min(len(v), len(blob) - pos))
                v[:n] = blob[pos : pos + n]
                if feed is not None and n:
                    feed(v[:n])
                pos += n
        return len(blob)

    def read_ranges_into(self, ref: SampleRef, ranges: Sequence[tuple[int, Sequence[memoryview]]],
                         feed: Any = None) -> int:
        """Land byte ranges of ``ref``'s blob in caller buffers; return the blob's stored
        length (field selection's primitive, see :mod:`torch_dataflow.fields`: the caller
        verifies with :func:`~torch_dataflow.codec.check_fields`).

        Raises:
            SampleUnavailable: absent, freed, aborted or superseded generation.
            AuthError: wrong or missing secret.
        """
        self._check_auth()
        return self._read_ranges(ref.sample_id, ref.generation, ranges, feed)

    def get_fields(self, ref: SampleRef, fields: Sequence[str] | None, *,
                   zero_copy: bool = False) -> dict[str, torch.Tensor]:
        """Read and verify only the tensors ``fields`` names (``None``: all, as :meth:`get`).

        Only the header and the chosen tensors' bytes are read; both are checked
        against their own checksums. A format-1 blob (no per-tensor checksums) is
        read and verified whole. A flipped byte in a tensor that was not chosen is
        not read, so this read does not see it (see :mod:`torch_dataflow.codec`).

        Raises:
            ConfigError: a name the ref does not hold (the message lists its names).
            SampleUnavailable: absent, freed, aborted or superseded generation.
            CorruptSample: the header or a chosen tensor fails its check.
            AuthError: wrong or missing secret.

        Example:
            >>> import torch
            >>> from torch_dataflow.stores import open_store
            >>> store = open_store("memory://get-fields-doc")
            >>> ref = store.put("s1", 1, {"x": torch.arange(3), "big": torch.zeros(1000)})
            >>> store.get_fields(ref, ["x"])["x"].tolist()
            [0, 1, 2]
        """
        from ..fields import read_fields

        return read_fields(self, ref, fields, zero_copy=zero_copy)

    def delete(self, ref: SampleRef) -> bool:
        """Free exactly ``ref``'s generation; never a newer one. Idempotent."""
        self._check_auth()
        return self._delete(ref.sample_id, ref.generation)

    def settle(self, ref: SampleRef, *, force: bool = False) -> bool:
        """Delete ``ref``'s generation and say whether its bytes are really gone (or
        were never the store's to free): what the ledger's delete queue confirms.
        ``False``: still there (an error, a removal parked behind a read lease).
        ``force``: do not wait for read leases (the ledger freed ``ref``, so only a
        stale reader can hold one); stores without leases ignore it."""
        self.delete(ref)
        return not self.exists(ref)

    def exists(self, ref: SampleRef) -> bool:
        """Whether ``ref``'s generation is readable now."""
        self._check_auth()
        return self._exists(ref.sample_id, ref.generation)

    def readable(self, ref: SampleRef) -> bool:
        """Whether ``ref``'s bytes can really be read now, not only listed (a resumed
        producer's check for bytes lost with a dead writer). Default: :meth:`exists`."""
        return self.exists(ref)

    def keys(self) -> list[tuple[str, int]]:
        """Every ``(sample_id, generation)`` held (for gc, status and leak checks)."""
        self._check_auth()
        return sorted(self._keys())

    def put_many(
        self, items: Iterable[tuple[str, int, Mapping[str, torch.Tensor], Mapping[str, Any] | None]]
    ) -> list[SampleRef]:
        """``put`` each ``(sample_id, generation, tensors, metadata)``; backends may batch.

        Every item is validated (key, tensors, metadata) before the first byte is written.
        """
        return self._put_all(list(items))

    def get_many(self, refs: Sequence[SampleRef], *, zero_copy: bool = False) -> list[dict[str, torch.Tensor]]:
        """``get`` each ref, in order; backends may batch."""
        return [self.get(ref, zero_copy=zero_copy) for ref in refs]

    # --------------------------------------------------------------- helpers
    def _what(self, ref: SampleRef) -> str:
        return f"sample {ref.sample_id!r} generation {ref.generation} in {self.uri}"

    @staticmethod
    def _missing(sample_id: str, generation: int, uri: str) -> SampleUnavailable:
        return SampleUnavailable(f"sample {sample_id!r} generation {generation} is not in {uri}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Stores pickle by configuration and reconnect lazily in the new process.
        return (self.__class__._from_state, (self._config_state(),))

    @abstractmethod
    def _config_state(self) -> dict[str, Any]:
        """Keyword arguments that rebuild an equivalent client in another process."""

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> FeatureStore:
        return cls(**state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

