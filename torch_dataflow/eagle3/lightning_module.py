"""A Lightning wrapper around :class:`~torch_dataflow.eagle3.draft.Eagle3Draft`.

Importing this module imports ``lightning``; ``import torch_dataflow.eagle3``
does not (it exposes :class:`Eagle3DraftModule` lazily).

Example:
    >>> import lightning as L  # doctest: +SKIP
    >>> module = Eagle3DraftModule(hidden_size=64, vocab_size=512, lm_head_weight=head)  # doctest: +SKIP
    >>> L.Trainer(max_steps=100).fit(module, loader)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning
import torch

from .draft import Eagle3Draft

__all__ = ["Eagle3DraftModule"]


class Eagle3DraftModule(lightning.LightningModule):
    """Trains an EAGLE3 draft head on SpecForge batches with AdamW.

    Logs ``train_loss`` (progress bar) and ``train_acc_{i}`` per test-time
    step. Batch keys beginning with ``"__"`` (leases, sample ids) are ignored
    here; an ack callback reads them.

    Args:
        hidden_size: the target's H.
        vocab_size: the target's vocabulary size.
        lm_head_weight: the target's output projection [V, H] (kept frozen).
        embed_weight: the target's input embeddings [V, H] (optional, frozen).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        **draft_kwargs: ``num_heads``, ``intermediate_size``, ``ttt_steps``
            of :class:`~torch_dataflow.eagle3.draft.Eagle3Draft`.

    Example:
        >>> m = Eagle3DraftModule(hidden_size=8, vocab_size=16, lm_head_weight=torch.zeros(16, 8), num_heads=2)
        >>> m.draft.ttt_steps
        2
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        vocab_size: int,
        lm_head_weight: torch.Tensor,
        embed_weight: torch.Tensor | None = None,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        **draft_kwargs: Any,
    ) -> None:
        super().__init__()
        # The weights are tensors (in the state dict as buffers), not hyperparameters.
        self.save_hyperparameters(ignore=["lm_head_weight", "embed_weight"])
        self.lr = lr
        self.weight_decay = weight_decay
        self.draft = Eagle3Draft(
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            lm_head_weight=lm_head_weight,
            embed_weight=embed_weight,
            **draft_kwargs,
        )

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return self.draft(batch).loss

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.draft(batch)
        size = int(batch["input_ids"].shape[0])
        self.log("train_loss", out.loss, prog_bar=True, batch_size=size)
        for i, acc in enumerate(out.step_accuracies):
            self.log(f"train_acc_{i}", acc, batch_size=size)
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.draft.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
