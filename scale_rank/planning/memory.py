"""Per-GPU memory of adapter fine-tuning: weights, adapters, gradients, Adam, method state, activations.

All functions are pure: a ModelGeometry, an AdapterPlan and PlanInputs in, bytes out. Assumptions (also in
`Plan.notes`): the base is frozen and stored in `bits`, computing in 16-bit; adapters are float32 (or
`adapter_bytes`), trained with AdamW (two moments in the parameter dtype); every GPU runs its own micro-batch
(data parallel), so activations never shrink with more GPUs.

Activations follow the method of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (count the tensors each op saves for backward), re-derived for a Llama-style block with a
frozen base and scale_rank adapters instead of their GPT block (34 + 5as/h bytes per token and hidden unit).
Per token of one block (h hidden, f MLP width, q = heads x head_dim, k = kv_heads x head_dim, p activation
bytes, a adapter bytes):
  RMSNorm x2        2 (4h + 4)              float32 copy of the input and 1/rms (transformers upcasts)
  attention (SDPA)  (2q + 2k) p + 4 heads   q, k, v, output, float32 logsumexp (flash / memory-efficient
                                            kernels: no s^2 scores, so Korthikanti's 5as/h term is absent)
  SwiGLU MLP        3 f p                   gate output, SiLU output, up output
  adapter inputs    the layer casts x to the adapter dtype and saves it for lora_A's gradient. Same dtypes:
                    layers reading one tensor share it (q/k/v, gate/up: d_in p per group; o_proj's input is
                    SDPA's output, already counted). Different dtypes: one copy per adapted layer (d_in a).
                    Frozen base layers save nothing (no weight gradient), except bitsandbytes 8-bit layers,
                    which keep their input.
  adapter ranks     r a per adapted layer (lora_B's input)
The first block's input norm saves nothing (frozen embeddings need no gradient). Outside the blocks: the final
norm (4h + 4) and int64 targets (8) per token, and the rotary cos / sin tables (2 s head_dim p). Per adapted
layer, independent of tokens: where lam trains, B with lam folded in (d_out r a, what the second product saves
for its input's gradient) and the orthogonality regularizer's tensors (block_bytes).
Full checkpointing (Korthikanti: 2sbh per layer plus one layer rebuilt in backward) keeps each block's input,
h p per token.
The loss: transformers upcasts the logits to float32 and log_softmax saves its float32 output (4 bytes per
token and vocabulary entry, the `logits` line). Backward adds most at one of three moments (the largest is
taken): log_softmax's backward, which holds the incoming and the outgoing float32 gradient (8 V per token);
the final RMSNorm's backward in float32 (five h-wide float32 temporaries, 20 h); or one block's backward:
the block rebuilt (checkpointing) plus gradient temporaries of about two f-wide tensors (2 f max(p, a)).
The last two were read off traced peaks (bench/plan_validation.py), not derived op by op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..config import ConfigError
from ..methods import method_class
from .adapters import AdapterPlan, adapter_buffer_bytes, method_state_bytes
from .models import ATTENTION_OUTPUT, ModelGeometry

ENGINES = ("ddp", "zero2", "zero3", "fsdp1", "fsdp2")
PARAM_SHARDING = ("zero3", "fsdp1", "fsdp2")  # engines that shard parameters (the rest replicate them)
ZERO3_PERSISTENCE = 100_000  # DeepSpeed stage3_param_persistence_threshold: smaller tensors stay whole
BITS = (16, 8, 4)
GIB = 2 ** 30


@dataclass(frozen=True)
class PlanInputs:
    """What the user chooses: engine, GPUs, precision of the base, batch shape, memory per GPU."""

    engine: str = "zero3"
    gpus: int = 8
    bits: int = 16
    seq_len: int = 2048
    micro_batch: int = 1
    gradient_checkpointing: bool = True
    gpu_memory_gib: float = 80.0
    adapter_bytes: int = 4  # float32 adapters (2: bf16)
    activation_bytes: int = 2  # 16-bit compute
    double_quant: bool = False  # 4-bit: quantized quantization constants (QLoRA's double quantization)
    reserve_gib: float = 1.0  # CUDA context, NCCL buffers and allocator slack

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch

    def validate(self, max_positions: int) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; choose one of {list(ENGINES)}")
        if self.bits not in BITS:
            raise ConfigError(f"bits must be one of {list(BITS)} (16-bit, bitsandbytes int8 or nf4), got {self.bits}")
        for key in ("gpus", "seq_len", "micro_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        for key in ("adapter_bytes", "activation_bytes"):
            if getattr(self, key) not in (2, 4):
                raise ConfigError(f"{key} must be 2 (16-bit) or 4 (float32), got {getattr(self, key)}")
        if self.gpu_memory_gib <= 0:
            raise ConfigError(f"gpu-memory must be > 0 GiB, got {self.gpu_memory_gib}")
        if max_positions and self.seq_len > max_positions:
            raise ConfigError(f"seq-len {self.seq_len} exceeds the model's max_position_embeddings "
                              f"({max_positions}): lower --seq-len to at most {max_positions}")
        if self.bits == 8 and self.engine in PARAM_SHARDING:
            raise ConfigError(f"8-bit base weights (bitsandbytes int8) cannot be sharded by {self.engine}: use "
                              "--bits 4 (its storage dtype matches the other parameters) or --engine ddp / zero2")


@dataclass(frozen=True)
class Activations:
    """Bytes one GPU holds for backward (one micro-batch)."""

    stored: int  # saved by the blocks through the forward (checkpointing: their inputs only)
    head: int  # final norm, loss targets, rotary tables
    logits: int  # float32 log-probs saved for the loss
    loss_backward: int  # the float32 gradients into and out of log_softmax, live beside `logits`
    norm_backward: int  # the final norm's float32 backward temporaries
    block_backward: int  # one block's backward: the block rebuilt (checkpointing) + gradient temporaries

    @property
    def saved(self) -> int:
        """Everything saved for backward when the forward ends."""
        return self.stored + self.head + self.logits

    @property
    def backward_peak(self) -> int:
        """What backward adds at its peak (the loss's, the final norm's or one block's: the largest)."""
        return max(self.loss_backward, self.norm_backward, self.block_backward)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU, by what holds them."""

    base_weights: int
    gathered_weights: int
    adapter_params: int
    adapter_buffers: int
    gradients: int
    optimizer_states: int
    method_state: int
    activations: int
    logits: int
    backward_peak: int
    reserve: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


# -- weights -----------------------------------------------------------------------------------------
def base_weight_bytes(geometry: ModelGeometry, bits: int, double_quant: bool = False) -> int:
    """The frozen base, whole. Block linears in `bits` (+ quantization constants); the rest 16-bit.

    int8 (LLM.int8): 1 B per weight + a float32 scale per output row. nf4 (QLoRA): 0.5 B per weight + a
    float32 absmax per block of 64 (0.5 bits per weight), or with double quantization an 8-bit absmax per
    64 and a float32 per 256 blocks (0.127 bits per weight; Dettmers et al. 2023, section 3).
    """
    quantizable = geometry.quantizable_params
    rest = 2 * (geometry.total_params - quantizable)
    if bits == 16:
        return rest + 2 * quantizable
    if bits == 8:
        rows = sum(lin.d_out for lin in geometry.linears if lin.in_block)
        return rest + quantizable + 4 * rows
    constants = quantizable / 64 + quantizable * 4 / (64 * 256) if double_quant else quantizable * 4 / 64
    return rest + quantizable // 2 + math.ceil(constants)


def base_weights_per_gpu(geometry: ModelGeometry, inputs: PlanInputs) -> int:
    """Replicated (ddp, zero2) or sharded; ZeRO-3 keeps tensors under its persistence threshold whole
    (norms and biases here), FSDP shards everything."""
    whole = base_weight_bytes(geometry, inputs.bits, inputs.double_quant)
    if inputs.engine not in PARAM_SHARDING:
        return whole
    small = 2 * geometry.other_params if inputs.engine == "zero3" else 0
    return math.ceil((whole - small) / inputs.gpus) + small


def gathered_weights(geometry: ModelGeometry, plan: AdapterPlan, inputs: PlanInputs) -> int:
    """Transient full copies when parameters are sharded: two blocks (the current one and the prefetched
    next) plus the unit outside the blocks (FSDP: embeddings, final norm and lm_head, gathered at the root's
    forward and kept until its backward; ZeRO-3: the larger of embeddings and lm_head, gathered on use).
    With 8/4-bit bases, also one dequantized 16-bit weight (the largest linear) during its matmul."""
    dequantized = 0
    if inputs.bits < 16:
        dequantized = 2 * max(lin.d_in * lin.d_out for lin in geometry.linears if lin.in_block)
    if inputs.engine not in PARAM_SHARDING or inputs.gpus == 1:
        return dequantized
    spec = geometry.spec
    block = base_weight_bytes(geometry, inputs.bits, inputs.double_quant) - 2 * (
        geometry.embedding_params + geometry.head_params + spec.hidden)
    block = block // spec.layers + inputs.adapter_bytes * plan.params // spec.layers
    if inputs.engine == "zero3":
        outside = 2 * max(geometry.embedding_params, geometry.head_params)
    else:
        outside = 2 * (geometry.embedding_params + geometry.head_params + spec.hidden)
    return 2 * block + outside + dequantized


# -- adapters, gradients, optimizer ------------------------------------------------------------------
def local_numel(shape: tuple[int, ...], engine: str, gpus: int, role: str) -> int:
    """Elements of one adapter tensor on the most loaded GPU (rank 0).

    role "param": replicated under ddp / zero2 and, below the persistence threshold, zero3; "grad" and
    "optim": sharded under every engine but ddp (zero2 shards gradients and optimizer states, not
    parameters). FSDP2 shards dim 0 (ceil(rows / N) rows each); ZeRO and FSDP1 shard flat storage evenly.
    "scored": the entries this rank scores (a replicated tensor is split in 1/N ranges, shards.py).
    """
    numel = math.prod(shape)
    replicated = engine == "ddp" or (role == "param" and (
        engine == "zero2" or (engine == "zero3" and numel < ZERO3_PERSISTENCE)))
    if role == "scored" and engine != "fsdp2":
        return math.ceil(numel / gpus)
    if replicated:
        return numel
    if engine == "fsdp2":
        return math.ceil(shape[0] / gpus) * (numel // shape[0])
    return math.ceil(numel / gpus)


def adapter_state_bytes(plan: AdapterPlan, inputs: PlanInputs) -> tuple[int, int, int]:
    """(parameters, gradients, AdamW moments) of the adapters on one GPU, in the adapter dtype.

    Gradients and moments exist only for trainable tensors (lam of LoRA / PRILoRA is frozen). Under DDP the
    gradients are views into its communication buckets (the engine sets gradient_as_bucket_view): one copy.
    """
    params = grads = optim = 0
    for site in plan.sites:
        for index, shape in enumerate(site.tensor_shapes):
            params += local_numel(shape, inputs.engine, inputs.gpus, "param")
            if index < 2 or plan.lam_trains:
                grads += local_numel(shape, inputs.engine, inputs.gpus, "grad")
                optim += 2 * local_numel(shape, inputs.engine, inputs.gpus, "optim")
    size = inputs.adapter_bytes
    return params * size, grads * size, optim * size


def scored_fraction(plan: AdapterPlan, inputs: PlanInputs) -> float:
    """This GPU's share of the adapter entries it scores (about 1 / N under every engine)."""
    local = sum(local_numel(shape, inputs.engine, inputs.gpus, "scored")
                for site in plan.sites for shape in site.tensor_shapes)
    return local / plan.params


# -- activations -------------------------------------------------------------------------------------
def layer_terms(geometry: ModelGeometry, plan: AdapterPlan, inputs: PlanInputs, layer: int = 0) -> dict[str, int]:
    """Bytes per token that block `layer` saves for backward, by term (see the module docstring)."""
    spec, p, a = geometry.spec, inputs.activation_bytes, inputs.adapter_bytes
    h, f = spec.hidden, spec.intermediate
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    sites = [site for site in plan.sites if site.linear.in_block and site.linear.layer_index == layer]
    saved_inputs: dict[tuple[str, int], int] = {}
    for site in sites:
        key = (site.linear.group, p) if a == p else (site.linear.name, a)
        saved_inputs[key] = site.linear.d_in * (p if a == p else a)
    if (ATTENTION_OUTPUT, p) in saved_inputs:  # SDPA's output already holds o_proj's input
        saved_inputs[(ATTENTION_OUTPUT, p)] = 0
    if inputs.bits == 8:
        for lin in geometry.linears:
            if lin.in_block and lin.layer_index == layer:
                saved_inputs[(lin.group, p)] = lin.d_in * p
    return {"norms": 2 * (4 * h + 4), "attention": (2 * q + 2 * kv) * p + 4 * spec.heads, "mlp": 3 * f * p,
            "adapter inputs": sum(saved_inputs.values()),
            "adapter ranks": sum(site.rank * a for site in sites)}


def activations(geometry: ModelGeometry, plan: AdapterPlan, inputs: PlanInputs) -> Activations:
    """Saved tensors of one micro-batch on one GPU, with or without full activation checkpointing."""
    spec, tokens, p = geometry.spec, inputs.tokens, inputs.activation_bytes
    layers = [block_bytes(geometry, plan, inputs, layer) for layer in range(spec.layers)]
    if inputs.gradient_checkpointing:
        stored, rebuilt = spec.layers * spec.hidden * p * tokens, max(layers)
    else:
        stored, rebuilt = sum(layers) - (4 * spec.hidden + 4) * tokens, 0  # first input norm: no gradient
    rotary = 2 * inputs.seq_len * spec.head_dim * p
    head = (4 * spec.hidden + 12) * tokens + rotary + 4  # + the loss's total weight
    widest = max(p, inputs.adapter_bytes)
    return Activations(stored, head, logits=4 * spec.vocab * tokens,
                       loss_backward=8 * spec.vocab * tokens, norm_backward=20 * spec.hidden * tokens,
                       block_backward=rebuilt + 2 * spec.intermediate * widest * tokens)


def block_bytes(geometry: ModelGeometry, plan: AdapterPlan, inputs: PlanInputs, layer: int) -> int:
    """What block `layer` saves for one micro-batch: per-token terms plus, per adapted layer where lam trains,
    B times lam (d_out r a; `AdaptiveLoRALayer.gate_factor`: lam itself is a parameter, and the scale is the
    output addition's alpha) and, with the orthogonality regularizer (gamma > 0), its two r x r float32 residuals
    (A and B themselves are parameters)."""
    sites = [site for site in plan.sites if site.linear.layer_index == layer and site.linear.in_block]
    fixed = 0
    if plan.lam_trains:
        fixed += sum(site.rank * site.linear.d_out for site in sites) * inputs.adapter_bytes
    if plan.method.resolved_gamma() > 0:
        fixed += sum(8 * site.rank ** 2 for site in sites)
    return sum(layer_terms(geometry, plan, inputs, layer).values()) * inputs.tokens + fixed


# -- the whole plan ----------------------------------------------------------------------------------
def memory_breakdown(geometry: ModelGeometry, plan: AdapterPlan, inputs: PlanInputs) -> MemoryBreakdown:
    """Every item of one GPU's memory for `inputs` (validated)."""
    inputs.validate(geometry.spec.max_positions)
    method = plan.method
    error = method_class(method.name).world_size_error(method, inputs.gpus)
    if error:
        raise ConfigError(error)
    params, grads, optim = adapter_state_bytes(plan, inputs)
    acts = activations(geometry, plan, inputs)
    return MemoryBreakdown(
        base_weights=base_weights_per_gpu(geometry, inputs),
        gathered_weights=gathered_weights(geometry, plan, inputs),
        adapter_params=params,
        adapter_buffers=adapter_buffer_bytes(plan, inputs.adapter_bytes),
        gradients=grads,
        optimizer_states=optim,
        method_state=method_state_bytes(plan, scored_fraction(plan, inputs)),
        activations=acts.stored + acts.head,
        logits=acts.logits,
        backward_peak=acts.backward_peak,
        reserve=round(inputs.reserve_gib * GIB))
