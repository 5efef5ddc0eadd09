"""What every engine offers the training loop: one micro-batch (forward, backward), one optimizer step (fp16
overflow, clipping, step, zero_grad), the shard access the controller edits through, and the state.

Each engine is a subclass (`scale_rank.engines`): it wraps the model, builds its `ShardAccess`, steps, and
saves and loads its own checkpoint. Nothing here asks which engine it is.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import TrainConfig
from ..engine import ProcessInfo
from ..shards import ShardAccess


def unwrapped_name(name: str) -> str:
    """A parameter name as in the unwrapped model (without FSDP / checkpoint wrapper prefixes)."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


class Engine(ABC):
    """The adapted model under one engine.

    `module` is the model as built (unwrapped; its parameters are the ones methods and the controller see),
    `model` what the engine wrapped around it (what forward calls), `access` the local slices of every
    parameter, `optimizer` / `scheduler` the optimizer and lr schedule that the step drives. `kind` names
    the engine in metrics and telemetry.
    """

    kind: ClassVar[str]
    model: nn.Module
    optimizer: Any
    scheduler: Any
    access: ShardAccess

    def __init__(self, model: nn.Module, cfg: TrainConfig, proc: ProcessInfo):
        self.module, self.cfg, self.proc = model, cfg, proc

    # -- one micro-batch ---------------------------------------------------------------------------
    def autocast(self) -> AbstractContextManager:
        """The compute-precision context around forward; none where the engine casts the model itself."""
        return contextlib.nullcontext()

    def forward(self, batch: dict[str, torch.Tensor]):
        batch = {k: v.to(self.proc.device) for k, v in batch.items()}
        with self.autocast():
            return self.model(**batch)

    @abstractmethod
    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        """Gradients of one micro-batch's `loss`, averaged over `grad_accum` micro-batches."""

    def micro_step(self) -> None:
        """Called after every non-final micro-batch; only an engine that counts micro-batches acts."""

    # -- one optimizer step ------------------------------------------------------------------------
    @abstractmethod
    def grad_scale(self) -> float:
        """The factor applied to the loss before backward (fp16 loss scaling), for the regularizer."""

    @abstractmethod
    def prepare_step(self) -> bool:
        """Before observing: unscale fp16 grads; returns True when this step will be skipped (overflow)."""

    @abstractmethod
    def clip_gradients(self, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip the global gradient norm of everything that trains to `max_norm` (after fp16 unscaling).

        Returns (the norm before clipping, the factor the optimizer will still apply to the gradients as
        they are now): 1 where they were scaled in place; where the engine clips inside `step()`, the
        coefficient it will apply, so that scores can see the gradients the optimizer uses.
        """

    @abstractmethod
    def step(self) -> None:
        """The optimizer step (and lr schedule) at the end of a global batch."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Drop the gradients of the step just taken."""

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
        return [unwrapped_name(n) for n in names]

    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) tensors of `trainable_names`, on CPU, on rank 0 (empty dict elsewhere).

        Collective under FSDP and DeepSpeed: every rank must call it.
        """
        wanted = set(self.trainable_names())
        state = self._full_state()
        if not self.proc.is_main:
            return {}
        return {k: state[k].float().contiguous() if state[k].is_floating_point() else state[k]
                for k in sorted(wanted)}

    @abstractmethod
    def _full_state(self) -> dict[str, torch.Tensor]:
        """Whole tensors (on CPU, by unwrapped name) of at least `trainable_names` on rank 0; collective."""

    @abstractmethod
    def save_state(self, directory: Path) -> None:
        """Model (trainable part), optimizer and schedule into `directory` (every rank calls)."""

    @abstractmethod
    def load_state(self, directory: Path) -> None:
        """Restore what `save_state` wrote into `directory` (every rank calls)."""
