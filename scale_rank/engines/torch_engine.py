"""What the torch engines (one process, DDP, FSDP2, FSDP1) share: AdamW over the wrapped model's parameters,
the LambdaLR schedule, fp16 loss scaling with torch's GradScaler, and autocast for 16-bit compute."""
from __future__ import annotations

import contextlib
from abc import abstractmethod
from contextlib import AbstractContextManager

import torch
from torch import nn

from ..config import TrainConfig
from ..engine import ProcessInfo, lr_schedule, precision_dtype
from ..shards import ShardAccess
from .base import Engine, unwrapped_name


class TorchEngine(Engine):
    """A model wrapped by the subclass (`_wrap`), stepped by a torch optimizer the engine builds itself.

    The subclass supplies the wrapping, the shard access of the wrapped model and, where its parameters are
    sharded, the clipping (`_clip_norm`) and the checkpoint.
    """

    def __init__(self, model: nn.Module, param_groups: list[dict], cfg: TrainConfig, total_steps: int,
                 proc: ProcessInfo):
        super().__init__(model, cfg, proc)
        self.autocast_dtype = precision_dtype(cfg.precision)
        model.to(proc.device)
        names = _group_names(param_groups, model)
        self.model = self._wrap(model)
        groups = _groups_by_name(names, model, param_groups)  # FSDP replaces parameter objects
        # fused: one kernel per step for all the adapters' tensors on every device (torch picks foreach by itself,
        # and only on GPUs); under fp16 GradScaler hands it the overflow flag and it skips the update itself
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_schedule(cfg.lr_schedule, cfg.warmup_steps, total_steps))
        self.scaler = torch.amp.GradScaler(proc.device.type) if cfg.precision == "fp16" else None
        self.access = self._build_access()

    @abstractmethod
    def _wrap(self, model: nn.Module) -> nn.Module:
        """The engine around `model` (on its device already); may replace its parameters in place."""

    @abstractmethod
    def _build_access(self) -> ShardAccess:
        """The shard access of the wrapped model (`self.model`)."""

    # -- one micro-batch ---------------------------------------------------------------------------
    def autocast(self) -> AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.proc.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss / grad_accum).backward()
        else:
            (loss / grad_accum).backward()

    # -- one optimizer step ------------------------------------------------------------------------
    def grad_scale(self) -> float:
        return 1.0 if self.scaler is None else float(self.scaler.get_scale())

    def prepare_step(self) -> bool:
        if self.scaler is None:
            return False
        self.scaler.unscale_(self.optimizer)
        found = sum(float(v) for v in self.scaler._found_inf_per_device(self.optimizer).values())
        return found > 0

    def clip_gradients(self, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients are scaled in place (`_clip_norm`), so the optimizer applies no further factor."""
        norm = self._clip_norm(max_norm)
        return norm.detach().float(), torch.ones((), device=norm.device)

    def _clip_norm(self, max_norm: float) -> torch.Tensor:
        """Scale every gradient in place so that their global norm is at most `max_norm`; the norm before."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoint ----------------------------------------------------------------------------------
    def schedule_state(self) -> dict:
        """What every rank holds alike besides model and optimizer: the schedule and the fp16 loss scaler."""
        return {"scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_schedule_state(self, saved: dict) -> None:
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None and saved.get("scaler") is not None:
            self.scaler.load_state_dict(saved["scaler"])


def _group_names(param_groups: list[dict], model: nn.Module) -> list[list[str]]:
    """The names in `model` of each group's parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in param_groups]


def _groups_by_name(names: list[list[str]], model: nn.Module, groups: list[dict]) -> list[dict]:
    """Param groups over the live parameters of `model` after wrapping, matched by original name."""
    live = {unwrapped_name(n): p for n, p in model.named_parameters()}
    return [{**g, "params": [live[n] for n in group_names]} for g, group_names in zip(groups, names)]
