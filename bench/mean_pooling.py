"""A masked mean over the last hidden states as the sentence vector of a BERT-style classifier.

all-MiniLM-L6-v2 (the benchmarks' pretrained encoder) was trained as a sentence encoder whose sentence vector
is the mean of its token states; its CLS pooler was never trained (zero bias, weights about N(0, 0.009)). A
classifier on the CLS pooler must first learn to route the sentence into the CLS token, which within a few
hundred steps happens on some seeds only (MRPC, 300 steps, LoRA: 77.3 / 77.6 / 69.6 over seeds 0-2, where
69.6 is near the majority class). With the model's own pooling every seed learns (bench/README.md).
"""
from __future__ import annotations

import torch
from torch import nn


class MaskedMeanPooler(nn.Module):
    """Stands in for the encoder's pooler: the mean of the hidden states over the tokens the attention mask
    keeps (all tokens without a mask). The encoder's forward pre-hook (`use_mean_pooling`) hands it the
    batch's mask."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden.mean(1)
        weights = self.mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _hand_over_mask(encoder: nn.Module, args, kwargs) -> None:
    encoder.pooler.mask = kwargs.get("attention_mask")


def use_mean_pooling(model: nn.Module) -> nn.Module:
    """Replace the pooler of a BERT-style sequence classifier (in place) by a masked mean of its last hidden
    states; the classifier head then reads the mean instead of the CLS token."""
    encoder = model.base_model
    if getattr(encoder, "pooler", None) is None:
        raise ValueError(f"{type(model).__name__} has no BERT-style pooler to replace")
    encoder.pooler = MaskedMeanPooler()
    encoder.register_forward_pre_hook(_hand_over_mask, with_kwargs=True)
    return model
