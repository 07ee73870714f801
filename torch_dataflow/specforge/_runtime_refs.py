"""SpecForge ``SampleRef`` <-> torch_dataflow ``SampleRef`` (part of
:mod:`torch_dataflow.specforge.runtime`, which re-exports both functions)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from specforge.runtime.contracts import SCHEMA_VERSION
from specforge.runtime.contracts import FeatureSpec as SFFeatureSpec
from specforge.runtime.contracts import SampleRef as SFSampleRef

from ..errors import ConfigError
from ..refs import FeatureSpec, SampleRef

TD_KEY = "torch_dataflow"  # in a SpecForge ref's metadata: where our bytes are
SF_KEY = "specforge"  # in our ref's metadata: the SpecForge ref's own fields
_SF_FIELDS = ("run_id", "source_task_id", "strategy", "schema_version", "target_model_version",
              "draft_weight_version", "tokenizer_version", "num_tokens")


def to_specforge_ref(ref: SampleRef) -> SFSampleRef:
    """The SpecForge ``SampleRef`` of one of our refs (written by :class:`LedgerFeatureStore`).

    Example:
        >>> from torch_dataflow.refs import FeatureSpec, SampleRef
        >>> ref = SampleRef("s1", 1, "memory://", (FeatureSpec("x", "int64", (3,), 24),), 24, "ab",
        ...                 {"specforge": {"run_id": "r", "num_tokens": 3}})
        >>> sf = to_specforge_ref(ref)
        >>> (sf.run_id, sf.num_tokens, sf.feature_specs["x"].shape, from_specforge_ref(sf).key)
        ('r', 3, (3,), ('s1', 1))
        >>> to_specforge_ref(from_specforge_ref(sf)) == sf
        True
    """
    sf = dict(ref.to_dict()["metadata"].get(SF_KEY) or {})
    meta = dict(sf.get("metadata") or {})
    extra = sf.get("spec_extra") or {}
    meta[TD_KEY] = {"generation": ref.generation, "store": ref.store, "checksum": ref.checksum,
                    "nbytes": ref.nbytes, "specs": [s.to_dict() for s in ref.specs]}
    return SFSampleRef(
        sample_id=ref.sample_id, run_id=str(sf.get("run_id", "unknown")), source_task_id=sf.get("source_task_id"),
        feature_store_uri=ref.store, feature_keys={s.name: f"{ref.sample_id}/{s.name}" for s in ref.specs},
        feature_specs={s.name: SFFeatureSpec(name=s.name, shape=s.shape, dtype=s.dtype, **extra.get(s.name, {}))
                       for s in ref.specs},
        strategy=sf.get("strategy", "eagle3"), schema_version=int(sf.get("schema_version", SCHEMA_VERSION)),
        target_model_version=str(sf.get("target_model_version", "unknown")),
        draft_weight_version=sf.get("draft_weight_version"),
        tokenizer_version=str(sf.get("tokenizer_version", "unknown")), num_tokens=int(sf.get("num_tokens", 0)),
        estimated_bytes=ref.nbytes, metadata=meta)


def from_specforge_ref(ref: SFSampleRef) -> SampleRef:
    """Our ``SampleRef`` behind a SpecForge ref made by :func:`to_specforge_ref`.

    Raises:
        ConfigError: the ref was not put through a torch_dataflow adapter.
    """
    td = ref.metadata.get(TD_KEY) if isinstance(ref.metadata, Mapping) else None
    if not isinstance(td, Mapping):
        raise ConfigError(f"SpecForge ref {ref.sample_id!r} ({ref.feature_store_uri}) was not written through "
                          f"torch_dataflow (its metadata has no {TD_KEY!r} entry): put its features with "
                          "SpecForgeBackend.feature_store.put, not with another SpecForge FeatureStore")
    sf: dict[str, Any] = {k: getattr(ref, k) for k in _SF_FIELDS}
    sf["metadata"] = {k: v for k, v in ref.metadata.items() if k != TD_KEY}
    extra = {n: {"target_repr": s.target_repr, "target_meta": dict(s.target_meta)}
             for n, s in ref.feature_specs.items() if s.target_repr}
    if extra:
        sf["spec_extra"] = extra
    return SampleRef(sample_id=ref.sample_id, generation=td["generation"], store=td["store"],
                     specs=tuple(FeatureSpec.from_dict(s) for s in td["specs"]), nbytes=td["nbytes"],
                     checksum=td["checksum"], metadata={SF_KEY: sf})
