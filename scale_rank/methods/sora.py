"""SoRA: a gate vector per module, its own optimizer group, and an L1 proximal step after each update.

The rank of a module is its number of non-zero gates; it emerges from the proximal steps (no decision on
rank 0 is needed: every rank applies the same elementwise operator to its own shard).
Equations, defaults and every choice between the paper and its code: docs/methods.md.
"""
from __future__ import annotations

import torch

from ..config import SoRAConfig
from ..layer import AdaptiveLoRALayer
from ..schedules import staged_linear
from .base import Method, edit_local

GATE_GROUP = "sora_gates"


@torch.no_grad()
def soft_threshold(gates: list[torch.Tensor], xi: float) -> None:
    """The L1 proximal operator sign(g) * max(|g| - xi, 0), in place on every tensor of `gates` (one foreach
    operation per step of the formula, whatever the number of tensors)."""
    shrunk = torch._foreach_abs(gates)
    torch._foreach_sub_(shrunk, xi)
    torch._foreach_clamp_min_(shrunk, 0.0)
    torch._foreach_mul_(shrunk, torch._foreach_sign(gates))
    torch._foreach_copy_(gates, shrunk)


class SoRA(Method):
    name = "sora"
    config: SoRAConfig

    @classmethod
    def site_capacity(cls, config: SoRAConfig, layer_index: int, n_layers: int) -> int:
        return config.r_max

    def init_layer(self, layer: AdaptiveLoRALayer) -> None:
        layer.init_kaiming_zero()
        if self.config.init == "paper":
            torch.nn.init.normal_(layer.lora_lam.data, 0.0, 1.0)
        else:
            torch.nn.init.ones_(layer.lora_lam.data)
        layer.scale.fill_(self.config.alpha / self.config.r_max)

    def bind(self, layers, access, comm) -> None:
        super().bind(layers, access, comm)
        self.gate_lr = lambda: self.config.gate_lr  # replaced by the optimizer's live lr when known
        self.gate_index = []
        for k, layer in enumerate(layers):
            local = access.scoring(layer.lora_lam)
            self.gate_index.append(self.layout.component_index("lam", k, local.start, local.end, 1, 1))
        self.gate_index = torch.cat(self.gate_index).to(layers[0].lora_lam.device)

    def optimizer_groups(self, layers, lr: float, weight_decay: float) -> list[dict]:
        weights = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
        gates = [layer.lora_lam for layer in layers]
        gate_lr = self.config.gate_lr if self.config.gate_lr is not None else lr
        return [{"name": "adapters", "params": weights, "lr": lr, "weight_decay": weight_decay},
                {"name": GATE_GROUP, "params": gates, "lr": gate_lr, "weight_decay": 0.0}]

    def track_optimizer(self, optimizer) -> None:
        """Read the gate group's current learning rate (for xi_mode 'lr') from `optimizer` (one without the
        gate group, e.g. built by hand, leaves method.gate_lr in charge)."""
        group = next((g for g in optimizer.param_groups if g.get("name") == GATE_GROUP), None)
        if group is not None:
            self.gate_lr = lambda: group["lr"]

    def xi(self, step: int) -> float:
        cfg = self.config
        xi = staged_linear(step, self.total_steps or 1, cfg.xi, cfg.xi_end, cfg.xi_stages)
        if cfg.xi_mode != "lr":
            return xi
        gate_lr = self.gate_lr()
        if gate_lr is None:
            raise RuntimeError("SoRA xi_mode='lr' needs the gates' learning rate: set method.gate_lr, or call "
                               "method.track_optimizer(optimizer) once the optimizer is built")
        return xi * gate_lr

    def before_step(self, step: int) -> None:
        # xi_mode "lr": the threshold uses the learning rate of the step about to be taken (a scheduler may
        # step before apply() and would otherwise hand over the next step's rate, 0 at the end of a decay)
        self._step_xi = self.xi(step)
        if self.config.l1 > 0:  # gradient of l1 * sum |g| / p_total (the official code's mean over all gates)
            weight = self.config.l1 / self.layout.n_components
            for layer in self.layers:
                local = self.access.storage(layer.lora_lam)
                if local.grad is not None:
                    local.grad.add_(local.values.sign(), alpha=weight)
                    self.access.write(layer.lora_lam, local)

    def apply(self, decision: torch.Tensor | None, step: int) -> None:
        """Soft-threshold the local gates, then count the non-zero ones (the step's one all-reduce)."""
        xi = self._step_xi
        if self.access.stores_whole:  # the gate parameters themselves: no slice per module
            soft_threshold([layer.lora_lam for layer in self.layers], xi)
        else:
            for layer in self.layers:
                edit_local(self.access, layer.lora_lam, lambda local: soft_threshold([local.values], xi),
                           values_only=True)
        with torch.no_grad():
            if self.access.whole_tensors:
                gates = torch.cat([layer.lora_lam for layer in self.layers])
            else:
                gates = torch.cat([self.access.scoring(layer.lora_lam).values for layer in self.layers])
        counts = torch.zeros(self.layout.n_components, dtype=torch.float64, device=gates.device)
        counts.index_add_(0, self.gate_index, gates.ne(0).double())
        self.mask = self.comm.all_reduce_sum(counts).gt(0).float().cpu()
