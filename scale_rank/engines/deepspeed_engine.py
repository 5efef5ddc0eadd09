"""DeepSpeed ZeRO-1/2/3 (with or without offload): `deepspeed.initialize` with the run's DeepSpeed config.

The backward and the optimizer step are two calls (`ds_engine.backward`, `ds_engine.step`), so the controller
reads the partitions between them. DeepSpeed is imported only when this engine is built (it is slow to import).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..config import TrainConfig
from ..engine import ProcessInfo, lr_schedule
from ..engine_shards import DeepSpeedAccess
from .base import Engine, unwrapped_name


class DeepSpeedEngine(Engine):
    """The model inside a DeepSpeed engine, which casts it, scales the fp16 loss, counts micro-batches,
    clips inside its step (`gradient_clipping`) and keeps the fp32 master copy partitioned over the ranks."""

    kind = "deepspeed"

    def __init__(self, model: nn.Module, param_groups: list[dict], cfg: TrainConfig, total_steps: int,
                 proc: ProcessInfo, ds_config_path: str | Path):
        """`ds_config_path`: the DeepSpeed JSON; its "auto" values are filled from `cfg` (`load_ds_config`)."""
        import deepspeed

        from ..ds_config import load_ds_config
        super().__init__(model, cfg, proc)
        schedule = lr_schedule(cfg.lr_schedule, cfg.warmup_steps, total_steps)
        ds_config = load_ds_config(ds_config_path, cfg, proc.world_size)
        offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        if proc.device.type == "cpu" and offload in ("none", None):
            ds_config["optimizer"]["params"].setdefault("torch_adam", True)  # no fused CUDA Adam on CPU
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.model = self.ds_engine = engine
        self.optimizer, self.scheduler = optimizer, scheduler
        self.ds_config = ds_config
        self.access = DeepSpeedAccess(engine, proc.rank, proc.world_size)

    @property
    def _fp16(self) -> bool:
        return self.cfg.precision == "fp16"

    # -- one micro-batch ---------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        self.ds_engine.backward(loss)  # DeepSpeed divides by its gradient_accumulation_steps

    def micro_step(self) -> None:
        """DeepSpeed counts micro-batches itself: its step after a non-final micro-batch only accumulates."""
        self.ds_engine.step()

    # -- one optimizer step ------------------------------------------------------------------------
    def grad_scale(self) -> float:
        return float(self.ds_engine.optimizer.cur_scale) if self._fp16 else 1.0

    def prepare_step(self) -> bool:
        return bool(self.ds_engine.optimizer.check_overflow()) if self._fp16 else False

    def clip_gradients(self, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSpeed clips inside `step()`: nothing is scaled here; the coefficient its step will apply is
        computed from the same norm."""
        norm = self._sharded_grad_norm() / self.grad_scale()
        return norm, torch.clamp(max_norm / (norm + 1e-6), max=1.0)

    def _sharded_grad_norm(self) -> torch.Tensor:
        """L2 norm of all trainable gradients from every rank's scoring slices (each element counted once)."""
        squares = [local.grad.float().pow(2).sum() for param in self.module.parameters() if param.requires_grad
                   for local in (self.access.scoring(param),) if local.grad is not None]
        total = torch.stack([s.to(self.proc.device) for s in squares]).sum() if squares else \
            torch.zeros((), device=self.proc.device)
        if self.proc.world_size > 1:
            dist.all_reduce(total)
        return total.sqrt()

    def step(self) -> None:
        self.ds_engine.step()  # the optimizer step and the lr schedule

    def zero_grad(self) -> None:
        """DeepSpeed drops the gradients in its step."""

    # -- state -------------------------------------------------------------------------------------
    def _full_state(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param
        state = {unwrapped_name(name): safe_get_full_fp32_param(param).detach().cpu().clone()
                 for name, param in self.module.named_parameters() if param.requires_grad}
        state.update({unwrapped_name(n): b.detach().cpu() for n, b in self.module.named_buffers()})
        return state

    def save_state(self, directory: Path) -> None:
        """DeepSpeed's own checkpoint (tag `engine`), without the frozen base."""
        self.ds_engine.save_checkpoint(str(directory), tag="engine", exclude_frozen_parameters=True)

    def load_state(self, directory: Path) -> None:
        path, _ = self.ds_engine.load_checkpoint(str(directory), tag="engine", load_module_strict=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")
