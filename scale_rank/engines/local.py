"""One process, and DDP: every rank holds the whole model, so the checkpoint is one file written by rank 0."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..shards import ShardAccess, WholeTensorAccess
from .base import unwrapped_name
from .torch_engine import TorchEngine


class LocalEngine(TorchEngine):
    """One process: the model unwrapped, every tensor whole."""

    kind = "single"

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.proc.world_size != 1:
            raise ValueError(f"engine 'single' is one process, but world_size is {self.proc.world_size}; use "
                             "'ddp', 'fsdp2', 'fsdp1' or 'deepspeed' for multi-process training")
        return model

    def _build_access(self) -> ShardAccess:
        return WholeTensorAccess(self.proc.rank, self.proc.world_size)

    def _full_state(self) -> dict[str, torch.Tensor]:
        return {unwrapped_name(k): v.detach().cpu() for k, v in self.module.state_dict().items()}

    def save_state(self, directory: Path) -> None:
        """`engine.pt` (rank 0): the trainable tensors, optimizer, schedule and loss scaler."""
        if not self.proc.is_main:
            return
        wanted = set(self.trainable_names())
        state = {k: v for k, v in self.module.state_dict().items() if unwrapped_name(k) in wanted}
        torch.save({"model": state, "optimizer": self.optimizer.state_dict(), **self.schedule_state()},
                   directory / "engine.pt")

    def load_state(self, directory: Path) -> None:
        saved = torch.load(directory / "engine.pt", map_location=self.proc.device, weights_only=False)
        missing = set(self.trainable_names()) - {unwrapped_name(k) for k in saved["model"]}
        if missing:
            raise ValueError(f"checkpoint {directory} lacks {sorted(missing)[:3]}...: it comes from another "
                             "model or method")
        self.module.load_state_dict(saved["model"], strict=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.load_schedule_state(saved)


class DDPEngine(LocalEngine):
    """DistributedDataParallel: the one-process engine, with gradients averaged over the ranks in backward
    and each rank scoring its 1/world_size range of every replicated tensor. The gradients are views into
    DDP's communication buckets (`gradient_as_bucket_view`): no copy between the two after each reduction, one
    gradient-sized buffer less, and gradients that keep their storage from step to step."""

    kind = "ddp"

    def _wrap(self, model: nn.Module) -> nn.Module:
        cuda = self.proc.device.type == "cuda"
        return nn.parallel.DistributedDataParallel(model, device_ids=[self.proc.local_rank] if cuda else None,
                                                   gradient_as_bucket_view=True)
