"""The token embedding and the vocabulary head.

The embedding may carry an additive per-token term (LoRA's, as LinearLayer.delta); the head is a LinearLayer
(so quantization methods and LoRA reach it as any projection), which a tied model shares with the embedding:
it owns no weight of its own, and the loader ties the two once the model has its storage (moving a model
between devices unties parameters)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from plexus.models.layers.linear import LinearBuilder, LinearLayer


class VocabEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(vocab_size, hidden_size)
        self.delta: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = super().forward(input_ids)  # [T, hidden]
        if self.delta is not None:
            hidden = hidden + self.delta(input_ids).to(hidden.dtype)
        return hidden


def lm_head(linear: LinearBuilder, hidden_size: int, vocab_size: int, tied: bool) -> LinearLayer:
    """The head; tied: without a weight of its own (tie_head gives it the embedding's)."""
    head = linear("lm_head", hidden_size, [vocab_size], bias=False)
    if tied:
        del head.weight
    return head


def tie_head(head: LinearLayer, embedding: nn.Embedding) -> None:
    head.weight = embedding.weight
    head.mark_loaded("weight")
