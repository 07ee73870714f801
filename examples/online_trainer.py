"""Online, disaggregated EAGLE3 — the trainer: a plain PyTorch loop, exactly once.

Trains an EAGLE3 draft head on the features ``online_producer.py`` writes,
while it writes them. Kill it at any moment and run it again with the same
arguments: it resumes from its checkpoint, and the ledger re-delivers exactly
the samples whose training died with it. See ``examples/README.md``.

    python examples/online_trainer.py --store file:///tmp/td/store --ledger sqlite:///tmp/td/ledger.db \\
        --checkpoint /tmp/td/draft.pt

The four lines that make it exactly-once are marked ``# <-``: collect the
batch's leases, ack them at the optimizer step, mark a checkpoint durable once
it is on disk, and reconcile once when (re)starting.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from torch_dataflow import FeatureLoader, FeatureStoreDataset
from torch_dataflow.acking import StepAcker
from torch_dataflow.eagle3 import Eagle3Collator, Eagle3Draft, Eagle3FeatureExtractor, tiny_llama_target


def save(path: Path, draft: Eagle3Draft, opt: torch.optim.Optimizer, acker: StepAcker) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"draft": draft.state_dict(), "opt": opt.state_dict(), "acker": acker.state_dict()}, tmp)
    os.replace(tmp, path)  # complete on disk, or not there at all


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--ledger", required=True)
    p.add_argument("--checkpoint", required=True, type=Path, help="draft + optimizer + ack state (resumed if present)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="the producer's seed (the draft needs the target's head)")
    p.add_argument("--model", default=None, help="the producer's --model")
    p.add_argument("--checkpoint-every", type=int, default=20, help="optimizer steps between checkpoints")
    p.add_argument("--idle-timeout", type=float, default=600.0, help="give up after this long without data")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    # The draft predicts with the target's frozen output head and embeddings.
    target = Eagle3FeatureExtractor(tiny_llama_target(seed=args.seed, path=args.model), progress=False)
    head, embed = target.lm_head_weight(), target.embed_weight()
    del target
    draft = Eagle3Draft(hidden_size=head.shape[1], vocab_size=head.shape[0], lm_head_weight=head, embed_weight=embed)
    opt = torch.optim.AdamW([q for q in draft.parameters() if q.requires_grad], lr=3e-3)

    ds = FeatureStoreDataset(args.store, args.ledger, batch_size=args.batch_size, idle_timeout=args.idle_timeout)
    loader = FeatureLoader(ds, batch_size=args.batch_size, collate_fn=Eagle3Collator(max_len=args.seq_len))
    acker = StepAcker(ds)
    if args.checkpoint.exists():
        state = torch.load(args.checkpoint, weights_only=True)
        draft.load_state_dict(state["draft"])
        opt.load_state_dict(state["opt"])
        acker.resume(from_state=state["acker"])  # <- reconcile: replay what the checkpoint does not hold
        print(f"resumed at step {acker.step}")
    else:
        acker.resume(None)  # <- a fresh start (replays samples a crashed run trained without a checkpoint)

    bar = tqdm(desc="trained", unit="batch")
    for batch in loader:  # ends when the producer has closed the stream and everything is handed out
        acker.add(batch)  # <- this batch's leases go into the next optimizer step
        loss = draft(batch).loss
        opt.zero_grad()
        loss.backward()
        with acker.stepping():  # <- ack the collected leases at this step once opt.step() returns
            opt.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", step=acker.step)
        if acker.step % args.checkpoint_every == 0:
            save(args.checkpoint, draft, opt, acker)
            acker.checkpoint_written(acker.step)  # <- durable: bytes freed
    bar.close()
    save(args.checkpoint, draft, opt, acker)
    acker.checkpoint_written(acker.step)
    acker.finish()  # free what was kept for a resume from the previous checkpoint; end the session
    c = ds.ledger.counts()
    print(f"done at step {acker.step}: {c.durable} samples durable, {c.pending} pending, {c.leased} leased")


if __name__ == "__main__":
    main()
