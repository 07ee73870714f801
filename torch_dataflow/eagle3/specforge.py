"""Moved to :mod:`torch_dataflow.specforge.directory`; these names stay importable
from here and from :mod:`torch_dataflow.eagle3`."""

from __future__ import annotations

from ..specforge.directory import (
    SUFFIXES,
    SpecForgeDirectory,
    _list_feature_files,
    _load,
    import_directory,
    write_specforge_directory,
)

__all__ = ["SUFFIXES", "SpecForgeDirectory", "import_directory", "write_specforge_directory"]
_ = (_list_feature_files, _load)  # re-exported for code that imported the private helpers
