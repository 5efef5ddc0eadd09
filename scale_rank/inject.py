"""Find target modules, wrap them in adapter layers, freeze the base model."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .config import ConfigError
from .layer import AdaptiveLoRALayer, is_adaptable

# Suffixes of the module names to adapt, per model type; the first matching suffix names the matrix type.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense"],
    "deberta-v2": ["attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                   "attention.output.dense", "intermediate.dense", "output.dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
for _alias, _source in {"roberta": "bert", "xlm-roberta": "bert", "mistral": "llama", "qwen2": "llama",
                        "qwen3": "llama", "mixtral": "llama"}.items():
    DEFAULT_TARGETS[_alias] = DEFAULT_TARGETS[_source]

# Task heads trained in full next to the adapters (PEFT's modules_to_save), by suffix.
DEFAULT_TRAINABLE = ["classifier", "score"]

_LAYER_NUMBER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Site:
    """One module to adapt."""

    name: str
    module: nn.Module
    layer_index: int
    kind: str


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(
            f"no default target modules for model type {model_type!r}; set model.targets to a list of "
            f"module-name suffixes or a regex (known types: {sorted(DEFAULT_TARGETS)})")
    return DEFAULT_TARGETS[model_type]


def exact_names_regex(model: nn.Module, targets: list[str] | str | None = None) -> str:
    """A regex matching exactly the module names `targets` selects (e.g. PEFT's target_modules)."""
    names = [site.name for site in find_sites(model, targets)]
    return "^(?:" + "|".join(re.escape(name) for name in names) + ")$"


def find_sites(model: nn.Module, targets: list[str] | str | None = None) -> list[Site]:
    """Modules whose names match `targets`: a list of suffixes, or one regex matched against full names."""
    targets = default_targets(model) if targets is None else targets
    matcher = _matcher(targets)
    sites, rejected = [], []
    for name, module in model.named_modules():
        kind = matcher(name)
        if kind is None or isinstance(module, AdaptiveLoRALayer) or name.endswith("base_layer"):
            continue
        if not is_adaptable(module):
            rejected.append(f"{name} ({type(module).__name__})")
            continue
        found = _LAYER_NUMBER.search(f".{name}.")
        sites.append(Site(name, module, int(found.group(1)) if found else 0, kind))
    if rejected:
        raise ConfigError(f"targets {targets!r} match modules that are not linear layers: "
                          f"{', '.join(rejected[:5])}; narrow the patterns to linear layers")
    if not sites:
        linear = [n for n, m in model.named_modules() if is_adaptable(m)]
        raise ConfigError(f"targets {targets!r} match no module; linear layers in this model include: "
                          f"{', '.join(linear[:8])}")
    return sites


def _matcher(targets: list[str] | str) -> Callable[[str], str | None]:
    if isinstance(targets, str):
        pattern = re.compile(targets)

        def by_regex(name: str) -> str | None:
            """Matrix type: the part of the name after the layer number (or its last part)."""
            if not pattern.fullmatch(name):
                return None
            parts = _LAYER_NUMBER.split(f".{name}.", maxsplit=1)
            return parts[-1].strip(".") if len(parts) > 1 else name.split(".")[-1]
        return by_regex

    def by_suffix(name: str) -> str | None:
        for suffix in sorted(targets, key=len, reverse=True):  # longest first: "attention.output.dense"
            if name == suffix or name.endswith("." + suffix):
                return suffix
        return None
    return by_suffix


def attach_adapters(model: nn.Module, sites: list[Site],
                    make_layer: Callable[[Site], AdaptiveLoRALayer],
                    trainable: list[str] | None = None) -> list[AdaptiveLoRALayer]:
    """Freeze `model`, replace every site with `make_layer(site)`, unfreeze task heads.

    Returns the adapter layers in model order.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    layers = []
    for site in sites:
        layer = make_layer(site)
        parent_name, _, child = site.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        layers.append(layer)
    for name in trainable_heads(model, trainable):
        for param in model.get_submodule(name).parameters():
            if not param.dtype.is_floating_point:
                raise ConfigError(f"task head {name} is quantized ({param.dtype}) and cannot train: keep heads "
                                  "unquantized (llm_int8_skip_modules) or list other modules in model.trainable")
            param.requires_grad_(True)
    return layers


def trainable_heads(model: nn.Module, trainable: list[str] | None) -> list[str]:
    """Names of modules trained in full: explicit suffixes, or the default task heads that exist."""
    suffixes = DEFAULT_TRAINABLE if trainable is None else trainable
    names = []
    for name, module in model.named_modules():
        if any(name == s or name.endswith("." + s) for s in suffixes) and not isinstance(
                module, AdaptiveLoRALayer) and "lora_" not in name and ".base_layer" not in name:
            if not any(name.startswith(n + ".") for n in names):
                names.append(name)
    if trainable is not None and len(names) < len(trainable):
        missing = [s for s in trainable if not any(n == s or n.endswith("." + s) for n in names)]
        raise ConfigError(f"model.trainable names {missing} match no module")
    return names


def adapter_layers(model: nn.Module) -> list[AdaptiveLoRALayer]:
    return [m for m in model.modules() if isinstance(m, AdaptiveLoRALayer)]
