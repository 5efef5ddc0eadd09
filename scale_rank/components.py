"""Bookkeeping of adapter components (one rank-1 term each) across all modules, as flat vectors."""
from __future__ import annotations

import torch

from .layer import AdaptiveLoRALayer


class ComponentLayout:
    """Module k owns components [offset[k], offset[k] + r_max[k]) of every flat per-component vector."""

    def __init__(self, layers: list[AdaptiveLoRALayer]):
        self.capacity = torch.tensor([layer.r_max for layer in layers], dtype=torch.long)
        self.offset = torch.cumsum(self.capacity, 0) - self.capacity
        # host copies: per-step index arithmetic reads no tensor back
        self.capacities, self.offsets = self.capacity.tolist(), self.offset.tolist()
        self.n_modules = len(layers)
        self.n_components = int(self.capacity.sum())
        self.module_of = torch.repeat_interleave(torch.arange(self.n_modules), self.capacity)
        self.d_in = torch.repeat_interleave(torch.tensor([l.d_in for l in layers]), self.capacity)
        self.d_out = torch.repeat_interleave(torch.tensor([l.d_out for l in layers]), self.capacity)
        self.position = torch.arange(self.n_components) - self.offset[self.module_of]

    def per_module_sum(self, values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.n_modules, dtype=values.dtype)
        return out.index_add_(0, self.module_of, values.cpu())

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        return list(values.split(self.capacities))

    def component_index(self, kind: str, module: int, start: int, end: int, r: int, d_in: int) -> torch.Tensor:
        """Component id of each flat element [start, end) of a module's A, B or lam."""
        flat = torch.arange(start, end)
        local = {"A": flat // d_in, "B": flat % r, "lam": flat}[kind]
        return local + self.offsets[module]
