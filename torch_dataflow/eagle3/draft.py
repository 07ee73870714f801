"""A tiny EAGLE3-style draft head and its training loss, in plain PyTorch.

The draft reads a SpecForge batch (see :mod:`torch_dataflow.eagle3.collate`):
it projects the three concatenated target layers (``hidden_state``, [B, N, 3H])
to H with ``fc``, mixes them with the embedding of the *next* token in one
small causal decoder block, and predicts the target's distribution one token
further on. The teacher is ``softmax(lm_head(target))``, with ``lm_head`` a
frozen copy of the target's output projection given at construction.

Loss (EAGLE3, as SpecForge computes it): with ``p = softmax(target_logits[..., t2d])``
and ``position_mask = loss_mask * t2d[argmax target_logits]``, each test-time
step ``i`` costs ``-(position_mask * p * log_softmax(draft_logits)).sum(-1).mean()``,
and the total is ``sum(0.8**i * loss_i)``. The batch is unshifted; every step
shifts input ids, teacher and masks one position left (so step 0 predicts
position t + 1's target from the state at t and token t + 1), and each step
after the first feeds the draft its own previous output instead of ``fc(aux)``.
The vocabulary map ``t2d`` is the identity (draft vocab = target vocab).

Example:
    >>> import torch
    >>> V, H = 32, 8
    >>> draft = Eagle3Draft(hidden_size=H, vocab_size=V, lm_head_weight=torch.randn(V, H), num_heads=2)
    >>> batch = {"input_ids": torch.randint(0, V, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long),
    ...          "loss_mask": torch.ones(2, 5, dtype=torch.long), "hidden_state": torch.randn(2, 5, 3 * H),
    ...          "target": torch.randn(2, 5, H)}
    >>> out = draft(batch)
    >>> out.loss.shape, len(out.step_losses)
    (torch.Size([]), 2)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["STEP_DECAY", "Eagle3Draft", "Eagle3Output", "eagle3_step_loss", "shift_left"]

STEP_DECAY = 0.8
"""Weight ratio between consecutive test-time steps (EAGLE3's 0.8**i)."""


@dataclass(frozen=True)
class Eagle3Output:
    """What :meth:`Eagle3Draft.forward` returns.

    Attributes:
        loss: ``sum(0.8**i * step_losses[i])``, the value to backpropagate.
        step_losses: the loss of each test-time step (with graph).
        step_accuracies: per step, how often the draft's argmax is the
            target's argmax on loss positions (detached floats in [0, 1]).
    """

    loss: torch.Tensor
    step_losses: tuple[torch.Tensor, ...]
    step_accuracies: tuple[float, ...]


def shift_left(x: torch.Tensor) -> torch.Tensor:
    """Shift dim 1 one place left, filling the last position with zeros.

    Example:
        >>> shift_left(torch.tensor([[1, 2, 3]])).tolist()
        [[2, 3, 0]]
    """
    return torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)


def eagle3_step_loss(draft_logits: torch.Tensor, target_p: torch.Tensor, position_mask: torch.Tensor) -> torch.Tensor:
    """One test-time step's loss: ``-(position_mask * target_p * log_softmax(logits)).sum(-1).mean()``.

    Args:
        draft_logits: [B, N, V_draft].
        target_p: the teacher distribution over the draft vocab, [B, N, V_draft].
        position_mask: [B, N] or [B, N, 1], 1 where the position counts.

    Example:
        >>> p = torch.full((1, 2, 4), 0.25)
        >>> round(float(eagle3_step_loss(torch.zeros(1, 2, 4), p, torch.ones(1, 2))), 4)
        1.3863
    """
    if position_mask.dim() == 2:
        position_mask = position_mask[..., None]
    logp = F.log_softmax(draft_logits.float(), dim=-1)
    return -(position_mask * target_p * logp).sum(-1).mean()


class _Block(nn.Module):
    """One causal decoder block whose attention reads [embedding ; hidden] (2H), as EAGLE3's."""

    def __init__(self, hidden: int, heads: int, intermediate: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"hidden_size {hidden} is not divisible by num_heads {heads}")
        self.heads = heads
        self.embed_norm = nn.RMSNorm(hidden)
        self.hidden_norm = nn.RMSNorm(hidden)
        self.qkv = nn.Linear(2 * hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)
        self.mlp_norm = nn.RMSNorm(hidden)
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        b, n, h = hidden.shape
        x = torch.cat([self.embed_norm(embeds), self.hidden_norm(hidden)], dim=-1)
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        causal = torch.ones(n, n, dtype=torch.bool, device=hidden.device).tril()
        mask = causal[None, None] & key_valid[:, None, None, :]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        hidden = hidden + self.out(attn.transpose(1, 2).reshape(b, n, h))
        gate, up = self.gate_up(self.mlp_norm(hidden)).chunk(2, dim=-1)
        return hidden + self.down(F.silu(gate) * up)


class Eagle3Draft(nn.Module):
    """A one-block EAGLE3 draft head over the target's vocabulary.

    Args:
        hidden_size: the target's H (the batch's ``target`` width; aux is 3H).
        vocab_size: the target's vocabulary size.
        lm_head_weight: the target's output projection [vocab_size, H]; a
            frozen copy makes the teacher logits ``lm_head(target)``.
        embed_weight: the target's input embeddings [vocab_size, H]; a frozen
            copy is used if given (as EAGLE3 does), else the draft learns its own.
        num_heads: attention heads of the block.
        intermediate_size: MLP width (default 2H).
        ttt_steps: test-time-training steps (1-3 keeps it cheap).

    Example:
        >>> d = Eagle3Draft(hidden_size=64, vocab_size=512, lm_head_weight=torch.zeros(512, 64))
        >>> d.fc.in_features, d.lm_head.out_features
        (192, 512)
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        vocab_size: int,
        lm_head_weight: torch.Tensor,
        embed_weight: torch.Tensor | None = None,
        num_heads: int = 4,
        intermediate_size: int | None = None,
        ttt_steps: int = 2,
    ) -> None:
        super().__init__()
        if tuple(lm_head_weight.shape) != (vocab_size, hidden_size):
            raise ConfigError(
                f"lm_head_weight must be [vocab_size, hidden_size] = [{vocab_size}, {hidden_size}], "
                f"got {list(lm_head_weight.shape)}"
            )
        if ttt_steps < 1:
            raise ConfigError(f"ttt_steps must be >= 1, got {ttt_steps}")
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.ttt_steps = int(ttt_steps)
        self.fc = nn.Linear(3 * hidden_size, hidden_size, bias=False)
        self.embed = nn.Embedding(vocab_size, hidden_size)
        if embed_weight is not None:
            if tuple(embed_weight.shape) != (vocab_size, hidden_size):
                raise ConfigError(f"embed_weight must be [{vocab_size}, {hidden_size}], got {list(embed_weight.shape)}")
            with torch.no_grad():
                self.embed.weight.copy_(embed_weight.float())
            self.embed.weight.requires_grad_(False)
        self.block = _Block(hidden_size, num_heads, intermediate_size or 2 * hidden_size)
        self.norm = nn.RMSNorm(hidden_size)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.target_head: torch.Tensor
        self.t2d: torch.Tensor
        self.register_buffer("target_head", lm_head_weight.detach().float().clone())
        # Identity vocabulary map: every target token is in the draft vocab.
        self.register_buffer("t2d", torch.ones(vocab_size, dtype=torch.bool))

    def teacher(self, target: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(target_p, position_mask)`` from the target's final hidden state."""
        with torch.no_grad():
            logits = F.linear(target.float(), self.target_head)
            target_p = F.softmax(logits[..., self.t2d], dim=-1)
            position_mask = loss_mask.float() * self.t2d[logits.argmax(-1)].float()
        return target_p, position_mask

    def forward(self, batch: Mapping[str, Any]) -> Eagle3Output:
        """The EAGLE3 loss of a SpecForge batch (extra keys such as ``__lease__`` ignored).

        Raises:
            ConfigError: a batch key is missing or has the wrong width.
        """
        missing = [k for k in ("input_ids", "attention_mask", "loss_mask", "hidden_state", "target") if k not in batch]
        if missing:
            raise ConfigError(f"batch is missing {missing}")
        aux, target = batch["hidden_state"], batch["target"]
        if aux.shape[-1] != 3 * self.hidden_size or target.shape[-1] != self.hidden_size:
            raise ConfigError(
                f"draft expects hidden_state width {3 * self.hidden_size} and target width {self.hidden_size}, "
                f"got {aux.shape[-1]} and {target.shape[-1]}"
            )
        device = self.fc.weight.device
        input_ids = batch["input_ids"].to(device)
        key_valid = batch["attention_mask"].to(device).bool()
        target_p, position_mask = self.teacher(target.to(device), batch["loss_mask"].to(device))
        hidden = self.fc(aux.to(device, torch.float32))
        losses, accs = [], []
        for _ in range(self.ttt_steps):
            input_ids, target_p, position_mask = shift_left(input_ids), shift_left(target_p), shift_left(position_mask)
            hidden = self.block(self.embed(input_ids), hidden, key_valid)
            logits = self.lm_head(self.norm(hidden))
            losses.append(eagle3_step_loss(logits, target_p, position_mask))
            with torch.no_grad():
                hits = (logits.argmax(-1) == target_p.argmax(-1)).float() * position_mask
                accs.append(float(hits.sum() / position_mask.sum().clamp_min(1.0)))
        total = torch.stack([STEP_DECAY**i * loss for i, loss in enumerate(losses)]).sum()
        return Eagle3Output(loss=total, step_losses=tuple(losses), step_accuracies=tuple(accs))
