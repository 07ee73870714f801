"""Producer side of EAGLE3: run a target LM and emit per-sample features.

:class:`Eagle3FeatureExtractor` runs a Hugging Face causal LM with
``output_hidden_states=True`` and returns, per sample, the dict SpecForge's
``prepare_hidden_states.py`` saves: ``input_ids`` [S], ``loss_mask`` [S],
``hidden_state`` [1, S, H] (the final state, after the final norm) and
``aux_hidden_state`` [1, S, 3H] (the outputs of three decoder layers,
concatenated low -> mid -> high).

Layer rule (SpecForge's default): decoder layers ``[1, L//2 - 1, L - 4]``
(0-based). HF's ``hidden_states`` has L + 1 entries, entry 0 being the
embeddings, so layer ``k``'s output is ``hidden_states[k + 1]`` — for the
default, ``hidden_states[2]``, ``hidden_states[L//2]``, ``hidden_states[L-3]``.
The last entry, ``hidden_states[L]``, is after the final norm (that is the
``hidden_state`` feature), so layer ``L - 1``'s raw output is not available
and ``aux_layers`` must lie in ``[0, L - 2]``.

Example:
    >>> from torch_dataflow.eagle3 import Eagle3FeatureExtractor, synthetic_prompts, tiny_llama_target
    >>> model = tiny_llama_target(seed=0)  # doctest: +SKIP
    >>> ex = Eagle3FeatureExtractor(model, progress=False)  # doctest: +SKIP
    >>> ex.hidden_state_indices  # doctest: +SKIP
    (2, 4, 5)
    >>> feats = ex.extract(synthetic_prompts(4, vocab=512, min_len=8, max_len=16, seed=0))  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..errors import ConfigError

__all__ = [
    "TINY_LLAMA",
    "Eagle3FeatureExtractor",
    "default_aux_layers",
    "synthetic_prompts",
    "tiny_llama_target",
]

TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    # The default 0.02 gives near-uniform outputs, on which a draft barely learns.
    "initializer_range": 0.2,
}
"""The ``LlamaConfig`` of the no-download demo target (0.36M parameters)."""

TokenSeq = torch.Tensor | Sequence[int]


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """SpecForge's default EAGLE3 capture layers for an ``num_layers``-layer target.

    Example:
        >>> default_aux_layers(32)
        (1, 15, 28)
    """
    if num_layers < 5:
        raise ConfigError(f"the default aux-layer rule needs >= 5 decoder layers, got {num_layers}")
    return (1, num_layers // 2 - 1, num_layers - 4)


def tiny_llama_target(seed: int = 0, path: str | os.PathLike[str] | None = None, **kwargs: Any) -> torch.nn.Module:
    """The demo target: a random-init tiny Llama, or a real model from ``path``.

    Args:
        seed: seeds the random init (same seed, same weights).
        path: a local model directory (``from_pretrained``, never a download
            of weights by this library); ``kwargs`` go to ``from_pretrained``
            (e.g. ``gguf_file=...``).

    Returns:
        The model in eval mode, gradients off.

    Example:
        >>> model = tiny_llama_target(seed=0)  # doctest: +SKIP
        >>> model.config.num_hidden_layers  # doctest: +SKIP
        8
    """
    import transformers

    model: torch.nn.Module
    if path is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(path), **kwargs)
    else:
        if kwargs:
            raise TypeError(f"keyword arguments apply to a model path only: {sorted(kwargs)}")
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))
        finally:
            torch.random.set_rng_state(state)
    model.eval()
    model.requires_grad_(False)
    return model


def synthetic_prompts(n: int, vocab: int, min_len: int, max_len: int, seed: int) -> list[torch.Tensor]:
    """Token sequences with learnable structure (int64 [S] each, ids in ``[1, vocab)``).

    Tokens follow a sparse, seeded Markov chain: each token has four likely
    successors (one of them 70% of the time), so the next token is largely
    predictable from the current one. Id 0 is left free as the pad id.

    Example:
        >>> seqs = synthetic_prompts(3, vocab=512, min_len=4, max_len=8, seed=0)
        >>> len(seqs), all(4 <= len(s) <= 8 for s in seqs)
        (3, True)
    """
    if vocab < 3 or not 1 <= min_len <= max_len or n < 0:
        raise ConfigError(f"need vocab >= 3 and 1 <= min_len <= max_len, got {vocab}, {min_len}, {max_len}")
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(1, vocab, (vocab, 4), generator=gen)
    weights = torch.tensor([0.7, 0.1, 0.1, 0.1])
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        seq = torch.empty(length, dtype=torch.long)
        seq[0] = int(torch.randint(1, vocab, (1,), generator=gen))
        choices = torch.multinomial(weights, length, replacement=True, generator=gen)
        for t in range(1, length):
            seq[t] = successors[seq[t - 1], choices[t]]
        out.append(seq)
    return out


class Eagle3FeatureExtractor:
    """Runs a HF causal LM and returns EAGLE3 features per sample.

    Args:
        model: a ``transformers`` causal LM (``output_hidden_states`` support).
        aux_layers: three 0-based decoder layers; default SpecForge's rule
            (:func:`default_aux_layers`).
        batch_size: samples per forward pass (right-padded, attention-masked).
        dtype: dtype of the hidden-state features (SpecForge saves bf16).
        pad_token_id: the id padding positions get in the forward pass.
        progress: show a tqdm bar.

    Example:
        >>> ex = Eagle3FeatureExtractor(tiny_llama_target(0), batch_size=4)  # doctest: +SKIP
        >>> f = ex.extract([torch.tensor([3, 9, 4])])[0]  # doctest: +SKIP
        >>> f["aux_hidden_state"].shape  # doctest: +SKIP
        torch.Size([1, 3, 192])
    """

    def __init__(
        self,
        model: torch.nn.Module,
        aux_layers: Sequence[int] | None = None,
        *,
        batch_size: int = 8,
        dtype: torch.dtype = torch.bfloat16,
        pad_token_id: int = 0,
        progress: bool = True,
    ) -> None:
        config = getattr(model, "config", None)
        config = getattr(config, "text_config", None) or config
        num_layers = getattr(config, "num_hidden_layers", None)
        if not isinstance(num_layers, int):
            raise ConfigError("model.config has no num_hidden_layers: not a transformers causal LM?")
        layers = tuple(default_aux_layers(num_layers) if aux_layers is None else (int(x) for x in aux_layers))
        if len(layers) != 3 or any(not 0 <= x <= num_layers - 2 for x in layers):
            raise ConfigError(
                f"aux_layers must be three decoder layers in [0, {num_layers - 2}] "
                f"(layer {num_layers - 1}'s output is only exposed after the final norm), got {list(layers)}"
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.num_layers = num_layers
        self.aux_layers = layers
        self.batch_size = int(batch_size)
        self.dtype = dtype
        self.pad_token_id = int(pad_token_id)
        self.progress = progress

    @property
    def hidden_state_indices(self) -> tuple[int, ...]:
        """Indices into HF's ``output.hidden_states`` of the three aux layers."""
        return tuple(x + 1 for x in self.aux_layers)

    def lm_head_weight(self) -> torch.Tensor:
        """A detached float32 copy of the target's output projection ([V, H])."""
        head: Any = self.model.get_output_embeddings()  # type: ignore[operator]
        return head.weight.detach().float().clone()

    def embed_weight(self) -> torch.Tensor:
        """A detached float32 copy of the target's input embeddings ([V, H])."""
        embed: Any = self.model.get_input_embeddings()  # type: ignore[operator]
        return embed.weight.detach().float().clone()

    @torch.no_grad()
    def _forward(self, ids: list[torch.Tensor], masks: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        device = next(self.model.parameters()).device
        longest = max(len(x) for x in ids)
        batch = torch.full((len(ids), longest), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, x in enumerate(ids):
            batch[row, : len(x)] = x
            attention[row, : len(x)] = 1
        out = self.model(
            input_ids=batch.to(device), attention_mask=attention.to(device), output_hidden_states=True, use_cache=False
        )
        states = out.hidden_states
        if len(states) != self.num_layers + 1:
            raise ConfigError(f"expected {self.num_layers + 1} hidden states from the model, got {len(states)}")
        aux = torch.cat([states[k] for k in self.hidden_state_indices], dim=-1)
        final = states[-1]
        samples = []
        for row, (x, m) in enumerate(zip(ids, masks, strict=True)):
            s = len(x)
            samples.append(
                {
                    "input_ids": x.clone(),
                    "loss_mask": m.clone(),
                    "hidden_state": final[row : row + 1, :s].to("cpu", self.dtype).clone(),
                    "aux_hidden_state": aux[row : row + 1, :s].to("cpu", self.dtype).clone(),
                }
            )
        return samples

    def iter_extract(
        self, input_ids: Sequence[TokenSeq], loss_masks: Sequence[TokenSeq] | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield one feature dict per sequence, in order, computing a batch at a time.

        Args:
            input_ids: token sequences (1-D tensors or lists of ints).
            loss_masks: per-token 0/1 masks (default: all ones).

        Raises:
            ConfigError: an empty sequence, or a mask whose length differs.
        """
        from tqdm.auto import tqdm

        if loss_masks is not None and len(loss_masks) != len(input_ids):
            raise ConfigError(f"{len(loss_masks)} loss masks for {len(input_ids)} sequences")
        bar = tqdm(total=len(input_ids), desc="target features", unit="sample", disable=not self.progress)
        try:
            for start in range(0, len(input_ids), self.batch_size):
                ids, masks = [], []
                for i in range(start, min(start + self.batch_size, len(input_ids))):
                    x = torch.as_tensor(input_ids[i], dtype=torch.long).reshape(-1)
                    if x.numel() == 0:
                        raise ConfigError(f"sequence {i} is empty")
                    if loss_masks is None:
                        m = torch.ones_like(x)
                    else:
                        m = torch.as_tensor(loss_masks[i], dtype=torch.long).reshape(-1)
                    if m.shape != x.shape:
                        raise ConfigError(f"sequence {i}: loss mask length {m.numel()} != {x.numel()} tokens")
                    ids.append(x)
                    masks.append(m)
                yield from self._forward(ids, masks)
                bar.update(len(ids))
        finally:
            bar.close()

    def extract(
        self, input_ids: Sequence[TokenSeq], loss_masks: Sequence[TokenSeq] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """All feature dicts at once (see :meth:`iter_extract`)."""
        return list(self.iter_extract(input_ids, loss_masks))
