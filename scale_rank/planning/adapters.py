"""Closed-form adapter counts per method, the per-method statistics, and the controller's traffic.

Every number here follows the code it describes: capacities from each method's rank rule (methods/*.py),
the per-entry sensitivity EMAs of importance.py (12 B per scored local entry: i_bar, u_bar float32 and an
int32 component index), and the collectives the controller issues (measured in bench/README.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import AdaLoRAConfig, ConfigError, IncreLoRAConfig, MethodConfig, PRILoRAConfig, SoRAConfig
from ..inject import DEFAULT_TARGETS, _matcher
from ..methods import method_class
from .models import LinearShape, ModelGeometry

EMA_BYTES_PER_ENTRY = 12  # SensitivityTracker: i_bar + u_bar (float32) + index (int32) per scored entry


@dataclass(frozen=True)
class AdapterSite:
    """One adapted linear layer and its fixed capacity r_max."""

    linear: LinearShape
    kind: str
    rank: int

    @property
    def tensor_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of lora_A (r x d_in), lora_B (d_out x r) and lora_lam (r)."""
        return (self.rank, self.linear.d_in), (self.linear.d_out, self.rank), (self.rank,)


@dataclass(frozen=True)
class AdapterPlan:
    """The adapters a method attaches to a model, counted without building it."""

    method: MethodConfig
    sites: tuple[AdapterSite, ...]

    @property
    def lam_trains(self) -> bool:
        return method_class(self.method.name).trains_lam

    @property
    def modules(self) -> int:
        return len(self.sites)

    @property
    def components(self) -> int:
        """Total capacity: the length of every per-component vector the controller reduces."""
        return sum(site.rank for site in self.sites)

    @property
    def params(self) -> int:
        """All adapter parameters: A, B and lam of every site (trainable or not)."""
        return sum(site.rank * (site.linear.d_in + site.linear.d_out + 1) for site in self.sites)

    @property
    def trainable(self) -> int:
        """sum over sites of r (d_in + d_out), plus r for lam where the method trains it."""
        lam = self.components if self.lam_trains else 0
        return sum(site.rank * (site.linear.d_in + site.linear.d_out) for site in self.sites) + lam


def default_targets(model_type: str) -> list[str]:
    """inject.DEFAULT_TARGETS for `model_type`, or an error asking for explicit targets."""
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(f"no default target modules for model type {model_type!r}: name the linear layers "
                          "to adapt, e.g. --targets q_proj,v_proj or -o model.targets=[q_proj,v_proj] (known "
                          f"types: {sorted(DEFAULT_TARGETS)})")
    return DEFAULT_TARGETS[model_type]


def capacity(method: MethodConfig, layer_index: int, n_layers: int) -> int:
    """r_max of a site, by the method's own rule (Method.site_capacity)."""
    return method_class(method.name).site_capacity(method, layer_index, n_layers)


def plan_adapters(geometry: ModelGeometry, method: MethodConfig,
                  targets: list[str] | str | None = None) -> AdapterPlan:
    """The sites `targets` select (inject.find_sites' matching rule) and the method's capacity for each."""
    targets = default_targets(geometry.spec.model_type) if targets is None else targets
    matcher = _matcher(targets)
    matched = [(linear, matcher(linear.name)) for linear in geometry.linears]
    matched = [(linear, kind) for linear, kind in matched if kind is not None]
    if not matched:
        raise ConfigError(f"targets {targets!r} match no linear layer; layers include: "
                          f"{', '.join(linear.name for linear in geometry.linears[:8])}")
    n_layers = max(linear.layer_index for linear, _ in matched) + 1
    return AdapterPlan(method, tuple(AdapterSite(linear, kind, capacity(method, linear.layer_index, n_layers))
                                     for linear, kind in matched))


# -- per-method statistics ---------------------------------------------------------------------------
def method_state_bytes(plan: AdapterPlan, scored_fraction: float) -> int:
    """Bytes of a method's per-entry statistics on one GPU; `scored_fraction`: this rank's share of entries.

    AdaLoRA / IncreLoRA (score='component'): 12 B per scored local entry. IncreLoRA score='dense': a float32
    d_out x d_in gradient accumulator per site (one process only). SoRA: an int64 component index per scored
    local gate. PRILoRA: a float32 per-input-feature squared sum per site (the EMA of their norms, float64,
    lives on the host). LoRA: none.
    """
    method = plan.method
    if isinstance(method, AdaLoRAConfig) or (isinstance(method, IncreLoRAConfig) and method.score == "component"):
        return round(EMA_BYTES_PER_ENTRY * plan.params * scored_fraction)
    if isinstance(method, IncreLoRAConfig):
        return 4 * sum(site.linear.d_in * site.linear.d_out for site in plan.sites)
    if isinstance(method, SoRAConfig):
        return round(8 * plan.components * scored_fraction)
    if isinstance(method, PRILoRAConfig):
        return 4 * sum(site.linear.d_in for site in plan.sites)
    return 0


def adapter_buffer_bytes(plan: AdapterPlan, adapter_bytes: int) -> int:
    """Buffers of every AdaptiveLoRALayer (replicated, never sharded): active (r, adapter dtype) and scale
    (float32)."""
    return sum(site.rank * adapter_bytes + 4 for site in plan.sites)


# -- controller traffic ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Traffic:
    """The controller's collectives on the steps where a method communicates."""

    bytes_per_event: int
    calls_per_event: int
    when: str
    extra: str = ""


def controller_traffic(plan: AdapterPlan) -> Traffic:
    """Bytes and calls per communicating step (bench/README.md, 'Controller traffic per optimizer step')."""
    method, c = plan.method, plan.components
    if isinstance(method, AdaLoRAConfig):
        return Traffic(28 * c, 2, f"every delta_t={method.delta_t} steps between t_init and T - t_final "
                                  "(3 float64 sums per component all-reduced, a float32 mask broadcast)")
    if isinstance(method, SoRAConfig):
        return Traffic(8 * c, 1, "every step (one float64 count of non-zero gates per component)")
    if isinstance(method, IncreLoRAConfig):
        return Traffic(24 * c + 4 * plan.modules, 2, "every growth step while ranks grow (3 float64 sums per "
                                                      "component, a float32 growth per module)")
    if isinstance(method, PRILoRAConfig):
        features = sum(site.linear.d_in for site in plan.sites)
        return Traffic(8 * features, 1, "every step (float64 squared input norms per input feature)",
                       f"every prune_interval={method.prune_interval} steps also {256 * c:,} B in 33 calls "
                       "(mask broadcast, 31-round bisection of per-row counts, threshold broadcast)")
    return Traffic(0, 0, "never (fixed ranks)")
