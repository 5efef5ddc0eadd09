"""IncreLoRA: modules start at rank r_start and the best-scoring ones grow until a total target.

Growth unmasks reserved capacity: every module keeps `incre_rank` reserve components whose A and B train
while lam stays frozen at `reserve_lam` with no gradient ("advance learning"); a growing module's reserves
become active (their lam starts training, from fresh optimizer moments; by default rebalanced to `init_lam`
with B shrunk to match) and fresh reserves are unmasked.
As in the official code, each growth event restarts a linear warmup for the activated lam and for the new
reserves' A and B; the activated A and B, trained as reserves already, keep their pace with the official
activation and restart with the rebalanced one (their gradients change by the rebalancing factor). Reserves leave the
model as soon as growth is over. docs/methods.md has the equations and every choice against paper and code.
"""
from __future__ import annotations

import math

import torch

from ..config import ConfigError, IncreLoRAConfig
from ..importance import SensitivityTracker, adapter_params
from ..layer import AdaptiveLoRALayer
from ..schedules import even_interval, restarted_warmup
from ..versioned import DerivedFrom
from .base import Method, edit_local
from .hooks import DenseGradient


# which restarted warmup each adapter tensor follows: lam from its activation, A and B from becoming a reserve
WARM_GROUP = {"lam": "lam", "A": "factors", "B": "factors"}


class IncreLoRA(Method):
    name = "increlora"
    decision_per_module = True
    config: IncreLoRAConfig

    def __init__(self, config: IncreLoRAConfig, total_steps: int | None):
        super().__init__(config, total_steps)
        self.incre_rank = config.resolved_incre_rank()
        self.r_start = config.resolved_r_start()
        self.activation = config.resolved_activation()

    @classmethod
    def site_capacity(cls, config: IncreLoRAConfig, layer_index: int, n_layers: int) -> int:
        return config.r_max

    @classmethod
    def world_size_error(cls, config: IncreLoRAConfig, world_size: int) -> str | None:
        if config.score == "dense" and world_size > 1:
            return ("IncreLoRA score='dense' needs whole adapters on one process; use method.score=component "
                    "with more than one process")
        return None

    def init_layer(self, layer: AdaptiveLoRALayer) -> None:
        cfg = self.config
        layer.init_svd_form(cfg.init, cfg.init_lam)
        with torch.no_grad():
            layer.lora_lam[self.r_start:] = 0.0
            layer.lora_lam[self.r_start:self.r_start + self.incre_rank] = cfg.reserve_lam
            layer.active.zero_()
            layer.active[:self.r_start + self.incre_rank] = 1.0
        layer.scale.fill_(cfg.alpha / self.r_start)
        layer.lam_zero_where_off = True  # lam is 0 beyond the reserves, and only allocated lam gets a gradient

    def bind(self, layers, access, comm) -> None:
        super().bind(layers, access, comm)
        cfg, layout = self.config, self.layout
        error = self.world_size_error(cfg, comm.world_size)
        if error:
            raise ConfigError(error)
        self.dense = self.install(DenseGradient(layers)) if cfg.score == "dense" else None
        self.rank = torch.full((layout.n_modules,), self.r_start, dtype=torch.long)
        self.mask = (layout.position < self.r_start).float()
        self.reserve = ((layout.position >= self.r_start)
                        & (layout.position < self.r_start + self.incre_rank)).float()
        # per module on the adapters' device, copied again only when they change (a host-to-device copy in every
        # step would wait for the GPU each time): the reserve mask and its complement, and the allocation mask
        self._reserve_parts = DerivedFrom(lambda reserve: (self._per_module(reserve), self._per_module(1 - reserve)))
        self._mask_parts = DerivedFrom(self._per_module)
        # restarted warmups (0: none): lam from its activation, A and B from becoming a reserve at a growth event
        self.warm_since = {"lam": torch.zeros(layout.n_components, dtype=torch.long),
                           "factors": torch.zeros(layout.n_components, dtype=torch.long)}
        self.target_total = cfg.r_target * layout.n_modules
        self.t_init = cfg.t_init if cfg.t_init is not None else round(0.1 * self.total_steps)
        events = math.ceil((self.target_total - self.r_start * layout.n_modules) / (cfg.top_h * self.incre_rank))
        self.interval = cfg.incre_interval or even_interval(self.t_init, round(0.7 * self.total_steps), events)
        self._mirror_host_state()
        if cfg.score == "component":
            self.tracker = SensitivityTracker(layers, layout, access, cfg.beta1, cfg.beta2)
        else:
            self.dense_ema = torch.zeros(2, layout.n_modules, dtype=torch.float64)
        self._snapshot: dict | None = None

    def _mirror_host_state(self) -> None:
        """Python copies of what every step asks (total rank, modules with reserves, warmup windows), so that a
        step without a decision reads no tensor back to the host."""
        self.total_rank = int(self.rank.sum())
        self.reserve_modules = [k for k, part in enumerate(self.layout.split(self.reserve)) if bool(part.any())]
        self.partial_modules = [k for k, part in enumerate(self.layout.split(self.mask)) if not bool(part.all())]
        self.warm_until = {group: {} for group in self.warm_since}  # group -> {module: first step at full pace}
        for group, since in self.warm_since.items():
            for k, part in enumerate(self.layout.split(since)):
                if bool(part.any()) and self.warmup_length > 0:
                    self.warm_until[group][k] = int(part.max()) + self.warmup_length

    @property
    def warmup_length(self) -> int:
        cfg = self.config
        return cfg.restart_warmup if cfg.restart_warmup is not None else self.interval

    @property
    def growing(self) -> bool:
        return self.total_rank < self.target_total

    def decides_at(self, step: int) -> bool:
        return self.growing and step > self.t_init and (step - self.t_init) % self.interval == 0

    # -- statistics ------------------------------------------------------------------------------
    def target_budget(self) -> int:
        return self.target_total

    def before_step(self, step: int) -> None:
        if self.partial_modules:
            self._freeze_unallocated_lam_grads()
        self._snapshot = self._snapshot_warming(step)
        if self.growing:
            if self.config.score == "dense":
                self._update_dense_ema()
            else:
                self.tracker.update(self.grad_factor)

    def _freeze_unallocated_lam_grads(self) -> None:
        """lam trains only on allocated components: a reserve's lam gets no gradient (so its optimizer moments
        are still zero when it is activated), nor does the lam of a component beyond the reserves, which stays 0
        and keeps the component out of the forward."""
        if self.access.stores_whole:  # the gradients themselves, one foreach product for all such modules
            keeps = self._mask_parts.of(self.mask)
            pairs = [(self.layers[k].lora_lam.grad, keeps[k]) for k in self.partial_modules
                     if self.layers[k].lora_lam.grad is not None]
            if pairs:
                torch._foreach_mul_(*map(list, zip(*pairs)))
            return
        keeps = self._mask_parts.of(self.mask)
        for k in self.partial_modules:
            layer = self.layers[k]
            local = self.access.storage(layer.lora_lam)
            if local.grad is not None:
                local.grad.mul_(keeps[k][local.start:local.end].to(local.grad.device, local.grad.dtype))
                self.access.write(layer.lora_lam, local)

    def partial_sums(self, step: int) -> torch.Tensor | None:
        if not self.decides_at(step):
            return None
        if self.config.score == "dense":
            return self.dense_ema[0] * self.dense_ema[1]
        return self.tracker.partial_sums()

    def _update_dense_ema(self) -> None:
        """Module score |dW * dL/d(dW)|.sum() / sqrt(numel), smoothed like the per-entry scores."""
        cfg = self.config
        score = torch.stack([(layer.delta_weight() * grad).abs().sum().double().cpu() / math.sqrt(grad.numel())
                             for layer, grad in zip(self.layers, self.dense.grads)])
        self.dense.zero()
        i_bar, u_bar = self.dense_ema
        i_bar.lerp_(score, 1 - cfg.beta1)
        u_bar.mul_(cfg.beta2).add_((score - i_bar).abs(), alpha=1 - cfg.beta2)

    def scores_from_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """Per-module scores from the reduced sums (component scores summed over active components)."""
        if self.config.score == "dense":
            return sums.cpu()
        return self.layout.per_module_sum(self.tracker.component_scores(sums) * self.mask)

    # -- decisions -------------------------------------------------------------------------------
    def decide(self, sums: torch.Tensor | None, step: int) -> torch.Tensor:
        cfg = self.config
        scores = self.scores_from_sums(sums)
        self.last_scores = scores
        eligible = ((self.rank + self.incre_rank) <= self.layout.capacity).tolist()
        order = [k for k in torch.sort(scores, descending=True, stable=True).indices.tolist() if eligible[k]]
        remaining = self.target_total - int(self.rank.sum())
        growth = [0] * self.layout.n_modules
        for k in order[:cfg.top_h]:
            if remaining <= 0:
                break
            growth[k] = min(self.incre_rank, remaining)
            remaining -= growth[k]
        return torch.tensor(growth, dtype=torch.float32)

    def apply(self, decision: torch.Tensor | None, step: int) -> None:
        self._finish_warming(step)  # first: growth may rewrite values the warmup would blend back
        if decision is not None:
            self._grow(decision.long().cpu(), step)
        if not self.growing:
            if self.reserve_modules:
                self._drop_reserves()
            if self.dense is not None:
                self.dense.remove()  # growth is over: stop paying for the dense gradient
        self._reset_reserves()

    def _grow(self, growth: torch.Tensor, step: int) -> None:
        cfg = self.config
        ranks = self.rank.tolist()
        for k, gained in enumerate(growth.long().tolist()):
            if not gained:
                continue
            start, new_rank = ranks[k], ranks[k] + gained
            base, capacity = self.layout.offsets[k], self.layout.capacities[k]
            self.mask[base + start:base + new_rank] = 1.0
            self._restart_warmup("lam", k, base + start, base + new_rank, step)
            reserve_end = min(new_rank + self.incre_rank, capacity)
            self._restart_warmup("factors", k, base + max(new_rank, start + self.incre_rank), base + reserve_end, step)
            self.reserve[base:base + capacity] = 0.0
            self.reserve[base + new_rank:base + reserve_end] = 1.0
            if reserve_end == new_rank and k in self.reserve_modules:
                self.reserve_modules.remove(k)
            self.rank[k] = new_rank
            if new_rank == capacity and k in self.partial_modules:
                self.partial_modules.remove(k)
            self.total_rank += gained
            layer = self.layers[k]
            layer.active[:reserve_end] = 1.0
            if self.activation == "rebalance":
                self._rebalance(k, base + start, base + new_rank)
                self._restart_warmup("factors", k, base + start, base + new_rank, step)
            if cfg.scale_rule == "rank":
                layer.scale.fill_(cfg.alpha / new_rank)

    def _restart_warmup(self, group: str, k: int, first: int, end: int, step: int) -> None:
        """Components [first, end) of module k (in `group`'s tensors) start a warmup at `step`."""
        if end > first:
            self.warm_since[group][first:end] = step
            if self.warmup_length > 0:
                self.warm_until[group][k] = step + self.warmup_length

    def _rebalance(self, k: int, first: int, end: int) -> None:
        """Activated components [first, end) of module k: lam reserve_lam -> init_lam and their B columns times
        reserve_lam / init_lam, so B diag(lam) A is unchanged and they train at the start component's pace."""
        cfg, layer = self.config, self.layers[k]
        shrink = cfg.reserve_lam / cfg.init_lam

        def edit(local, kind):
            ids = self.layout.component_index(kind, k, local.start, local.end, layer.r_max, layer.d_in)
            hit = ((ids >= first) & (ids < end)).to(local.values.device)
            if kind == "lam":
                local.values.masked_fill_(hit, cfg.init_lam)
            else:
                local.values.mul_(torch.where(hit, shrink, 1.0).to(local.values.dtype))
        for kind in ("lam", "B"):
            edit_local(self.access, adapter_params(layer)[kind], lambda local, kind=kind: edit(local, kind))

    def _reset_reserves(self) -> None:
        """Reserve lam stays frozen at reserve_lam (their A and B train)."""
        self._set_reserve_lam(self.config.reserve_lam)

    def _set_reserve_lam(self, value: float) -> None:
        """lam = value on every reserve component (lam x (1 - reserve) + value x reserve)."""
        if self.access.stores_whole and self.reserve_modules:  # foreach over the modules with a reserve
            parts, keeps = self._reserve_parts.of(self.reserve)
            lams = [self.layers[k].lora_lam for k in self.reserve_modules]
            with torch.no_grad():
                torch._foreach_mul_(lams, [keeps[k] for k in self.reserve_modules])
                torch._foreach_add_(lams, [parts[k] for k in self.reserve_modules], alpha=value)
            return
        parts, keeps = self._reserve_parts.of(self.reserve)
        for k in self.reserve_modules:
            def freeze(local, part=parts[k], keep=keeps[k]):
                local.values.mul_(keep[local.start:local.end]).add_(part[local.start:local.end], alpha=value)
            edit_local(self.access, self.layers[k].lora_lam, freeze)

    def _per_module(self, values: torch.Tensor) -> list[torch.Tensor]:
        """A per-component host vector moved to the adapters' device and split per module (views)."""
        return list(values.to(self.layers[0].lora_lam.device, self.layers[0].lora_lam.dtype)
                    .split(self.layout.capacities))

    def _drop_reserves(self) -> None:
        """When growth is over: reserves leave the model, which then has exactly the allocated ranks (so an
        export from then on holds no reserve)."""
        self._set_reserve_lam(0.0)
        for layer, reserve in zip(self.layers, self.layout.split(self.reserve)):
            layer.active.mul_(1 - reserve.to(layer.active.device, layer.active.dtype))
        self.reserve.zero_()
        self.reserve_modules = []

    # -- restarted warmup for newly trainable components --------------------------------------------
    def _snapshot_warming(self, step: int) -> dict | None:
        """Local values before the optimizer step of every warming parameter (per component and kind)."""
        for ends in self.warm_until.values():  # forget finished warmups
            for k in [k for k, until in ends.items() if step >= until]:
                del ends[k]
        warming = {group: list(ends) for group, ends in self.warm_until.items()}
        if not any(warming.values()):
            return None
        factors = {group: restarted_warmup(step, since, self.warmup_length)
                   for group, since in self.warm_since.items()}
        slices = {(k, kind): self.access.storage(adapter_params(self.layers[k])[kind])
                  for kind, group in WARM_GROUP.items() for k in warming[group]}
        if not slices:
            return None
        olds = [torch.empty_like(local.values) for local in slices.values()]
        torch._foreach_copy_(olds, [local.values for local in slices.values()])  # one copy for all of them
        saved = {key: (old, local.start, local.end) for (key, local), old in zip(slices.items(), olds)}
        return {"factors": factors, "saved": saved}

    def _finish_warming(self, step: int) -> None:
        """Scale this step's update of warming components: new = old + factor * (new - old)."""
        if self._snapshot is None:
            return
        factors, saved = self._snapshot["factors"], self._snapshot["saved"]
        per_element = []
        for (k, kind), (old, start, end) in saved.items():
            layer = self.layers[k]
            ids = self.layout.component_index(kind, k, start, end, layer.r_max, layer.d_in)
            per_element.append(factors[WARM_GROUP[kind]][ids].to(old.dtype))
        olds = [old for old, _, _ in saved.values()]
        per_element = copy_to_device(per_element, olds[0].device)
        params = [adapter_params(self.layers[k])[kind] for k, kind in saved]
        if self.access.stores_whole:  # the parameters themselves: one foreach operation per step of the blend
            news = [param.detach().view(-1) for param in params]
            with torch.no_grad():
                steps = torch._foreach_sub(news, olds)
                torch._foreach_mul_(steps, per_element)
                torch._foreach_add_(olds, steps)
                torch._foreach_copy_(news, olds)
        else:
            for param, old, factor in zip(params, olds, per_element):
                def blend(local, old=old, factor=factor):
                    local.values.copy_(old + factor * (local.values - old))
                edit_local(self.access, param, blend)
        self._snapshot = None

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"mask": self.mask.clone(), "rank": self.rank.clone(), "reserve": self.reserve.clone(),
                 "warm_since": {group: since.clone() for group, since in self.warm_since.items()},
                 "active": [layer.active.clone() for layer in self.layers],
                 "scale": [layer.scale.clone() for layer in self.layers]}
        if self.config.score == "component":
            state["tracker"] = self.tracker.state_dict()
        else:
            state["dense_ema"] = self.dense_ema.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        for key in ("mask", "rank", "reserve"):
            setattr(self, key, state[key].clone())
        self.warm_since = {group: since.clone() for group, since in state["warm_since"].items()}
        for layer, active, scale in zip(self.layers, state["active"], state["scale"]):
            layer.active.copy_(active)
            layer.scale.copy_(scale)
        if self.config.score == "component":
            self.tracker.load_state_dict(state["tracker"])
        else:
            self.dense_ema.copy_(state["dense_ema"])
        self._mirror_host_state()


def copy_to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors moved to `device` in one copy; to a GPU from pinned memory, so the host does not wait for
    the GPU's queued work (a copy from ordinary host memory would)."""
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    moved = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat.to(device)
    return [part.view(tensor.shape) for part, tensor in zip(moved.split([t.numel() for t in tensors]), tensors)]
