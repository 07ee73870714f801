"""SpecForge integration: its offline layout, its runtime contracts and its capture output on torch_dataflow.

- :mod:`~torch_dataflow.specforge.directory`: SpecForge offline feature
  directories (:class:`SpecForgeDirectory`, :func:`import_directory`,
  :func:`write_specforge_directory`).
- :mod:`~torch_dataflow.specforge.store`: such a directory served in place
  (``specforge:///path``, :class:`SpecForgeDirStore`, :func:`register_directory`).
- :mod:`~torch_dataflow.specforge.offline`: the drop-in for SpecForge's offline
  data helpers (:func:`build_offline_eagle3_dataset`, :func:`prepare_dp_dataloaders`,
  :class:`CarryLeases`); see docs/specforge.md.
- :mod:`~torch_dataflow.specforge.runtime` and :mod:`~torch_dataflow.specforge.capture`:
  SpecForge's runtime contracts and capture output (imported by name).

Names are resolved on first use, so ``import torch_dataflow.specforge`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "SpecForgeDirectory": "directory",
    "import_directory": "directory",
    "write_specforge_directory": "directory",
    "SUFFIXES": "directory",
    "SpecForgeDirStore": "store",
    "register_directory": "store",
    "CarryLeases": "offline",
    "OfflineEagle3Pool": "offline",
    "SpecForgeLoader": "offline",
    "TrainedBatch": "offline",
    "build_offline_eagle3_dataset": "offline",
    "check_no_usp": "offline",
    "default_specforge_collator": "offline",
    "prepare_dp_dataloaders": "offline",
    "to_specforge_item": "offline",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
