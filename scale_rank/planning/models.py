"""Model geometry for planning: every linear layer's shape and the parameter count by kind, from a config.

Llama-style decoders (llama, mistral, qwen2) have a closed form from the config's numbers alone. Other model
types are built on the meta device (no memory, no download) and measured. `meta_trainable_count` attaches a
method's adapters to such a meta model with `scale_rank.adapt`, the check of the closed-form counts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapt import adapt
from ..config import ConfigError, MethodConfig
from ..inject import _LAYER_NUMBER
from ..layer import base_dims, is_adaptable

SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "llm" / "models"
CLOSED_FORM_TYPES = ("llama", "mistral", "qwen2")
ATTENTION_OUTPUT = "attn_out"  # the group of o_proj: its input is the attention kernel's output
_LLAMA_GROUPS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": ATTENTION_OUTPUT,
                 "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}


@dataclass(frozen=True)
class ModelSpec:
    """The architecture numbers the memory plan uses."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    tie_embeddings: bool


@dataclass(frozen=True)
class LinearShape:
    """One linear layer. Layers of one block with the same `group` read the same input tensor."""

    name: str
    d_in: int
    d_out: int
    in_block: bool  # inside a decoder block: quantized with the base (lm_head is not)
    group: str

    @property
    def layer_index(self) -> int:
        """The block number in the name (0 outside blocks), as scale_rank.inject numbers sites."""
        found = _LAYER_NUMBER.search(f".{self.name}.")
        return int(found.group(1)) if found else 0


@dataclass(frozen=True)
class ModelGeometry:
    """Shapes and parameter counts of a model; `closed_form` False: measured on a meta-device build."""

    spec: ModelSpec
    linears: tuple[LinearShape, ...]
    embedding_params: int
    head_params: int  # lm_head weight, 0 when tied to the embeddings
    other_params: int  # norms and biases (small tensors, kept in 16-bit)
    closed_form: bool

    @property
    def quantizable_params(self) -> int:
        """Weights of the linear layers inside blocks: what 8/4-bit quantization stores compressed."""
        return sum(lin.d_in * lin.d_out for lin in self.linears if lin.in_block)

    @property
    def total_params(self) -> int:
        return self.quantizable_params + self.embedding_params + self.head_params + self.other_params


# -- configs -----------------------------------------------------------------------------------------
def load_model_config(name_or_path: str):
    """A transformers config from a config.json path, a model directory, a shipped config or a hub name.

    Shipped configs (configs/llm/models/*.json) answer to their file stem ("llama3_8b") and to the hub name
    they were copied from ("meta-llama/Meta-Llama-3-8B"), so those need no network.
    """
    from transformers import AutoConfig
    path = Path(name_or_path)
    shipped = None if path.exists() else shipped_config(name_or_path)
    try:
        config = AutoConfig.from_pretrained(str(shipped or name_or_path))
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read a model config from {name_or_path!r} ({error}); pass a config.json "
                          f"path, a model directory or a hub name (shipped: {shipped_names()})") from error
    if shipped is not None:
        config.name_or_path = json.loads(shipped.read_text()).get("_name_or_path", name_or_path)
    return config


def shipped_config(name: str) -> Path | None:
    for path in sorted(SHIPPED_CONFIGS.glob("*.json")):
        if name in (path.stem, json.loads(path.read_text()).get("_name_or_path")):
            return path
    return None


def shipped_names() -> list[str]:
    return [path.stem for path in sorted(SHIPPED_CONFIGS.glob("*.json"))]


def model_spec(config) -> ModelSpec:
    """The planning numbers of a transformers config (standard attribute names, as AutoConfig maps them)."""
    missing = [key for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if getattr(config, key, None) is None]
    if missing:
        raise ConfigError(f"model type {config.model_type!r}: its config lacks {missing}, which the planner's "
                          "memory model needs")
    hidden, heads = config.hidden_size, config.num_attention_heads
    return ModelSpec(
        name=getattr(config, "_name_or_path", "") or config.model_type, model_type=config.model_type,
        hidden=hidden, intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
        layers=config.num_hidden_layers, heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads, vocab=config.vocab_size,
        max_positions=getattr(config, "max_position_embeddings", None) or 0,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)))


# -- geometry ----------------------------------------------------------------------------------------
def model_geometry(config) -> ModelGeometry:
    """Closed form for llama / mistral / qwen2; a meta-device build for other types."""
    return closed_form_geometry(config) if config.model_type in CLOSED_FORM_TYPES else meta_geometry(config)


def closed_form_geometry(config) -> ModelGeometry:
    """Shapes and counts of a Llama-style decoder from its config alone."""
    spec = model_spec(config)
    h, f, q, kv = spec.hidden, spec.intermediate, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    shapes = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
              "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, f), "mlp.up_proj": (h, f),
              "mlp.down_proj": (f, h)}
    linears = [LinearShape(f"model.layers.{i}.{suffix}", d_in, d_out, True,
                           _LLAMA_GROUPS[suffix.rpartition(".")[2]])
               for i in range(spec.layers) for suffix, (d_in, d_out) in shapes.items()]
    linears.append(LinearShape("lm_head", h, spec.vocab, False, "head"))
    biases = _bias_outputs(config, shapes)
    other = spec.layers * (2 * h + biases) + h  # two norms per block, biases, the final norm
    embedding = spec.vocab * h
    return ModelGeometry(spec, tuple(linears), embedding, 0 if spec.tie_embeddings else embedding, other, True)


def _bias_outputs(config, shapes: dict[str, tuple[int, int]]) -> int:
    """Bias elements per block: qwen2 has q/k/v biases; llama's attention_bias / mlp_bias flags add theirs."""
    if config.model_type == "qwen2":
        with_bias = ("q_proj", "k_proj", "v_proj")
    else:
        with_bias = (("q_proj", "k_proj", "v_proj", "o_proj") if getattr(config, "attention_bias", False) else ()) \
            + (("gate_proj", "up_proj", "down_proj") if getattr(config, "mlp_bias", False) else ())
    return sum(d_out for suffix, (_, d_out) in shapes.items() if suffix.rpartition(".")[2] in with_bias)


def meta_geometry(config) -> ModelGeometry:
    """Shapes and counts measured on a meta-device build (no memory); activations get estimated terms."""
    model = build_meta_model(config)
    linears = tuple(LinearShape(name, *base_dims(module), _LAYER_NUMBER.search(f".{name}.") is not None, name)
                    for name, module in model.named_modules() if is_adaptable(module))
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    head = 0 if output is None or tied else output.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    quantizable = sum(lin.d_in * lin.d_out for lin in linears if lin.in_block)
    return ModelGeometry(model_spec(config), linears, embedding, head, total - quantizable - embedding - head,
                         False)


# -- meta-device builds ------------------------------------------------------------------------------
def build_meta_model(config) -> nn.Module:
    """The causal-LM of `config` with every tensor on the meta device: shapes only, no memory."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def meta_trainable_count(config, method: MethodConfig, total_steps: int,
                         targets: list[str] | str | None = None, model: nn.Module | None = None) -> int:
    """Trainable parameters after `scale_rank.adapt` on a meta-device build (`model`, or a fresh one)."""
    model = build_meta_model(config) if model is None else model
    adapt(model, method, total_steps, targets=targets, trainable=[])
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
