"""The method protocol: what a rank-allocation method tells the controller and the layers."""
from __future__ import annotations

import dataclasses

import torch

from ..comm import Collective
from ..components import ComponentLayout
from ..config import MethodConfig
from ..inject import Site
from ..layer import AdaptiveLoRALayer
from ..shards import ShardAccess
from ..versioned import DerivedFrom
from .hooks import LayerHooks, OrthogonalityRegularizer


class Method:
    """Base class and contract of a rank-allocation method (docs/design.md, "The method contract").

    Life cycle: `capacity`/`init_layer` when adapters are attached; `bind` once the engine has placed the
    parameters; then per optimizer step `before_step` -> `partial_sums` -> (all-reduce) -> `absorb` ->
    `decide` (rank 0, when `decides_at`) -> (broadcast) -> optimizer step -> `apply`.

    What a method may touch:
    - directly: its own replicated state (masks, EMAs of reduced sums, counters) and each layer's buffers
      `active` and `scale` (replicated on every rank under every engine);
    - only through shard access (`self.access`, `edit_local`): the values and gradients of lora_A, lora_B and
      lora_lam, which an engine may shard, flatten or keep as an fp32 master copy.
    What a method computes in the layers' forward or backward beyond the LoRA update it installs as hooks
    (`install`, scale_rank.methods.hooks) in `bind`, and removes when done; the layer itself holds no method
    state. Every method with gamma > 0 gets the orthogonality regularizer.
    Collectives: the controller runs the step's one all-reduce (of `partial_sums`) and one broadcast (of
    `decide`'s result). `apply` may use `self.comm` for collectives that every rank reaches at the same step
    with the same shapes (SoRA's gate count, PRILoRA's bisection); no other hook may communicate.

    Everything the controller, telemetry, export, the Trainer callback and the planner ask of a method is a
    member here; subclasses override what applies to them.
    """

    name = "base"
    decision_per_module = False  # decisions are per component (False) or per module (True)
    allocates_ranks = True  # False: fixed ranks, nothing happens without the controller (plain LoRA)
    trains_lam = True  # False: lam stays fixed at 1 (a parameter without gradient)

    def __init__(self, config: MethodConfig, total_steps: int | None):
        self.config = config
        self.total_steps = total_steps
        self.last_scores: torch.Tensor | None = None  # scores of the last decision (per component or module)
        # what the optimizer will still multiply this step's gradients by (DeepSpeed's clipping acts inside its
        # step); the controller sets it before before_step(), so scores see the gradients the optimizer uses
        self.grad_factor: torch.Tensor | float = 1.0
        self.hooks: list[LayerHooks] = []  # installed on the bound layers
        self._ranks = DerivedFrom(lambda mask: self.layout.per_module_sum(mask).long())
        self.regularizer: OrthogonalityRegularizer | None = None

    # -- attach time ---------------------------------------------------------------------------------
    @classmethod
    def site_capacity(cls, config: MethodConfig, layer_index: int, n_layers: int) -> int:
        """r_max of the adapter on a module of 0-based layer `layer_index` of `n_layers` (also the planner's)."""
        raise NotImplementedError

    @classmethod
    def world_size_error(cls, config: MethodConfig, world_size: int) -> str | None:
        """Why `config` cannot run on `world_size` data-parallel ranks (None: it can)."""
        return None

    def capacity(self, site: Site, n_layers: int) -> int:
        return self.site_capacity(self.config, site.layer_index, n_layers)

    def init_layer(self, layer: AdaptiveLoRALayer) -> None:
        raise NotImplementedError

    # -- after the engine is set up ------------------------------------------------------------------
    def bind(self, layers: list[AdaptiveLoRALayer], access: ShardAccess, comm: Collective) -> None:
        """Take the layers (in model order), shard access and collectives; (re)install the method's hooks."""
        self.remove_hooks()
        self.layers, self.access, self.comm = layers, access, comm
        gamma = self.config.resolved_gamma()
        if gamma > 0:
            self.regularizer = self.install(OrthogonalityRegularizer(
                layers, gamma, access.resident_groups(layers), defer_grads=access.stores_whole,
                ensure_present=access.ensure_present))
        self.layout = ComponentLayout(layers)
        self.mask = torch.cat([layer.active.detach().float().cpu() for layer in layers])  # replicated buffer

    def optimizer_groups(self, layers: list[AdaptiveLoRALayer], lr: float, weight_decay: float) -> list[dict]:
        params = [p for layer in layers for p in (layer.lora_A, layer.lora_B, layer.lora_lam)
                  if p.requires_grad]
        return [{"name": "adapters", "params": params, "lr": lr, "weight_decay": weight_decay}]

    # -- per optimizer step --------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        """Grads are present and the optimizer has not stepped: statistics updates and local edits of
        gradients go here."""

    def partial_sums(self, step: int) -> torch.Tensor | None:
        """This rank's float64 partial sums to all-reduce this step, or None for no reduction. No side
        effects: calling it twice gives the same sums."""
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

    def track_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once the optimizer exists (methods that read its live learning rate)."""

    # -- hooks on the layers -------------------------------------------------------------------------
    def install(self, hooks: LayerHooks) -> LayerHooks:
        """Keep `hooks` (already registered on the layers) so that `remove_hooks` takes them off."""
        self.hooks.append(hooks)
        return hooks

    def remove_hooks(self) -> None:
        """Take every hook this method installed off the layers (the adapters then compute plain LoRA)."""
        for hooks in self.hooks:
            hooks.remove()
        self.hooks.clear()
        self.regularizer = None

    def scale_regularizer(self, factor: float) -> None:
        """Scale the regularizer's gradient like the loss (1 / grad_accum, times an fp16 loss scale)."""
        if self.regularizer is not None:
            self.regularizer.scale(factor)

    def regularization(self) -> float:
        """The last forward's orthogonality term before gamma (0.0 without a regularizer)."""
        return self.regularizer.value() if self.regularizer is not None else 0.0

    # -- reporting -----------------------------------------------------------------------------------
    def target_budget(self) -> int | None:
        """The total rank the method allocates towards (None: no target)."""
        return None

    def scheduled_budget(self, step: int) -> int | None:
        """The total rank its schedule prescribes at `step` (None: no schedule)."""
        return None

    def module_scores(self) -> torch.Tensor | None:
        """Per-module scores of the last decision (float64, on the CPU), or None."""
        if self.last_scores is None:
            return None
        if self.last_scores.numel() == self.layout.n_modules:
            return self.last_scores.double().cpu()
        return self.layout.per_module_sum(self.last_scores.double())

    # -- state ---------------------------------------------------------------------------------------
    def ranks(self) -> torch.Tensor:
        """Current rank of every module (from the global mask; read-only). Recomputed only when the mask is
        replaced or edited in place (its version counter), so a step that changes no rank computes nothing."""
        return self._ranks.of(self.mask)

    def state_dict(self) -> dict:
        return {"mask": self.mask.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.mask = state["mask"].clone()


def edit_local(access: ShardAccess, param: torch.nn.Parameter, edit, values_only: bool = False) -> None:
    """Apply `edit(local_slice)` to this rank's storage of `param` (in place) and store it back.
    `values_only`: the edit leaves the gradient alone, so the write does not look at it (under ZeRO a
    gradient write reads the engine's gradient back and compares)."""
    local = access.storage(param)
    if values_only:
        local = dataclasses.replace(local, grad=None)
    with torch.no_grad():
        edit(local)
    access.write(param, local)
