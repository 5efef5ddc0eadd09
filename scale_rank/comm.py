"""The collectives the controller uses; no-ops without a process group. Counts bytes moved."""
from __future__ import annotations

import torch
import torch.distributed as dist


class Collective:
    def __init__(self, group=None):
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if self.active and dist.get_backend(group) == "nccl" else torch.device("cpu")
        self.bytes_moved = 0
        self.calls = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self._count(tensor)
        if self.active and self.world_size > 1:
            moved = tensor.to(self.device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=self.group)
            tensor.copy_(moved)
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` on every rank."""
        self._count(tensor)
        if self.active and self.world_size > 1:
            moved = tensor.to(self.device)
            dist.broadcast(moved, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                           group=self.group)
            tensor.copy_(moved)
        return tensor

    def _count(self, tensor: torch.Tensor) -> None:
        self.calls += 1
        self.bytes_moved += tensor.numel() * tensor.element_size()


def means_over_ranks(values: list[torch.Tensor]) -> list[float]:
    """Each rank's scalars averaged over all ranks: one all_reduce, one read back to the host (collective:
    every rank calls it)."""
    if not values:
        return []
    stacked = torch.stack([v.detach().float().reshape(()) for v in values])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return stacked.tolist()
