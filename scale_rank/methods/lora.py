"""Plain LoRA: fixed rank r, lam fixed at 1, scale alpha / r; the baseline on the same code path."""
from __future__ import annotations

from ..config import LoRAConfig
from ..layer import AdaptiveLoRALayer
from .base import Method


class LoRA(Method):
    name = "lora"
    config: LoRAConfig

    allocates_ranks = False
    trains_lam = False

    @classmethod
    def site_capacity(cls, config: LoRAConfig, layer_index: int, n_layers: int) -> int:
        return config.r

    def init_layer(self, layer: AdaptiveLoRALayer) -> None:
        layer.init_plain_lora(self.config.alpha)
