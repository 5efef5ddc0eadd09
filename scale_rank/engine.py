"""The distributed engine, set up by us (not by accelerate): one process, DDP, FSDP2, FSDP1, DeepSpeed.

`accelerate launch` and `deepspeed` are launchers and config sources: the engine kind and its settings come
from our config, or from what `accelerate launch --config_file launch/accelerate/<engine>.yaml` exports
(ACCELERATE_USE_FSDP, FSDP_VERSION, ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_CONFIG_FILE, ...), or
from `deepspeed ... --deepspeed ds_configs/<x>.json`.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, ModelConfig, TrainConfig
from .shards import ShardAccess, WholeTensorAccess

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


class TrainingEngine:
    """Forward/backward/step for one engine kind, with the shard access the controller needs."""

    def __init__(self, kind: str, model: nn.Module, param_groups: list[dict], cfg: TrainConfig,
                 total_steps: int, proc: ProcessInfo, ds_config_path: str | None = None,
                 shard_size: int | None = None):
        """`shard_size` (FSDP): ranks a parameter is sharded over; below the world size, hybrid sharding."""
        self.kind, self.cfg, self.proc = kind, cfg, proc
        mesh = _hybrid_mesh(proc, shard_size) if shard_size and shard_size < proc.world_size else None
        self.module = model
        self.autocast_dtype = precision_dtype(cfg.precision)
        schedule = lr_schedule(cfg.lr_schedule, cfg.warmup_steps, total_steps)
        self.scaler = None
        if kind == "deepspeed":
            self._init_deepspeed(model, param_groups, cfg, total_steps, proc, ds_config_path, schedule)
            return
        model.to(proc.device)
        names = _group_names(param_groups, model)
        if kind == "ddp":
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[proc.local_rank] if proc.device.type == "cuda" else None)
        elif kind == "fsdp2":
            from torch.distributed.fsdp import fully_shard
            for block in transformer_blocks(model):
                fully_shard(block, mesh=mesh)
            self.model = fully_shard(model, mesh=mesh)
        elif kind == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
            from torch.distributed.fsdp.wrap import CustomPolicy
            units = uniform_dtype_units(model)
            policy = CustomPolicy(lambda module: module in units) if units else None
            hybrid = {"sharding_strategy": ShardingStrategy.HYBRID_SHARD, "device_mesh": mesh} if mesh else {}
            self.model = FullyShardedDataParallel(
                model, use_orig_params=True, auto_wrap_policy=policy,
                device_id=proc.device, **hybrid)
        else:
            self.model = model
        param_groups = _groups_by_name(names, model, param_groups)  # FSDP replaces parameter objects
        self.optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        if cfg.precision == "fp16":
            self.scaler = torch.amp.GradScaler(proc.device.type)
        self.access = self._access()

    def _init_deepspeed(self, model, param_groups, cfg, total_steps, proc, path, schedule) -> None:
        import deepspeed

        from .ds_config import load_ds_config
        ds_config = load_ds_config(path, cfg, proc.world_size)
        offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        if proc.device.type == "cpu" and offload in ("none", None):
            ds_config["optimizer"]["params"].setdefault("torch_adam", True)  # no fused CUDA Adam on CPU
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.model = self.ds_engine = engine
        self.optimizer, self.scheduler = optimizer, scheduler
        self.ds_config = ds_config
        self.access = self._access()

    def _access(self) -> ShardAccess:
        if self.kind in ("single", "ddp"):
            return WholeTensorAccess(self.proc.rank, self.proc.world_size)
        from .engine_shards import shard_access
        return shard_access(self.kind, self.model, self.proc.rank, self.proc.world_size)

    # -- one micro-batch ---------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None or self.kind == "deepspeed":
            return contextlib.nullcontext()
        return torch.autocast(self.proc.device.type, dtype=self.autocast_dtype)

    def forward(self, batch: dict[str, torch.Tensor]):
        batch = {k: v.to(self.proc.device) for k, v in batch.items()}
        with self.autocast():
            return self.model(**batch)

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        if self.kind == "deepspeed":
            self.ds_engine.backward(loss)  # DeepSpeed divides by its gradient_accumulation_steps
        elif self.scaler is not None:
            self.scaler.scale(loss / grad_accum).backward()
        else:
            (loss / grad_accum).backward()

    def grad_scale(self) -> float:
        """The factor applied to the loss before backward (fp16 loss scaling), for the regularizer."""
        if self.scaler is not None:
            return float(self.scaler.get_scale())
        if self.kind == "deepspeed" and self.cfg.precision == "fp16":
            return float(self.ds_engine.optimizer.cur_scale)
        return 1.0

    def prepare_step(self) -> bool:
        """Before observing: unscale fp16 grads; returns True when this step will be skipped (overflow)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            found = sum(float(v) for v in self.scaler._found_inf_per_device(self.optimizer).values())
            return found > 0
        if self.kind == "deepspeed" and self.cfg.precision == "fp16":
            return bool(self.ds_engine.optimizer.check_overflow())
        return False

    def clip_gradients(self, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip the global gradient norm of everything that trains to `max_norm` (after fp16 unscaling), each
        engine its own way: `clip_grad_norm_` (one process, DDP; FSDP2 over its DTensor shards), FSDP1's
        sharded `clip_grad_norm_`, DeepSpeed's `gradient_clipping` (inside `step()`).

        Returns (the norm before clipping, the factor the optimizer will still apply to the gradients as
        they are now): 1 where they were scaled in place; under DeepSpeed the coefficient its step will
        apply, computed here from the same norm, so that scores can see the gradients the optimizer uses.
        """
        if self.kind == "deepspeed":
            norm = self._sharded_grad_norm() / self.grad_scale()
            return norm, torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        if self.kind == "fsdp1":
            norm = self.model.clip_grad_norm_(max_norm)
        else:
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor of partial sums
                norm = norm.full_tensor()
        return norm.detach().float(), torch.ones((), device=norm.device)

    def _sharded_grad_norm(self) -> torch.Tensor:
        """L2 norm of all trainable gradients from every rank's scoring slices (each element counted once)."""
        squares = [local.grad.float().pow(2).sum() for param in self.module.parameters() if param.requires_grad
                   for local in (self.access.scoring(param),) if local.grad is not None]
        total = torch.stack([s.to(self.proc.device) for s in squares]).sum() if squares else \
            torch.zeros((), device=self.proc.device)
        if self.proc.world_size > 1:
            dist.all_reduce(total)
        return total.sqrt()

    def micro_step(self) -> None:
        """DeepSpeed counts micro-batches itself: call after every non-final micro-batch."""
        if self.kind == "deepspeed":
            self.ds_engine.step()

    def step(self) -> None:
        """The optimizer step (and lr schedule) at the end of a global batch."""
        if self.kind == "deepspeed":
            self.ds_engine.step()
            return
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()

    def zero_grad(self) -> None:
        if self.kind != "deepspeed":
            self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    # -- state -------------------------------------------------------------------------------------
    def trainable_names(self) -> list[str]:
        """State-dict keys of what training changes: trainable parameters and adapter buffers."""
        names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        names += [n for n, _ in self.module.named_buffers() if n.endswith((".active", ".scale"))
                  and ".lora_" not in n]
        return [_clean(n) for n in names]

    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) tensors of `trainable_names`, on CPU, on rank 0 (empty dict elsewhere).

        Collective under FSDP and DeepSpeed: every rank must call it.
        """
        wanted = set(self.trainable_names())
        if self.kind in ("fsdp1", "fsdp2"):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            state = get_model_state_dict(self.model, options=StateDictOptions(  # (offload segfaults on CPU)
                full_state_dict=True, cpu_offload=self.proc.device.type != "cpu", ignore_frozen_params=True))
            state = {_clean(k): v for k, v in state.items()}
        elif self.kind == "deepspeed":
            from deepspeed.utils import safe_get_full_fp32_param
            state = {}
            for name, param in self.module.named_parameters():
                if param.requires_grad:
                    full = safe_get_full_fp32_param(param)
                    state[_clean(name)] = full.detach().cpu().clone()
            state.update({_clean(n): b.detach().cpu() for n, b in self.module.named_buffers()})
        else:
            state = {_clean(k): v.detach().cpu() for k, v in self.module.state_dict().items()}
        if not self.proc.is_main:
            return {}
        return {k: state[k].float().contiguous() if state[k].is_floating_point() else state[k]
                for k in sorted(wanted)}

    def save_state(self, directory: Path) -> None:
        """Model (trainable part), optimizer and schedule into `directory` (every rank calls)."""
        if self.kind == "deepspeed":
            self.ds_engine.save_checkpoint(str(directory), tag="engine", exclude_frozen_parameters=True)
            return
        if self.kind in ("fsdp1", "fsdp2"):
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
            model_state, optim_state = get_state_dict(self.model, self.optimizer, options=StateDictOptions(
                ignore_frozen_params=True))
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory / "dcp"))
            if self.proc.is_main:
                torch.save({"scheduler": self.scheduler.state_dict()}, directory / "engine.pt")
            return
        if self.proc.is_main:
            wanted = set(self.trainable_names())
            state = {k: v for k, v in self.module.state_dict().items() if _clean(k) in wanted}
            torch.save({"model": state, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict() if self.scaler else None}, directory / "engine.pt")

    def load_state(self, directory: Path) -> None:
        if self.kind == "deepspeed":
            path, _ = self.ds_engine.load_checkpoint(str(directory), tag="engine", load_module_strict=False)
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")
            return
        if self.kind in ("fsdp1", "fsdp2"):
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                                 set_state_dict)
            options = StateDictOptions(ignore_frozen_params=True)
            model_state, optim_state = get_state_dict(self.model, self.optimizer, options=options)
            state = {"model": model_state, "optimizer": optim_state}
            dcp.load(state, checkpoint_id=str(directory / "dcp"))
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"],  # frozen base: not saved, not loaded
                           options=StateDictOptions(ignore_frozen_params=True, strict=False))
            self.scheduler.load_state_dict(torch.load(directory / "engine.pt", weights_only=False)["scheduler"])
            return
        saved = torch.load(directory / "engine.pt", map_location=self.proc.device, weights_only=False)
        missing = set(self.trainable_names()) - {_clean(k) for k in saved["model"]}
        if missing:
            raise ValueError(f"checkpoint {directory} lacks {sorted(missing)[:3]}...: it comes from another "
                             "model or method")
        self.module.load_state_dict(saved["model"], strict=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None and saved["scaler"] is not None:
            self.scaler.load_state_dict(saved["scaler"])


def _hybrid_mesh(proc: ProcessInfo, shard_size: int):
    """(replicas x shard_size) device mesh: consecutive ranks (one machine) shard, groups replicate."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(proc.device.type, (proc.world_size // shard_size, shard_size),
                            mesh_dim_names=("replicate", "shard"))


def _clean(name: str) -> str:
    """A parameter name as in the unwrapped model (without FSDP / checkpoint wrapper prefixes)."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def _group_names(param_groups: list[dict], model: nn.Module) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in param_groups]


def _groups_by_name(names: list[list[str]], model: nn.Module, groups: list[dict]) -> list[dict]:
    """Param groups over the live parameters of `model` after wrapping, matched by original name."""
    live = {_clean(n): p for n, p in model.named_parameters()}
    return [{**g, "params": [live[n] for n in group_names]} for g, group_names in zip(groups, names)]


