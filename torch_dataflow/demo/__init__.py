"""``torch-dataflow demo``: a target model produces EAGLE3 features while a
Lightning trainer trains a draft head on them, through a feature store and a
ledger, exactly once.

Three processes on one machine, no servers by default:

* the **producer** (:mod:`._producer`) runs a tiny random-init Llama target
  (or ``--model PATH``) over synthetic prompts and writes each sample's
  features with :class:`~torch_dataflow.FeatureWriter`;
* the **trainer** (:mod:`._trainer`) trains
  :class:`~torch_dataflow.eagle3.Eagle3DraftModule` with ``lightning.Trainer``
  on a :class:`~torch_dataflow.FeatureStoreDataset` (online mode), acking each
  optimizer step and marking checkpoints durable, and logs every sample it
  trained on;
* this process, the **orchestrator** (:func:`run_demo`), draws progress bars
  from the ledger, restarts the trainer from its last checkpoint if it dies
  (``--crash-at-step`` kills it on purpose), and writes the closing summary
  with an exactly-once audit (:mod:`._audit`).

Example:
    >>> from torch_dataflow.demo import DemoConfig, run_demo
    >>> summary = run_demo(DemoConfig(workdir="td-demo", samples=256, seq_len=64))  # doctest: +SKIP
    >>> summary["exactly_once"]["ok"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

from ._audit import format_summary
from ._config import QUICK, DemoConfig
from ._run import run_demo

__all__ = ["QUICK", "DemoConfig", "format_summary", "run_demo"]
