"""Plain LoRA: fixed rank r, lam fixed at 1, scale alpha / r; the baseline on the same code path."""
from __future__ import annotations

from ..config import LoRAConfig
from ..inject import Site
from ..layer import AdaptiveLoRALayer
from .base import Method


class LoRA(Method):
    name = "lora"
    config: LoRAConfig

    def capacity(self, site: Site, n_layers: int) -> int:
        return self.config.r

    def init_layer(self, layer: AdaptiveLoRALayer) -> None:
        layer.init_kaiming_zero()
        layer.lora_lam.requires_grad_(False)
        layer.scale.fill_(self.config.alpha / layer.r_max)
