"""Conformance suites shipped with the package, so third-party backends can run them.

Importing this package imports pytest: it is meant for test code only.
"""

from __future__ import annotations

from .store_conformance import StoreConformance, assert_same_tensors, format1_blob, sample_tensors

__all__ = ["StoreConformance", "assert_same_tensors", "format1_blob", "sample_tensors"]
