"""Rank-allocation methods and the name -> class registry."""
from __future__ import annotations

from ..config import ConfigError, MethodConfig
from .adalora import AdaLoRA
from .base import Method
from .increlora import IncreLoRA
from .lora import LoRA
from .prilora import PRILoRA
from .sora import SoRA

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (LoRA, AdaLoRA, SoRA, IncreLoRA, PRILoRA)}


def build_method(config: MethodConfig, total_steps: int | None) -> Method:
    if config.name not in METHODS:
        raise ConfigError(f"unknown method {config.name!r}; choose one of {sorted(METHODS)}")
    config.validate(total_steps)
    return METHODS[config.name](config, total_steps)


__all__ = ["METHODS", "Method", "build_method", "LoRA", "AdaLoRA", "SoRA", "IncreLoRA", "PRILoRA"]
