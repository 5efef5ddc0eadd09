"""AdaLoRA: SVD-form adapters, sensitivity scores, a cubic global budget, lam zeroed in place.

Equations, defaults and every choice between the paper and its official code: docs/methods.md.
"""
from __future__ import annotations

import torch

from ..config import AdaLoRAConfig
from ..importance import SensitivityTracker
from ..layer import AdaptiveLoRALayer
from ..schedules import cubic_budget
from .base import Method, edit_local


def keep_top(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """0/1 mask keeping exactly `budget` highest scores; ties go to the lower index (stable)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = torch.zeros_like(scores, dtype=torch.float32)
    keep[order[:budget]] = 1.0
    return keep


class AdaLoRA(Method):
    name = "adalora"
    config: AdaLoRAConfig

    @classmethod
    def site_capacity(cls, config: AdaLoRAConfig, layer_index: int, n_layers: int) -> int:
        return config.r_init

    def init_layer(self, layer: AdaptiveLoRALayer) -> None:
        layer.init_svd_form(self.config.init, self.config.init_lam)
        layer.scale.fill_(self.config.alpha / self.config.r_init)

    def bind(self, layers, access, comm) -> None:
        super().bind(layers, access, comm)
        self.mask.fill_(1.0)  # lam starts at 0, but every component is kept until t_init
        cfg = self.config
        self.t_init, self.t_final = cfg.resolved_phases(self.total_steps)
        self.b0 = cfg.r_init * self.layout.n_modules
        self.b_target = cfg.r_target * self.layout.n_modules
        self.tracker = SensitivityTracker(layers, self.layout, access, cfg.beta1, cfg.beta2)

    @property
    def final_phase_start(self) -> int:
        return self.total_steps - self.t_final

    def scheduled_budget(self, step: int) -> int:
        return cubic_budget(step, self.total_steps, self.b0, self.b_target, self.t_init, self.t_final)

    def decides_at(self, step: int) -> bool:
        end = self.final_phase_start
        return self.t_init < step <= end and (step % self.config.delta_t == 0 or step == end)

    def target_budget(self) -> int:
        return self.b_target

    def before_step(self, step: int) -> None:
        if step <= self.final_phase_start:  # scores are frozen in the final phase
            self.tracker.update(self.grad_factor)

    def partial_sums(self, step: int) -> torch.Tensor | None:
        return self.tracker.partial_sums() if self.decides_at(step) else None

    def decide(self, sums: torch.Tensor | None, step: int) -> torch.Tensor:
        self.last_scores = self.tracker.component_scores(sums)
        return keep_top(self.last_scores, self.scheduled_budget(step))

    def apply(self, decision: torch.Tensor | None, step: int) -> None:
        if decision is not None:
            self.mask = decision.float().cpu()
        if decision is not None or step > self.final_phase_start:
            self.zero_pruned_lam()

    def zero_pruned_lam(self) -> None:
        if self.access.stores_whole:  # the lam parameters themselves, all in one foreach product
            keep = self.mask.to(self.layers[0].lora_lam.device, self.layers[0].lora_lam.dtype)
            with torch.no_grad():
                torch._foreach_mul_([layer.lora_lam for layer in self.layers], keep.split(self.layout.capacities))
            return
        for layer, keep in zip(self.layers, self.layout.split(self.mask)):
            keep = keep.to(layer.lora_lam.device, layer.lora_lam.dtype)

            def zero(local, keep=keep):
                local.values.mul_(keep[local.start:local.end])
            edit_local(self.access, layer.lora_lam, zero, values_only=True)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.tracker.load_state_dict(state["tracker"])
