"""torch_dataflow: training features from the processes that make them to the
processes that train on them, through a feature store, exactly once.

Optional integrations are imported where used: ``torch_dataflow.lightning``
(Lightning), ``torch_dataflow.fabric``, ``torch_dataflow.nodes`` (torchdata),
``torch_dataflow.eagle3``; backends ``mooncake://`` and ``redis://`` import
their clients on first use.

Example:
    >>> from torch_dataflow import FeatureStoreDataset, FeatureWriter
"""

from __future__ import annotations

from .acking import StepAcker
from .dataset import LEASE_KEY, SAMPLE_ID_KEY, FeatureStoreDataset, lease_ids_of
from .errors import (
    AuthError,
    BackendUnavailable,
    CheckpointTooOld,
    ConfigError,
    CorruptSample,
    DataflowError,
    Fenced,
    LeaseLost,
    ProducerSilent,
    SampleAborted,
    SampleUnavailable,
    SessionConflict,
    StoreFull,
)
from .ledger import Ledger, open_ledger
from .loader import FeatureLoader
from .pool import FeaturePool
from .producer import FeatureWriter
from .refs import FeatureSpec, Lease, SampleRef
from .sampler import ReshardingSampler
from .stores import FeatureStore, open_store

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "BackendUnavailable",
    "CheckpointTooOld",
    "ConfigError",
    "CorruptSample",
    "DataflowError",
    "FeatureLoader",
    "FeaturePool",
    "FeatureSpec",
    "FeatureStore",
    "FeatureStoreDataset",
    "FeatureWriter",
    "Fenced",
    "LEASE_KEY",
    "Lease",
    "LeaseLost",
    "Ledger",
    "ProducerSilent",
    "ReshardingSampler",
    "SAMPLE_ID_KEY",
    "SampleAborted",
    "SampleRef",
    "SampleUnavailable",
    "SessionConflict",
    "StepAcker",
    "StoreFull",
    "lease_ids_of",
    "open_ledger",
    "open_store",
]
