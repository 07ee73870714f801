"""The demo's producer process: a target model writing EAGLE3 features."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import torch

from ._config import DemoConfig

__all__ = ["produce", "sample_id"]


def sample_id(i: int) -> str:
    """The id of the demo's ``i``-th training sample."""
    return f"s{i:06d}"


def _atomic_save(obj: Any, path: os.PathLike[str] | str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def produce(config: dict[str, Any], stop: Any) -> None:
    """Process body: load the target, publish its head, stream features, close.

    The target's output projection and input embeddings (which the draft needs
    frozen) and the features of a held-out prompt set go to
    ``DemoConfig.target_file`` first; then every training sample is put and
    committed in order. After closing the stream the process stays alive until
    ``stop`` is set, because a store may keep a writer's bytes in the writer's
    memory (Mooncake segments).

    Args:
        config: ``DemoConfig.to_dict()`` (plain data, so it crosses ``spawn``).
        stop: a ``multiprocessing`` Event set by the orchestrator when training is over.
    """
    from ..eagle3 import Eagle3FeatureExtractor, synthetic_prompts, tiny_llama_target
    from ..producer import FeatureWriter

    cfg = DemoConfig(**config)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(cfg.threads)
    started = time.monotonic()
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    model = tiny_llama_target(seed=cfg.seed, path=cfg.model, **kwargs)
    extractor = Eagle3FeatureExtractor(model, batch_size=8, progress=False)
    vocab = int(extractor.lm_head_weight().shape[0])
    # One Markov chain (drawn from the seed): the first prompts are held out, never trained on.
    prompts = synthetic_prompts(
        cfg.heldout + cfg.samples, vocab=vocab, min_len=max(2, cfg.seq_len // 2), max_len=cfg.seq_len, seed=cfg.seed
    )
    heldout = extractor.extract(prompts[: cfg.heldout])
    _atomic_save(
        {"lm_head": extractor.lm_head_weight(), "embed": extractor.embed_weight(), "heldout": heldout}, cfg.target_file
    )
    prompts = prompts[cfg.heldout :]
    ready = time.monotonic()
    writer = FeatureWriter(cfg.store_uri, cfg.ledger_uri, name="demo-producer", max_pending=cfg.max_pending)
    for i, features in enumerate(extractor.iter_extract(prompts)):
        writer.put(sample_id(i), features, {"prompt": i})
    writer.close()
    done = time.monotonic()
    stats = {
        "written": writer.written,
        "bytes": writer.bytes_written,
        "seconds": done - ready,
        "load_seconds": ready - started,
        "backpressure_seconds": writer.waited_s,
        "target": cfg.model or "tiny-llama (random init)",
        "vocab": vocab,
        "hidden": int(extractor.lm_head_weight().shape[1]),
    }
    tmp = f"{cfg.producer_file}.tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f)
    os.replace(tmp, cfg.producer_file)
    stop.wait(timeout=24 * 3600)
