"""FSDP2 (`fully_shard`) and FSDP1 (`FullyShardedDataParallel`, use_orig_params=True): the model sharded over
the ranks (or, with hybrid sharding, over groups of `shard_size` ranks that replicate each other), saved and
loaded as a torch distributed checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import TrainConfig
from ..engine import ProcessInfo, transformer_blocks, uniform_dtype_units
from ..engine_shards import FSDP1Access, FSDP2Access
from ..shards import ShardAccess
from .base import unwrapped_name
from .torch_engine import TorchEngine


class FSDPEngine(TorchEngine):
    """What FSDP2 and FSDP1 share: the hybrid-sharding mesh, full tensors gathered from the shards, and the
    sharded checkpoint (the trainable part of the model and the optimizer as a distributed checkpoint in
    `dcp/`, the schedule and the fp16 loss scaler in `engine.pt`; the frozen base is neither saved nor loaded)."""

    def __init__(self, model: nn.Module, param_groups: list[dict], cfg: TrainConfig, total_steps: int,
                 proc: ProcessInfo, shard_size: int | None = None):
        """`shard_size`: ranks a parameter is sharded over; below the world size, hybrid sharding."""
        self.mesh = _hybrid_mesh(proc, shard_size) if shard_size and shard_size < proc.world_size else None
        super().__init__(model, param_groups, cfg, total_steps, proc)

    def _full_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(self.model, options=StateDictOptions(  # (offload segfaults on CPU)
            full_state_dict=True, cpu_offload=self.proc.device.type != "cpu", ignore_frozen_params=True))
        return {unwrapped_name(k): v for k, v in state.items()}

    def save_state(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=StateDictOptions(
            ignore_frozen_params=True))
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory / "dcp"))
        if self.proc.is_main:
            torch.save(self.schedule_state(), directory / "engine.pt")

    def load_state(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
        options = StateDictOptions(ignore_frozen_params=True)
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=options)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(directory / "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"],  # frozen base: not saved, not loaded
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        self.load_schedule_state(torch.load(directory / "engine.pt", weights_only=False))


class FSDP2Engine(FSDPEngine):
    """`fully_shard` on every transformer block, then on the root: parameters become DTensors sharded on
    dim 0 (placements (Replicate, Shard(0)) on a hybrid mesh)."""

    kind = "fsdp2"

    def _wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard
        for block in transformer_blocks(model):
            fully_shard(block, mesh=self.mesh)
        return fully_shard(model, mesh=self.mesh)

    def _build_access(self) -> ShardAccess:
        return FSDP2Access(self.model, self.proc.rank, self.proc.world_size)

    def _clip_norm(self, max_norm: float) -> torch.Tensor:
        """`clip_grad_norm_` over the DTensor shards; the norm it returns is a DTensor of partial sums."""
        norm = super()._clip_norm(max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class FSDP1Engine(FSDPEngine):
    """`FullyShardedDataParallel(use_orig_params=True)` with one unit per module of `units`, each unit one
    FlatParameter of one dtype (`HYBRID_SHARD` on a hybrid mesh)."""

    kind = "fsdp1"

    def units(self, model: nn.Module) -> set[nn.Module]:
        """The modules wrapped as units of their own (the root always is one): `engine.uniform_dtype_units`."""
        return uniform_dtype_units(model)

    def _wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        from torch.distributed.fsdp.wrap import CustomPolicy
        units = self.units(model)
        policy = CustomPolicy(lambda module: module in units) if units else None
        hybrid = {"sharding_strategy": ShardingStrategy.HYBRID_SHARD, "device_mesh": self.mesh} if self.mesh else {}
        return FullyShardedDataParallel(model, use_orig_params=True, auto_wrap_policy=policy,
                                        device_id=self.proc.device, **hybrid)

    def _build_access(self) -> ShardAccess:
        return FSDP1Access(self.model, self.proc.rank, self.proc.world_size)

    def _clip_norm(self, max_norm: float) -> torch.Tensor:
        """FSDP1's own `clip_grad_norm_`: the global norm over every rank's shard."""
        return self.model.clip_grad_norm_(max_norm)


def _hybrid_mesh(proc: ProcessInfo, shard_size: int):
    """(replicas x shard_size) device mesh: consecutive ranks (one machine) shard, groups replicate."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(proc.device.type, (proc.world_size // shard_size, shard_size),
                            mesh_dim_names=("replicate", "shard"))
