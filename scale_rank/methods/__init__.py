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


def method_class(name: str) -> type[Method]:
    """The Method class registered as `name` (a clear error for an unknown one)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def build_method(config: MethodConfig, total_steps: int | None) -> Method:
    cls = method_class(config.name)
    config.validate(total_steps)
    return cls(config, total_steps)


__all__ = ["METHODS", "Method", "build_method", "method_class", "LoRA", "AdaLoRA", "SoRA", "IncreLoRA", "PRILoRA"]
