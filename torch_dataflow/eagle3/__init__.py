"""EAGLE3 on torch_dataflow: SpecForge-exact batches, SpecForge directories, a target and a draft.

- :class:`Eagle3Collator` / :func:`eagle3_collate`: SpecForge's offline
  training batch from feature samples.
- :class:`SpecForgeDirectory`, :func:`import_directory`,
  :func:`write_specforge_directory`: SpecForge offline feature directories.
- :class:`Eagle3FeatureExtractor`, :func:`tiny_llama_target`,
  :func:`synthetic_prompts`: the producer side (needs ``transformers``,
  imported only when a target is built).
- :class:`Eagle3Draft` and, lazily (it imports ``lightning``),
  :class:`Eagle3DraftModule`.

Example:
    >>> from torch.utils.data import DataLoader
    >>> from torch_dataflow.eagle3 import Eagle3Collator, SpecForgeDirectory
    >>> loader = DataLoader(SpecForgeDirectory("/data/hs"), batch_size=4,
    ...                     collate_fn=Eagle3Collator(max_len=2048))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from .collate import BATCH_KEYS, FEATURE_KEYS, RESERVED_PREFIX, Eagle3Collator, eagle3_collate
from .draft import STEP_DECAY, Eagle3Draft, Eagle3Output, eagle3_step_loss
from .specforge import SpecForgeDirectory, import_directory, write_specforge_directory
from .target import TINY_LLAMA, Eagle3FeatureExtractor, default_aux_layers, synthetic_prompts, tiny_llama_target

__all__ = [
    "BATCH_KEYS",
    "FEATURE_KEYS",
    "RESERVED_PREFIX",
    "STEP_DECAY",
    "TINY_LLAMA",
    "Eagle3Collator",
    "Eagle3Draft",
    "Eagle3DraftModule",
    "Eagle3FeatureExtractor",
    "Eagle3Output",
    "SpecForgeDirectory",
    "default_aux_layers",
    "eagle3_collate",
    "eagle3_step_loss",
    "import_directory",
    "synthetic_prompts",
    "tiny_llama_target",
    "write_specforge_directory",
]


def __getattr__(name: str) -> Any:
    if name == "Eagle3DraftModule":
        from .lightning_module import Eagle3DraftModule

        return Eagle3DraftModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
