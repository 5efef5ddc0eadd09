"""Values derived from a tensor and cached until that tensor changes."""
from __future__ import annotations

import torch


class DerivedFrom:
    """A value computed from a tensor and kept until that tensor is replaced, given new storage, or edited in
    place (every in-place edit bumps its version counter). It holds the tensor itself, so a new tensor cannot
    pass for the old one."""

    def __init__(self, compute):
        self.compute = compute
        self.key: tuple | None = None
        self.value = None

    def of(self, tensor: torch.Tensor):
        key = (tensor, tensor.data_ptr(), tensor._version)
        if self.key is None or self.key[0] is not tensor or self.key[1:] != key[1:]:
            self.value = self.compute(tensor)
            self.key = key
        return self.value
