"""Online, disaggregated EAGLE3 — the producer: a target model writes features.

Run it beside ``online_trainer.py`` (another shell, another host) with the same
``--store`` and ``--ledger``; the trainer trains while this writes, and stops
when this closes the stream. See ``examples/README.md``.

    python examples/online_producer.py --store file:///tmp/td/store --ledger sqlite:///tmp/td/ledger.db

Each sample is the dict SpecForge's ``prepare_hidden_states.py`` saves
(``input_ids``, ``loss_mask``, ``hidden_state``, ``aux_hidden_state``). The
target is a tiny random-init Llama (no download) unless ``--model`` names a
local Hugging Face model directory; the trainer must use the same target.
"""

from __future__ import annotations

import argparse
import socket
import time

import torch

from torch_dataflow import FeatureWriter
from torch_dataflow.eagle3 import Eagle3FeatureExtractor, synthetic_prompts, tiny_llama_target


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="file:///shared/dir or mooncake://master:50051")
    p.add_argument("--ledger", required=True, help="sqlite:///shared/ledger.db or redis://host:6379/0")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="the trainer must use the same seed (same target)")
    p.add_argument("--model", default=None, help="a local Hugging Face model directory (default: tiny Llama)")
    p.add_argument("--max-pending", type=int, default=512, help="backpressure: undelivered samples at most")
    p.add_argument(
        "--wait-consumed",
        action="store_true",
        help="stay alive until every sample is trained and durable (Mooncake keeps a writer's bytes in "
        "the writer's memory unless a store server holds them)",
    )
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    model = tiny_llama_target(seed=args.seed, path=args.model)
    extractor = Eagle3FeatureExtractor(model, batch_size=8)  # shows a progress bar
    vocab = int(extractor.lm_head_weight().shape[0])
    prompts = synthetic_prompts(
        args.samples, vocab=vocab, min_len=args.seq_len // 2, max_len=args.seq_len, seed=args.seed
    )
    name = f"producer@{socket.gethostname()}"
    # A stable name and resume=True: restarted after a crash, this producer generates only the
    # ids no earlier run committed, so nothing already trained is generated or trained again.
    with FeatureWriter(args.store, args.ledger, name=name, max_pending=args.max_pending, resume=True) as writer:
        todo = [int(s[1:]) for s in writer.missing(f"p{i:06d}" for i in range(len(prompts)))]
        for i, features in zip(todo, extractor.iter_extract([prompts[i] for i in todo]), strict=True):
            writer.put(f"p{i:06d}", features)
    # Leaving the `with` block closed the stream: the trainer ends once it has everything.
    print(f"{name}: committed {writer.written} samples, {writer.bytes_written / 1e6:.1f} MB", flush=True)
    if args.wait_consumed:
        ledger = writer.ledger
        while (c := ledger.counts()).pending + c.leased + c.trained:
            time.sleep(1.0)
        print(f"{name}: all samples trained and durable; exiting", flush=True)


if __name__ == "__main__":
    main()
