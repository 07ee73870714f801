"""Every exception torch_dataflow raises.

Each error subclasses both :class:`DataflowError` and the built-in a caller
would naturally catch (``KeyError`` for a missing sample, ``PermissionError``
for a bad credential, ...). Each is constructible from a single message string:
a DataLoader worker re-raises an exception as ``type(exc)(message)``, so any
richer constructor would turn a typed error into a bare ``RuntimeError``.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BackendUnavailable",
    "CheckpointTooOld",
    "CollateError",
    "ConfigError",
    "CorruptSample",
    "DataflowError",
    "Fenced",
    "ForkedClient",
    "LeaseLost",
    "ProducerSilent",
    "SampleAborted",
    "SampleUnavailable",
    "SessionConflict",
    "StoreFull",
]


class DataflowError(Exception):
    """Base class of every torch_dataflow error."""

    def __str__(self) -> str:
        # KeyError quotes its message (repr); keep the message readable for all.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class SampleUnavailable(DataflowError, KeyError):
    """The sample (or this generation of it) is not in the store: never put,
    released, aborted, superseded by a re-put, or lost with its writer."""


class AuthError(DataflowError, PermissionError):
    """A store or ledger configured with a shared secret was used without it."""


class StoreFull(DataflowError, MemoryError):
    """The store stayed over its byte budget for longer than the put timeout."""


class CorruptSample(DataflowError, ValueError):
    """Stored bytes failed the length or checksum check; never trained on."""


class BackendUnavailable(DataflowError, ConnectionError):
    """A store or ledger server cannot be reached (after bounded retries)."""


class LeaseLost(DataflowError, RuntimeError):
    """A lease expired or was taken over before it was acked or renewed."""


class SampleAborted(DataflowError, RuntimeError):
    """The sample id was aborted (tombstoned) while this generation was in flight."""


class ConfigError(DataflowError, ValueError):
    """Bad configuration or input: a URI, a sample id, a tensor, a file."""


class ProducerSilent(DataflowError, TimeoutError):
    """An online stream stayed open with nothing to deliver: its open producers
    are silent (no heartbeat) or provably dead. The message names them, their
    last heartbeat and the ``torch-dataflow close-stream`` command that ends the stream."""


class CollateError(ConfigError):
    """A batch could not be collated (e.g. samples of different shapes). The message
    names the sample ids; their leases were given back (retryable) at once."""


class Fenced(LeaseLost):
    """This trainer's fence (the ledger's restart counter ``attempt``) is older than the
    ledger's: another trainer took the ledger over (or reconciled it). Its leases, acks
    and plans are no longer valid; stop this trainer."""


class ForkedClient(ConfigError):
    """A backend client cannot start in a process forked from one that used it
    (Mooncake): start DataLoader workers with ``multiprocessing_context="spawn"``
    or ``"forkserver"`` (``FeatureLoader`` does for such stores)."""


class CheckpointTooOld(ConfigError):
    """A resume starts from a checkpoint older than what the ledger has already freed:
    the samples it lacks are gone. The message names the step the resume needs
    (:attr:`needed_step`, ``None`` for a start without a checkpoint) and the newest
    checkpoint step the ledger knows (:attr:`newest_step`); nothing was changed."""

    def __init__(self, message: str, needed_step: int | None = None, newest_step: int | None = None) -> None:
        super().__init__(message)
        self.needed_step, self.newest_step = needed_step, newest_step


class SessionConflict(DataflowError, RuntimeError):
    """Another trainer holds a live session on this ledger. The message names its host,
    pid, ranks and heartbeat age, and how to take over (``takeover=True``)."""
