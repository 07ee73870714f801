"""Tensor-free records that cross the control plane.

A :class:`SampleRef` says where one generation of one sample's bytes live and
what tensors they hold; a :class:`Lease` hands one delivery of a sample to one
consumer. Both are frozen, JSON round-trippable and never hold a tensor: the
ledger carries references, the store carries bytes.

Example:
    >>> spec = FeatureSpec(name="input_ids", dtype="int64", shape=(4,), nbytes=32)
    >>> ref = SampleRef(sample_id="s1", generation=1, store="memory://", specs=(spec,),
    ...                 nbytes=32, checksum="0123")
    >>> SampleRef.from_json(ref.to_json()) == ref
    True
"""

from __future__ import annotations

import json
import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["FeatureSpec", "Lease", "SampleRef", "validate_metadata", "validate_sample_id"]

MAX_SAMPLE_ID_BYTES = 200

_SCALARS = (str, int, float, bool, type(None))
# Fast path: no dot-dot, no leading dot, no separators or control characters.
_SAFE_ID = re.compile(r"(?!\.)(?:[A-Za-z0-9_\-+=,:;@~#%!^&()\[\]{} ]|\.(?!\.))+")
_UNSAFE_CHAR = re.compile(r"[/\\\x00-\x1f\x7f]")
_safe_id = _SAFE_ID.fullmatch
_SHORT_ID = MAX_SAMPLE_ID_BYTES // 4  # at most 4 UTF-8 bytes a character: a short id is within the byte limit


def validate_sample_id(sample_id: object) -> str:
    """Return ``sample_id`` if it is safe as a file name and a store key.

    Rejects non-strings, the empty string, ``.``/``..``, a leading dot, path
    separators, ``..`` anywhere, NUL and other control characters, and ids
    over 200 UTF-8 bytes — anything that could escape a directory or collide
    with a temporary file.

    Raises:
        ConfigError: the id is unsafe (the message says why).
    """
    if not isinstance(sample_id, str):
        raise ConfigError(f"sample id must be a str, got {type(sample_id).__name__}")
    if _SAFE_ID.fullmatch(sample_id) and len(sample_id) <= MAX_SAMPLE_ID_BYTES // 4:
        return sample_id  # the common case: short, plain characters
    if not sample_id:
        raise ConfigError("sample id must not be empty")
    try:
        n = len(sample_id.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ConfigError(f"sample id is not valid unicode: {sample_id!r}") from e
    if n > MAX_SAMPLE_ID_BYTES:
        raise ConfigError(f"sample id longer than {MAX_SAMPLE_ID_BYTES} bytes: {sample_id[:40]!r}...")
    if sample_id.startswith(".") or ".." in sample_id:
        raise ConfigError(f"sample id may not start with '.' or contain '..': {sample_id!r}")
    if _UNSAFE_CHAR.search(sample_id):
        raise ConfigError(f"sample id contains a path separator or control character: {sample_id!r}")
    return sample_id


def _check_json_value(value: Any, where: str) -> Any:
    """Deep-copy a metadata value, refusing anything that is not plain JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"metadata {where} is not a finite number: {value!r}")
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_check_json_value(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"metadata {where} has a non-str key {k!r}")
            out[k] = _check_json_value(v, f"{where}.{k}")
        return types.MappingProxyType(out)
    if type(value).__module__.startswith(("torch", "numpy")):
        raise TypeError(
            f"metadata {where} is a {type(value).__name__}: refs carry metadata only, "
            "never tensors or arrays (put tensors in the sample itself)"
        )
    raise ConfigError(f"metadata {where} is not JSON-serialisable: {type(value).__name__}")


def validate_metadata(metadata: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A ref's metadata as the ref keeps it (a read-only deep copy of plain JSON values).

    Raises:
        ConfigError: a value that is not plain JSON (TypeError for a tensor or array).

    Example:
        >>> dict(validate_metadata({"n": 1}))
        {'n': 1}
    """
    return _check_json_value(dict(metadata), "metadata") if metadata else _EMPTY


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


_EMPTY: Mapping[str, Any] = types.MappingProxyType({})


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One tensor of a sample: its name, dtype name (``"bfloat16"``), shape and size."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def __post_init__(self) -> None:
        for attr in ("name", "dtype"):
            if not isinstance(getattr(self, attr), str):
                raise TypeError(f"FeatureSpec.{attr} must be a str, got {type(getattr(self, attr)).__name__}")
        shape, nbytes = self.shape, self.nbytes
        # The common case (a tuple of ints and an int, as a ref parsed from JSON has) is checked, not rebuilt.
        if type(shape) is not tuple or not all(type(d) is int for d in shape):
            shape = tuple(int(d) for d in shape)
            object.__setattr__(self, "shape", shape)
        if type(nbytes) is not int:
            nbytes = int(nbytes)
            object.__setattr__(self, "nbytes", nbytes)
        if nbytes < 0 or (shape and min(shape) < 0):
            raise ConfigError(f"FeatureSpec {self.name!r} has a negative size")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]), d["nbytes"])


@dataclass(frozen=True, slots=True)
class SampleRef:
    """Where one generation of one sample lives, and what it holds.

    Attributes:
        sample_id: the producer's id (validated by :func:`validate_sample_id`).
        generation: increases on every re-put of the same id; a ref of an older
            generation can never read, free or ack a newer one.
        store: the store URI the bytes were written to.
        specs: one :class:`FeatureSpec` per tensor, in encoding order.
        nbytes: size of the encoded blob.
        checksum: hex digest of the encoded blob (see :mod:`torch_dataflow.codec`).
        metadata: small JSON-able user metadata (never tensors).
    """

    sample_id: str
    generation: int
    store: str
    specs: tuple[FeatureSpec, ...]
    nbytes: int
    checksum: str
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sid, gen, specs = self.sample_id, self.generation, self.specs
        if type(sid) is not str or len(sid) > _SHORT_ID or not _safe_id(sid):
            validate_sample_id(sid)  # the full check (and its error) for anything but a short plain id
        if type(gen) is not int and (isinstance(gen, bool) or not isinstance(gen, int)) or gen < 1:
            raise ConfigError(f"generation must be an int >= 1, got {gen!r}")
        if type(specs) is not tuple:
            specs = tuple(specs)
            object.__setattr__(self, "specs", specs)
        for s in specs:
            if type(s) is not FeatureSpec and not isinstance(s, FeatureSpec):
                raise TypeError(f"SampleRef.specs must hold FeatureSpec, got {type(s).__name__}")
        object.__setattr__(self, "metadata", validate_metadata(self.metadata))

    def __hash__(self) -> int:
        return hash((self.sample_id, self.generation, self.store, self.checksum))

    @property
    def key(self) -> tuple[str, int]:
        """``(sample_id, generation)``: the identity a store files bytes under."""
        return (self.sample_id, self.generation)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sample_id": self.sample_id,
            "generation": self.generation,
            "store": self.store,
            "specs": [s.to_dict() for s in self.specs],
            "nbytes": self.nbytes,
            "checksum": self.checksum,
            "metadata": _plain(self.metadata),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SampleRef:
        spec = FeatureSpec
        return cls(d["sample_id"], d["generation"], d["store"],
                   tuple([spec(s["name"], s["dtype"], tuple(s["shape"]), s["nbytes"]) for s in d["specs"]]),
                   d["nbytes"], d["checksum"], d.get("metadata", _EMPTY))

    @classmethod
    def from_json(cls, text: str | bytes) -> SampleRef:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"not a SampleRef: {e}") from e
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, AttributeError, ValueError, ArithmeticError) as e:  # JSON, not a ref's fields
            raise ConfigError(f"not a SampleRef: {type(e).__name__}: {e}") from e


@dataclass(frozen=True, slots=True)
class Lease:
    """One delivery of one sample to one consumer, until ``deadline``.

    ``lease_id`` is opaque to callers; it is what travels inside a batch so the
    main process can ack it (``FeatureStoreDataset.ack``).
    """

    lease_id: str
    epoch: int
    owner: str
    deadline: float
    ref: SampleRef

    @property
    def sample_id(self) -> str:
        return self.ref.sample_id

    @property
    def generation(self) -> int:
        return self.ref.generation

    def to_dict(self) -> dict[str, Any]:
        return {
            "lease_id": self.lease_id,
            "epoch": self.epoch,
            "owner": self.owner,
            "deadline": self.deadline,
            "ref": self.ref.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Lease:
        try:
            d = json.loads(text)
            return cls(d["lease_id"], d["epoch"], d["owner"], d["deadline"], SampleRef.from_dict(d["ref"]))
        except (KeyError, TypeError, AttributeError, ValueError, ArithmeticError) as e:
            raise ConfigError(f"not a Lease: {type(e).__name__}: {e}") from e
