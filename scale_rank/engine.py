"""Setting up the distributed engine, by us (not by accelerate): the process group, which engine and
precision, the lr schedule, and the units FSDP shards. The engines themselves are the classes in
`scale_rank.engines` (one process, DDP, FSDP2, FSDP1, DeepSpeed).

`accelerate launch` and `deepspeed` are launchers and config sources: the engine kind and its settings come
from our config, or from what `accelerate launch --config_file launch/accelerate/<engine>.yaml` exports
(ACCELERATE_USE_FSDP, FSDP_VERSION, ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_CONFIG_FILE, ...), or
from `deepspeed ... --deepspeed ds_configs/<x>.json`.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, ModelConfig, TrainConfig
from .host_heap import keep_freed_memory

_ENV_TRUE = ("1", "true", "yes")


@dataclass
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_processes(timeout_minutes: float = 30.0) -> ProcessInfo:
    """Join the process group the launcher (torchrun, accelerate, deepspeed) described in the env; a
    collective that waits longer than `timeout_minutes` raises instead of hanging the job."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if not cuda and local_world > 1:  # CPU processes share the cores: oversubscription slows all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not cuda:  # no page faults on every step's activations (scale_rank.host_heap)
        keep_freed_memory()
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return ProcessInfo(rank, world_size, local_rank, device)


def exit_processes(code: int) -> None:
    """Leave the process group and end the process without C++ teardown (which can abort multi-process
    CPU runs after all work is done)."""
    import sys
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def resolve_engine(cfg: TrainConfig, world_size: int) -> tuple[str, str | None]:
    """(engine kind, DeepSpeed config path) from our config, else the launcher's environment."""
    ds_config = cfg.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    kind = cfg.engine
    if kind == "auto":
        if ds_config or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _ENV_TRUE:
            kind = "deepspeed"
        elif os.environ.get("ACCELERATE_USE_FSDP", "").lower() in _ENV_TRUE:
            kind = "fsdp1" if os.environ.get("FSDP_VERSION", "2") == "1" else "fsdp2"
        else:
            kind = "ddp" if world_size > 1 else "single"
    if kind == "deepspeed" and not ds_config:
        raise ConfigError("engine deepspeed needs a DeepSpeed config: pass --deepspeed ds_configs/zero3.json "
                          "(or train.deepspeed_config)")
    if kind != "deepspeed" and cfg.deepspeed_config:
        raise ConfigError(f"train.deepspeed_config is set but the engine is {kind!r}; drop one of them")
    if kind in ("ddp", "fsdp1", "fsdp2") and world_size == 1:
        kind = "single" if kind == "ddp" else kind
    return kind, ds_config


def fsdp_shard_size(cfg: TrainConfig, kind: str, world_size: int) -> int:
    """Ranks each parameter is sharded over: `world_size` (full sharding) or, for hybrid sharding, the size
    of the groups that shard (replicated across groups). From train.fsdp_shard_size, else from accelerate's
    environment: FSDP1 `fsdp_sharding_strategy: HYBRID_SHARD` shards within a machine (LOCAL_WORLD_SIZE),
    FSDP2 `parallelism_config` with dp_replicate_size > 1 within groups of dp_shard_size."""
    size = cfg.fsdp_shard_size
    if not size and kind == "fsdp1" and os.environ.get("FSDP_SHARDING_STRATEGY", "").upper() in ("HYBRID_SHARD", "4"):
        size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    replicas = int(os.environ.get("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "1"))
    if not size and kind == "fsdp2" and replicas > 1:
        size = int(os.environ.get("PARALLELISM_CONFIG_DP_SHARD_SIZE", "0")) or world_size // replicas
        if size * replicas != world_size:
            raise ConfigError(f"accelerate's parallelism_config asks for {replicas} replicas x {size} shards, but "
                              f"{world_size} processes run: make dp_replicate_size x dp_shard_size equal the number "
                              "of processes (num_processes)")
    if not size or size == world_size:
        return world_size
    if kind not in ("fsdp1", "fsdp2"):
        raise ConfigError(f"train.fsdp_shard_size={size} (hybrid sharding) is for FSDP, but the engine is {kind}: "
                          "use train.engine=fsdp2 or fsdp1, or drop it")
    if size < 2 or world_size % size:
        raise ConfigError(f"hybrid sharding needs a shard group size that divides the world size ({world_size}) "
                          f"and is at least 2, got {size}: use e.g. the processes per machine "
                          "(1 would be plain data parallelism: train.engine=ddp)")
    return size


def zero_stage(ds_config_path: str | None) -> int | None:
    if not ds_config_path or not Path(ds_config_path).is_file():
        return None
    import json
    return int(json.loads(Path(ds_config_path).read_text()).get("zero_optimization", {}).get("stage", 0))


def refuse_unsupported(kind: str, ds_config_path: str | None, model_cfg: ModelConfig) -> None:
    """Combinations that cannot work stop here, before anything loads, saying what to change."""
    sharded = kind in ("fsdp1", "fsdp2") or (kind == "deepspeed" and zero_stage(ds_config_path) == 3)
    if model_cfg.quantization == "int8" and sharded:
        raise ConfigError(f"8-bit base weights (int8) cannot be sharded by {kind}"
                          f"{' ZeRO-3' if kind == 'deepspeed' else ''}: use model.quantization=nf4 (its storage "
                          "dtype matches the other parameters, so FSDP and ZeRO-3 shard it), or DDP / ZeRO-2")


def adopt_launcher_precision(cfg: TrainConfig) -> None:
    """`accelerate launch --mixed_precision bf16` (or its yaml) sets the precision unless the config did."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if cfg.precision == "fp32" and launcher in ("bf16", "fp16"):
        cfg.precision = launcher


def precision_dtype(precision: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lr_schedule(kind: str, warmup: int, total: int):
    """Linear warmup to the peak, then to 0 at `total`: linearly (HF's default), along a half cosine, or
    not at all ("constant")."""
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 if kind == "constant" else max(0.0, 1.0 - progress)
    return factor


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer (the largest ModuleList), the unit of sharding."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def uniform_dtype_units(model: nn.Module) -> set[nn.Module]:
    """The modules FSDP1 wraps as units of their own: the transformer blocks, plus what keeps every unit's
    FlatParameter to one dtype.

    The root's and every block's unit holds the dtype of most of the model's parameters (the frozen base).
    Walking down, a module whose own parameters have another dtype starts a unit of that dtype, and so on
    inside it: with a 16-bit base, each adapter layer (float32 A, B, lam) and each float32 task head is a
    unit, and inside each adapter layer its 16-bit base linear is one again. With one dtype throughout the
    units are the blocks alone.
    """
    blocks = set(transformer_blocks(model))
    base = _majority_dtype(model)
    units: set[nn.Module] = set()

    def visit(name: str, module: nn.Module, unit_dtype: torch.dtype) -> None:
        own = {p.dtype for p in module.parameters(recurse=False)}
        if len(own) > 1:
            raise ValueError(f"FSDP1 cannot flatten {name or 'the model'}: its own parameters mix dtypes "
                             f"{sorted(map(str, own))}; store them in one dtype or use train.engine=fsdp2")
        if module in blocks:
            units.add(module)
            unit_dtype = base
        if own and own != {unit_dtype}:
            units.add(module)
            unit_dtype = own.pop()
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child, unit_dtype)

    visit("", model, base)
    units.discard(model)  # the root is always a unit
    return units


def _majority_dtype(model: nn.Module) -> torch.dtype:
    """The dtype that holds most parameter elements (the frozen base's storage dtype)."""
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=counts.get)
