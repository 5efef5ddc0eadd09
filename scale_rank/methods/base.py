"""The method protocol: what a rank-allocation method tells the controller and the layers."""
from __future__ import annotations

import torch

from ..comm import Collective
from ..components import ComponentLayout
from ..config import MethodConfig
from ..inject import Site
from ..layer import AdaptiveLoRALayer
from ..shards import ShardAccess


class Method:
    """Base class: plain behaviour (no statistics, no decisions) that methods override in parts.

    Life cycle: `capacity`/`init_layer` when adapters are attached; `bind` once the engine has placed the
    parameters; then per optimizer step `before_step` -> `partial_sums` -> (all-reduce) -> `absorb` ->
    `decide` (rank 0, when `decides_at`) -> (broadcast) -> optimizer step -> `apply`.
    """

    name = "base"
    decision_per_module = False  # decisions are per component (False) or per module (True)

    def __init__(self, config: MethodConfig, total_steps: int | None):
        self.config = config
        self.total_steps = total_steps

    # -- attach time ---------------------------------------------------------------------------------
    def capacity(self, site: Site, n_layers: int) -> int:
        raise NotImplementedError

    def init_layer(self, layer: AdaptiveLoRALayer) -> None:
        raise NotImplementedError

    # -- after the engine is set up ------------------------------------------------------------------
    def bind(self, layers: list[AdaptiveLoRALayer], access: ShardAccess, comm: Collective) -> None:
        self.layers, self.access, self.comm = layers, access, comm
        self.layout = ComponentLayout(layers)
        self.mask = torch.cat([layer.active.detach().float().cpu() for layer in layers])  # replicated buffer

    def optimizer_groups(self, layers: list[AdaptiveLoRALayer], lr: float, weight_decay: float) -> list[dict]:
        params = [p for layer in layers for p in (layer.lora_A, layer.lora_B, layer.lora_lam)
                  if p.requires_grad]
        return [{"name": "adapters", "params": params, "lr": lr, "weight_decay": weight_decay}]

    # -- per optimizer step --------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        """Grads are present and the optimizer has not stepped: local edits of gradients go here."""

    def partial_sums(self, step: int) -> torch.Tensor | None:
        """This rank's float64 partial sums to all-reduce this step, or None for no reduction."""
        return None

    def absorb(self, sums: torch.Tensor, step: int) -> None:
        """Every rank: fold the globally reduced sums into replicated state (deterministically)."""

    def decides_at(self, step: int) -> bool:
        return False

    def decision_size(self) -> int:
        return self.layout.n_modules if self.decision_per_module else self.layout.n_components

    def decide(self, sums: torch.Tensor | None, step: int) -> torch.Tensor:
        """Rank 0 only: the decision (a flat float tensor of `decision_size`)."""
        raise NotImplementedError

    def apply(self, decision: torch.Tensor | None, step: int) -> None:
        """Every rank, after the optimizer step: act on the local shards."""

    # -- state ---------------------------------------------------------------------------------------
    def ranks(self) -> torch.Tensor:
        """Current rank of every module (from the global mask)."""
        return self.layout.per_module_sum(self.mask).long()

    def state_dict(self) -> dict:
        return {"mask": self.mask.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.mask = state["mask"].clone()


def edit_local(access: ShardAccess, param: torch.nn.Parameter, edit) -> None:
    """Apply `edit(local_slice)` to this rank's storage of `param` (in place) and store it back."""
    local = access.storage(param)
    with torch.no_grad():
        edit(local)
    access.write(param, local)
