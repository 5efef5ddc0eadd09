"""RankController: once per optimizer step, observe -> reduce -> decide on rank 0 -> broadcast -> apply.

    loss.backward()
    controller.observe()      # grads present, optimizer not stepped yet
    optimizer.step()
    controller.apply()        # act on the decision (masks, lam, A pruning) on local shards
    optimizer.zero_grad()

`controller.step(optimizer)` does the middle three for a plain loop.
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from .comm import Collective
from .gates import BatchedGates
from .inject import adapter_layers
from .methods.base import Method
from .shards import ShardAccess, WholeTensorAccess

log = logging.getLogger(__name__)

_FORGOTTEN_AFTER = 64  # training forward passes without a controller step before we complain


class RankController:
    def __init__(self, model: nn.Module, method: Method, access: ShardAccess | None = None,
                 comm: Collective | None = None):
        self.layers = adapter_layers(model)
        if not self.layers:
            raise ValueError("the model has no scale_rank adapters: attach them first (scale_rank.adapt)")
        self.method = method
        self.comm = comm or Collective()
        self.access = access or WholeTensorAccess(self.comm.rank, self.comm.world_size)
        method.bind(self.layers, self.access, self.comm)
        # one process, DDP: every gated layer's B x gate in one operation per forward (FSDP, ZeRO-3 hold a
        # layer's parameters only around its own forward: there each layer gates its B itself)
        self.gates = BatchedGates(model, self.layers) if self.access.stores_whole else None
        self.step_count = 0
        self.history: list[dict] = []
        self._pending: tuple[int, torch.Tensor | None] | None = None
        self._forwards = 0
        self._forwards_allowed = _FORGOTTEN_AFTER
        self._hook = model.register_forward_pre_hook(self._count_forward)

    # -- the per-step protocol ---------------------------------------------------------------------
    def observe(self, skipped: bool = False, grad_factor: torch.Tensor | float = 1.0) -> None:
        """After backward, before the optimizer step. `skipped`: fp16 overflow, nothing is scored.
        `grad_factor`: what the optimizer will still multiply the gradients by (a clipping inside the
        engine's step, as DeepSpeed's), so that scores see the gradients the optimizer uses."""
        if self._pending is not None:
            raise RuntimeError("RankController.observe() called twice without apply() in between")
        self._forwards = 0
        step = self.step_count + 1
        if skipped:
            self._pending = (-1, None)
            return
        method, comm = self.method, self.comm
        method.grad_factor = grad_factor
        with self.access.deferred_writes():  # gradient edits: one collective for all modules where needed
            method.before_step(step)
        sums = method.partial_sums(step)
        if sums is not None:
            comm.all_reduce_sum(sums)
            method.absorb(sums, step)
        decision = None
        if method.decides_at(step):
            if comm.is_main:
                decision = method.decide(sums, step).float().cpu()
            else:
                decision = torch.zeros(method.decision_size())
            decision = comm.broadcast(decision)
        self._pending = (step, decision)

    def apply(self) -> None:
        """After the optimizer step, before zero_grad."""
        if self._pending is None:
            raise RuntimeError("RankController.apply() needs observe() first (after backward, before the "
                               "optimizer step)")
        step, decision = self._pending
        self._pending = None
        if step < 0:
            return
        with self.access.deferred_writes():  # one collective for all modules' edits where an engine needs one
            self.method.apply(decision, step)
        self.step_count = step
        ranks = self.method.ranks().tolist()
        if decision is not None or not self.history or ranks != self.history[-1]["ranks"]:
            self.history.append({"step": step, "ranks": ranks})

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.observe()
        optimizer.step()
        self.apply()

    def rebind(self) -> None:
        """Re-place the method's statistics after the model moved (e.g. Trainer moving it to the GPU).

        Only before the first step: statistics are re-created, not moved.
        """
        if self.step_count or self._pending is not None or self.history:
            raise RuntimeError("RankController.rebind() only works before the first step")
        self.method.bind(self.layers, self.access, self.comm)

    def set_accumulation(self, micro_batches: int) -> None:
        """Micro-batches per optimizer step: the forgotten-call warning allows that many forwards per step."""
        self._forwards_allowed = _FORGOTTEN_AFTER * max(1, micro_batches)

    def set_grad_scale(self, factor: float) -> None:
        """Scale the regularizer's gradient like the loss (1 / grad_accum, times an fp16 loss scale)."""
        self.method.scale_regularizer(factor)

    # -- guarding against a forgotten call -----------------------------------------------------------
    def _count_forward(self, module: nn.Module, args) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        self._forwards += 1
        if self._forwards == self._forwards_allowed and self.method.allocates_ranks:
            message = (f"{self._forwards} training forward passes without RankController.observe()/apply(): "
                       f"{self.method.name} is not allocating ranks (it trains as plain LoRA). Call "
                       "controller.step(optimizer) each optimizer step, or use ScaleRankCallback with Trainer.")
            log.error(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    def close(self) -> None:
        """Detach from the model: remove the forgotten-call hook, the batched gates and the method's hooks."""
        self._hook.remove()
        if self.gates is not None:
            self.gates.remove()
        self.method.remove_hooks()

    def guard(self, optimizer: torch.optim.Optimizer):
        """Make `optimizer.step()` fail when observe() was not called for this step; returns the hook handle."""
        def check(opt, args, kwargs):
            if self._pending is None:
                raise RuntimeError(f"optimizer stepped without RankController.observe(): {self.method.name} "
                                   "would silently train as plain LoRA")
        return optimizer.register_step_pre_hook(check)

    # -- reporting -----------------------------------------------------------------------------------
    def ranks(self) -> dict[str, int]:
        return {layer.site: int(r) for layer, r in zip(self.layers, self.method.ranks())}

    def regularization(self) -> float:
        """The last forward's orthogonality term before gamma: the mean of ||A A^T - I|| and ||B^T B - I||
        over every adapted module's A and B (what gamma multiplies in the loss)."""
        return self.method.regularization()

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"method": self.method.name, "step": self.step_count, "history": list(self.history),
                "state": self.method.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method.name:
            raise ValueError(f"controller state is for method {state['method']!r}, not {self.method.name!r}")
        self.step_count = state["step"]
        self.history = list(state["history"])
        self.method.load_state_dict(state["state"])
