"""The text table `scale-rank plan` prints."""
from __future__ import annotations

from .memory import GIB, PARAM_SHARDING
from .planner import Plan


def format_plan(plan: Plan) -> str:
    """The per-GPU memory table, the verdict, the controller's traffic and the assumptions."""
    inputs, memory = plan.inputs, plan.memory
    sharded = f"/{inputs.gpus}" if inputs.engine in PARAM_SHARDING else "whole"
    optim_sharded = "whole" if inputs.engine == "ddp" else f"/{inputs.gpus}"
    checkpointing = "on" if inputs.gradient_checkpointing else "off"
    quant = {16: "16-bit", 8: "int8", 4: "nf4" + (" + double quant" if inputs.double_quant else "")}[inputs.bits]
    rows = [
        ("base weights", memory.base_weights, f"{quant}, {sharded}"),
        ("gathered weights (transient)", memory.gathered_weights, "blocks / root unit all-gathered, dequantized"),
        ("adapter parameters", memory.adapter_params, f"{_dtype(inputs.adapter_bytes)}, {sharded}"),
        ("adapter buffers", memory.adapter_buffers, "active, scale (replicated)"),
        ("gradients", memory.gradients, f"trainable only, {optim_sharded}"),
        ("AdamW states", memory.optimizer_states, f"2 moments, {optim_sharded}"),
        ("method state", memory.method_state, f"{plan.method['name']} statistics (local shards)"),
        ("activations", memory.activations, f"saved for backward, checkpointing {checkpointing}"),
        ("logits", memory.logits, "float32 log-probs for the loss"),
        ("backward peak", memory.backward_peak, "loss / final norm / one block's backward"),
        ("reserve", memory.reserve, "CUDA context, NCCL, allocator slack"),
    ]
    lines = [
        f"model {plan.model} ({plan.model_type}): {plan.base_params / 1e9:.2f}B parameters",
        f"method {plan.method['name']}: {plan.adapter_modules} adapted modules, capacity {plan.adapter_components} "
        f"components, {plan.adapter_params:,} adapter parameters ({plan.trainable_params:,} trainable)",
        f"engine {inputs.engine} x {inputs.gpus} GPUs, seq-len {inputs.seq_len}, micro-batch "
        f"{inputs.micro_batch}, checkpointing {checkpointing}",
        "",
        f"{'per GPU':<30} {'GiB':>9}  notes",
    ]
    lines += [f"{name:<30} {value / GIB:>9.3f}  {note}" for name, value, note in rows]
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines += [f"{'total':<30} {memory.total / GIB:>9.3f}  {verdict} in {inputs.gpu_memory_gib:g} GiB", ""]
    traffic = plan.traffic
    lines.append(f"controller traffic: {traffic.bytes_per_event:,} B in {traffic.calls_per_event} collective(s), "
                 f"{traffic.when}")
    if traffic.extra:
        lines.append(f"  {traffic.extra}")
    lines += ["", "assumptions:"] + [f"  - {note}" for note in plan.notes]
    return "\n".join(lines)


def _dtype(size: int) -> str:
    return {4: "float32", 2: "bf16"}[size]
