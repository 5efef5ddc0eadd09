"""The engines, one class per kind, and the factory that builds the one a run asks for.

    Engine                      base.py     what the training loop calls (forward ... save_state)
      TorchEngine               torch_engine.py   AdamW + LambdaLR + GradScaler, autocast, in-place clipping
        LocalEngine   single    local.py    the model unwrapped; engine.pt
          DDPEngine   ddp       local.py    DistributedDataParallel
        FSDPEngine              fsdp.py     hybrid mesh, full-state gather, distributed checkpoint (dcp/)
          FSDP2Engine fsdp2     fsdp.py     fully_shard per block and root
          FSDP1Engine fsdp1     fsdp.py     FullyShardedDataParallel, one dtype per unit
      DeepSpeedEngine deepspeed deepspeed_engine.py  deepspeed.initialize (imported when built)
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import TrainConfig
from ..engine import ProcessInfo
from .base import Engine
from .deepspeed_engine import DeepSpeedEngine
from .fsdp import FSDP1Engine, FSDP2Engine, FSDPEngine
from .local import DDPEngine, LocalEngine
from .torch_engine import TorchEngine

ENGINE_CLASSES: dict[str, type[Engine]] = {
    cls.kind: cls for cls in (LocalEngine, DDPEngine, FSDP2Engine, FSDP1Engine, DeepSpeedEngine)}


def engine_class(kind: str) -> type[Engine]:
    """The class of engine `kind` ("single", "ddp", "fsdp2", "fsdp1", "deepspeed")."""
    try:
        return ENGINE_CLASSES[kind]
    except KeyError:
        raise ValueError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINE_CLASSES)}") from None


def make_engine(kind: str, model: nn.Module, param_groups: list[dict], cfg: TrainConfig, total_steps: int,
                proc: ProcessInfo, ds_config_path: str | Path | None = None,
                shard_size: int | None = None) -> Engine:
    """Engine `kind` around `model`, its optimizer over `param_groups`, its lr schedule over `total_steps`.

    `ds_config_path` is DeepSpeed's JSON (needed by "deepspeed", unused by the others); `shard_size` the
    ranks FSDP shards a parameter over (fsdp1 / fsdp2; below the world size: hybrid sharding).
    """
    cls = engine_class(kind)
    args = (model, param_groups, cfg, total_steps, proc)
    if issubclass(cls, DeepSpeedEngine):
        if ds_config_path is None:
            raise ValueError("engine 'deepspeed' needs a DeepSpeed config (ds_config_path)")
        return cls(*args, ds_config_path=ds_config_path)
    if issubclass(cls, FSDPEngine):
        return cls(*args, shard_size=shard_size)
    if shard_size is not None and shard_size < proc.world_size:
        raise ValueError(f"shard_size={shard_size} (hybrid sharding) is for FSDP, but the engine is {kind!r}")
    return cls(*args)


__all__ = ["Engine", "TorchEngine", "LocalEngine", "DDPEngine", "FSDPEngine", "FSDP2Engine", "FSDP1Engine",
           "DeepSpeedEngine", "ENGINE_CLASSES", "engine_class", "make_engine"]
