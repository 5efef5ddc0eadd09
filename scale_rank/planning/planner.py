"""The plan: one GPU's memory for a model, method and engine, whether it fits, and what to change if not."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import ConfigError, MethodConfig
from .adapters import AdapterPlan, Traffic, controller_traffic, plan_adapters
from .memory import GIB, PARAM_SHARDING, MemoryBreakdown, PlanInputs, memory_breakdown
from .models import ModelGeometry, load_model_config, model_geometry

MAX_GPUS = 1024


@dataclass(frozen=True)
class Plan:
    """Everything `scale-rank plan` reports."""

    model: str
    model_type: str
    base_params: int
    adapter_modules: int
    adapter_components: int
    adapter_params: int
    trainable_params: int
    method: dict
    inputs: PlanInputs
    memory: MemoryBreakdown
    traffic: Traffic
    fits: bool
    fits_with_gpus: int | None  # the smallest power-of-two multiple of --gpus that fits (None: none does)
    floor_bytes: int  # per GPU with MAX_GPUS of the same engine: what more GPUs cannot shrink
    notes: tuple[str, ...]

    def advice(self) -> str:
        """What to change when the plan does not fit ('' when it fits)."""
        if self.fits:
            return ""
        need, have = self.memory.total / GIB, self.inputs.gpu_memory_gib
        head = f"does not fit: {need:.1f} GiB per GPU > {have:g} GiB"
        if self.fits_with_gpus is not None:
            return f"{head}; fits with --gpus {self.fits_with_gpus}"
        changes = []
        if self.inputs.engine not in PARAM_SHARDING:
            changes.append("shard the weights (--engine zero3 or fsdp2)" if self.inputs.bits != 8
                           else "use --bits 4 with --engine zero3 or fsdp2 to shard the weights")
        changes.append("lower --seq-len or --micro-batch")
        if not self.inputs.gradient_checkpointing:
            changes.append("enable --gradient-checkpointing")
        if self.inputs.bits > 4:
            changes.append("use --bits 4")
        return (f"{head}, and more {self.inputs.engine} GPUs cannot help (up to {MAX_GPUS} they still need "
                f"{self.floor_bytes / GIB:.1f} GiB each: activations are per GPU, and what the engine does not "
                "shard stays whole): " + "; ".join(changes))

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["memory"]["total"] = self.memory.total
        data["advice"] = self.advice()
        return data


def make_plan(model: str, method: MethodConfig, inputs: PlanInputs, targets: list[str] | str | None = None,
              total_steps: int = 1000) -> Plan:
    """Plan `method` on `model` (config path, directory, shipped name or hub name) for `inputs`."""
    method.validate(total_steps)
    config = load_model_config(model)
    geometry = model_geometry(config)
    adapters = plan_adapters(geometry, method, targets)
    memory = memory_breakdown(geometry, adapters, inputs)
    fits = memory.total <= inputs.gpu_memory_gib * GIB
    return Plan(model=geometry.spec.name or model, model_type=geometry.spec.model_type,
                base_params=geometry.total_params, adapter_modules=adapters.modules,
                adapter_components=adapters.components, adapter_params=adapters.params,
                trainable_params=adapters.trainable, method=dataclasses.asdict(method), inputs=inputs,
                memory=memory, traffic=controller_traffic(adapters), fits=fits,
                fits_with_gpus=None if fits else smallest_fitting_gpus(geometry, adapters, inputs),
                floor_bytes=memory_breakdown(geometry, adapters, dataclasses.replace(inputs, gpus=MAX_GPUS)).total,
                notes=notes(geometry, inputs))


def smallest_fitting_gpus(geometry: ModelGeometry, adapters: AdapterPlan, inputs: PlanInputs) -> int | None:
    """The first of 2N, 4N, ... up to MAX_GPUS with which the same engine fits (None: none)."""
    gpus = inputs.gpus * 2
    while gpus <= MAX_GPUS:
        try:
            memory = memory_breakdown(geometry, adapters, dataclasses.replace(inputs, gpus=gpus))
        except ConfigError:
            return None
        if memory.total <= inputs.gpu_memory_gib * GIB:
            return gpus
        gpus *= 2
    return None


def notes(geometry: ModelGeometry, inputs: PlanInputs) -> tuple[str, ...]:
    """The assumptions behind the numbers, for the report."""
    found = [
        "activations: Korthikanti et al. 2022's method re-derived for a Llama block with a frozen base, "
        "SDPA / flash attention (no s^2 scores) and no padding mask (with one, transformers repeats k/v to "
        "every head); checked against traced CPU runs (bench/plan_validation.py)",
        f"adapters in {'float32' if inputs.adapter_bytes == 4 else '16-bit'} with AdamW moments in the same "
        "dtype",
        "scale_rank's trainer with train.precision bf16 / fp16 stores the frozen base in 16-bit under every "
        "engine, as planned here (scale_rank.model.storage_dtype; 4-bit weights pack into that dtype), and "
        "what trains in float32",
        "not counted: the host-side controller state (masks, PRILoRA's float64 norm EMA), allocator "
        "fragmentation beyond the reserve",
    ]
    if inputs.engine in ("zero2", "zero3"):
        found.append("ZeRO: zero2 shards gradients and optimizer states, not parameters; zero3 also shards "
                     "parameters except tensors under stage3_param_persistence_threshold (1e5 elements), "
                     "which stay whole; DeepSpeed's own buffers (buckets, prefetch) are not modelled")
    if inputs.engine == "ddp" and inputs.gpus > 1:
        found.append("DDP's gradients are views into its communication buckets (gradient_as_bucket_view): "
                     "stored once")
    if not geometry.closed_form:
        found.append(f"model type {geometry.spec.model_type!r} has no closed form: parameters are counted on a "
                     "meta-device build, activations use the Llama-block terms (an estimate)")
    return tuple(found)
