"""The public surface: curated exports, no optional imports, docstring examples run."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys

import pytest

import torch_dataflow


def test_import_pulls_no_optional_dependency() -> None:
    code = ("import sys, torch_dataflow; "
            "print(','.join(m for m in ('lightning', 'redis', 'mooncake', 'torchdata', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_all_is_sorted_and_importable() -> None:
    assert torch_dataflow.__all__ == sorted(torch_dataflow.__all__)
    for name in torch_dataflow.__all__:
        assert getattr(torch_dataflow, name) is not None


@pytest.mark.parametrize("module", [
    "torch_dataflow.refs", "torch_dataflow.uri", "torch_dataflow.auth", "torch_dataflow.codec",
    "torch_dataflow.producer", "torch_dataflow.dataset", "torch_dataflow.loader",
    "torch_dataflow.ledger", "torch_dataflow.ledger.base", "torch_dataflow.ledger.sqlite",
    "torch_dataflow.ledger.memory", "torch_dataflow.stores", "torch_dataflow.stores.base",
    "torch_dataflow.binding",
])
def test_docstring_examples(module: str) -> None:
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0, result
